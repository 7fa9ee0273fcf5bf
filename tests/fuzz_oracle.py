"""thin_check 1.1 for the fuzz harness, one fork per input instead of one exec.

The fuzz runs thin_check 1.1 on ~8,000 distinct inputs per run. Most of a run's cost was not
the check but starting the program: exec, the dynamic loader relocating a 3.4 MB PIE
binary, its page faults (perf: pdata_tools' own code was ~7% of a run's CPU). Here the
binary is started once, with a small preloaded shim (:data:`_FORKSERVER_C`) whose
constructor runs after the loader and before the program's own initialisation (Rust's
runtime reads ``argv`` in the executable's ``.init_array``, which runs after the preloaded
libraries' constructors). The constructor serves requests ``ID PATH``: for each it forks;
the child puts PATH in place of the last argument (``thin_check -q PLACEHOLDER``) and
returns, so the unchanged program then runs from its own start on that file; the server
reports ``ID STATUS`` when the child exits. Every check is still a whole, fresh run of
thin_check 1.1's own code in its own process: only exec and relocation are shared.

:class:`ThinCheckServer` verifies itself when it starts (a clean base must pass and a zeroed
file fail, as direct runs do) and falls back to a process per check when there is no C
compiler or ``DMIMAGE_FUZZ_FORKSERVER=0``. Measured on this project's 2-core machine: ~2.4 ms
of CPU per check directly (plus ~0.2 ms for Python's spawn in the harness), ~1.5 ms forked.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path

import oracles

#: the server's request/response pipes are passed in this variable (``IN_FD,OUT_FD``)
ENV = "DMIMAGE_FORKSERVER"

_FORKSERVER_C = r"""
/* dmimage tests/fuzz_oracle.py: a fork server in the constructor (see that module). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_KIDS 4096
static int wake[2];
static pid_t kid_pid[MAX_KIDS];
static unsigned long kid_id[MAX_KIDS];

static void on_child(int sig) {
    int saved = errno;
    (void)sig;
    (void)!write(wake[1], "", 1);
    errno = saved;
}

/* report every exited child: "ID STATUS" (STATUS: exit code, or 128 + the signal) */
static int reap(int out) {
    int status, running = 0;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        int rc = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        for (int i = 0; i < MAX_KIDS; i++) {
            if (kid_pid[i] == pid) {
                char line[64];
                int n = snprintf(line, sizeof line, "%lu %d\n", kid_id[i], rc);
                kid_pid[i] = 0;
                if (write(out, line, n) != n) _exit(3);
                break;
            }
        }
    }
    for (int i = 0; i < MAX_KIDS; i++) running += kid_pid[i] != 0;
    return running;
}

__attribute__((constructor)) static void serve(int argc, char **argv, char **envp) {
    (void)envp;
    const char *spec = getenv("DMIMAGE_FORKSERVER");
    int in, out;
    if (spec == NULL || sscanf(spec, "%d,%d", &in, &out) != 2 || argc < 2) return;
    unsetenv("DMIMAGE_FORKSERVER");
    if (pipe2(wake, O_CLOEXEC | O_NONBLOCK) != 0) _exit(3);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_child;
    sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
    sigaction(SIGCHLD, &sa, NULL);
    static char buf[1 << 16];
    size_t have = 0;
    int eof = 0, running = 0;
    for (;;) {
        struct pollfd p[2] = {{wake[0], POLLIN, 0}, {in, POLLIN, 0}};
        if (eof && running == 0) _exit(0);
        if (poll(p, eof ? 1 : 2, -1) < 0 && errno != EINTR) _exit(3);
        char drain[256];
        while (read(wake[0], drain, sizeof drain) > 0) {}
        running = reap(out);
        if (eof || !(p[1].revents & (POLLIN | POLLHUP))) continue;
        ssize_t n = read(in, buf + have, sizeof buf - 1 - have);
        if (n <= 0) { eof = 1; continue; }
        have += n;
        char *line = buf, *nl;
        while ((nl = memchr(line, '\n', buf + have - line)) != NULL) {
            *nl = 0;
            char *path = strchr(line, ' ');
            unsigned long id = strtoul(line, NULL, 10);
            int slot = -1;
            for (int i = 0; i < MAX_KIDS && slot < 0; i++) if (kid_pid[i] == 0) slot = i;
            if (path == NULL || slot < 0) _exit(3);
            sigset_t all, old;
            sigfillset(&all);
            sigprocmask(SIG_BLOCK, &all, &old);
            pid_t pid = fork();
            if (pid == 0) {  /* the check: the program runs on from here, on PATH */
                signal(SIGCHLD, SIG_DFL);
                sigprocmask(SIG_SETMASK, &old, NULL);
                close(in); close(out); close(wake[0]); close(wake[1]);
                argv[argc - 1] = strdup(path + 1);
                return;
            }
            if (pid < 0) _exit(3);
            kid_pid[slot] = pid;
            kid_id[slot] = id;
            running++;
            sigprocmask(SIG_SETMASK, &old, NULL);
            line = nl + 1;
        }
        have = buf + have - line;
        memmove(buf, line, have);
    }
}
"""


def cache_dir() -> Path:
    """Where the shim is built: beside tests/oracles.py's (the same user cache)."""
    return oracles.shim_cache()


def build_shim(cache: Path) -> str | None:
    """The fork server's shared object, built into ``cache`` on first use; None without a
    compiler."""
    return oracles.build_shared_object("forkserver", _FORKSERVER_C, cache)


class Check:
    """One thin_check run in flight, with Popen's ``poll``/``wait`` (its exit status)."""

    def __init__(self, server: ThinCheckServer, ident: int) -> None:
        self.server, self.ident = server, ident

    def poll(self) -> int | None:
        self.server.collect(block=False)
        return self.server.done.get(self.ident)

    def wait(self) -> int:
        while (rc := self.server.done.get(self.ident)) is None:
            self.server.collect(block=True)
        return rc


class ThinCheckServer:
    """``thin_check -q PATH`` runs, forked from one started program (module docstring)."""

    def __init__(self, thin_check: str | os.PathLike[str], env: Mapping[str, str] | None,
                 shim: str) -> None:
        env = dict(os.environ if env is None else env)
        pre = env.get("LD_PRELOAD")
        req_r, self._req = os.pipe()
        self._res, res_w = os.pipe()
        env[ENV] = f"{req_r},{res_w}"
        env["LD_PRELOAD"] = f"{shim} {pre}" if pre else shim
        # its own process group: stop() ends the server and any check still running
        self.proc = subprocess.Popen([os.fspath(thin_check), "-q", "PLACEHOLDER"], env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, pass_fds=(req_r, res_w),
                                     start_new_session=True)
        os.close(req_r)
        os.close(res_w)
        self.done: dict[int, int] = {}
        self._next = 0
        self._partial = b""

    def check(self, path: str) -> Check:
        if "\n" in path:
            raise ValueError(f"a path with a newline: {path!r}")
        ident, self._next = self._next, self._next + 1
        os.write(self._req, f"{ident} {path}\n".encode())
        return Check(self, ident)

    def collect(self, block: bool) -> None:
        """Read the statuses reported so far (``block``: wait for at least one)."""
        if not select.select([self._res], [], [], None if block else 0)[0]:
            return
        data = os.read(self._res, 1 << 16)
        if not data:
            raise RuntimeError(f"the thin_check fork server exited ({self.proc.wait()})")
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            ident, rc = line.split()
            self.done[int(ident)] = int(rc)

    def stop(self) -> None:
        """End the server and any check still running (its process group: the server is
        not reaped yet, so the group is still this one)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        for fd in (self._req, self._res):
            try:
                os.close(fd)
            except OSError:
                pass


def start(thin_check: str | os.PathLike[str], env: Mapping[str, str] | None, clean: str,
          workdir: Path, cache: Path | None = None) -> ThinCheckServer | None:
    """A verified server, or None (no compiler, ``DMIMAGE_FUZZ_FORKSERVER=0``, or a server
    whose verdicts on ``clean`` (a pool thin_check passes) and on a zeroed file differ from
    direct runs'): the caller then starts a process per check."""
    if os.environ.get("DMIMAGE_FUZZ_FORKSERVER") == "0":
        return None
    shim = build_shim(cache or cache_dir())
    if shim is None:
        return None
    zeroed = workdir / "forkserver-zeroed.meta"
    with open(zeroed, "wb") as f:
        f.truncate(os.path.getsize(clean))
    server = ThinCheckServer(thin_check, env, shim)
    try:
        forked = [server.check(p).wait() for p in (clean, str(zeroed))]
        direct = [subprocess.run([os.fspath(thin_check), "-q", p], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
                  for p in (clean, str(zeroed))]
    except (OSError, RuntimeError):
        forked, direct = [], [0]
    finally:
        zeroed.unlink()
    if forked != direct or direct[0] != 0 or direct[1] == 0:
        server.stop()
        return None
    return server
