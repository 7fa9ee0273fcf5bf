"""Images to pre-seed a store with, read from ``docker save`` tarballs (``manifest.json``,
``<config>.json``, per layer a tar) or OCI image layouts (a directory or a tar of one:
``oci-layout``, ``index.json``, ``blobs/sha256/``), gzip'd layers decompressed. Every layer
is copied out uncompressed to a work directory and must hash to the config's diff id; the
config's sha256 is the image id, as dockerd computes it."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from dmimage.docker.errors import StoreError
from dmimage.docker.gotar import open_tar
from dmimage.docker.layers import DIGEST

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
REF_NAME = "org.opencontainers.image.ref.name"


@dataclass(frozen=True, slots=True)
class InputImage:
    id: str  # sha256:<config digest>
    config: bytes
    tags: tuple[str, ...]  # "repo:tag"
    diff_ids: tuple[str, ...]
    source: str


class _Source:
    """A docker-save or OCI layout, as a directory or a tar: named members, read whole or
    streamed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        if path.is_dir():
            return
        try:
            # read as docker load's Go archive/tar does (a global PAX header renames nothing)
            self._tar = open_tar(str(path))
        except (OSError, tarfile.TarError) as exc:
            raise StoreError(str(path), f"not a tar or a directory ({exc})") from None
        for m in self._tar.getmembers():
            self._members[m.name.removeprefix("./")] = m

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()

    def exists(self, name: str) -> bool:
        if self._tar is None:
            p = self._resolve(name)
            return p.is_file()
        m = self._members.get(name)
        return m is not None and m.isfile()

    def _resolve(self, name: str) -> Path:
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts:
            raise StoreError(f"{self.path}", f"{name!r}: a name outside the input")
        return self.path / name

    @contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        where = f"{self.path}:{name}"
        if self._tar is None:
            try:
                f: IO[bytes] = open(self._resolve(name), "rb")  # noqa: SIM115
            except OSError as exc:
                raise StoreError(where, exc.strerror or str(exc)) from None
        else:
            m = self._members.get(name)
            if m is None or not m.isfile():
                raise StoreError(where, "missing")
            got = self._tar.extractfile(m)
            if got is None:
                raise StoreError(where, "not a regular file")
            f = got
        try:
            yield f
        finally:
            f.close()

    def read(self, name: str, limit: int = 64 << 20) -> bytes:
        with self.open(name) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise StoreError(f"{self.path}:{name}", f"larger than {limit} bytes")
        return data

    def json(self, name: str) -> Any:
        try:
            return json.loads(self.read(name))
        except (ValueError, UnicodeDecodeError) as exc:
            raise StoreError(f"{self.path}:{name}", f"malformed JSON ({exc})") from None


def _diff_ids(config: bytes, where: str) -> tuple[str, ...]:
    try:
        obj = json.loads(config)
        ids = obj["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreError(where, f"not an image config with rootfs.diff_ids ({exc})") from None
    if not isinstance(ids, list) or not all(isinstance(d, str) and DIGEST.fullmatch(d)
                                            for d in ids):
        raise StoreError(where, "rootfs.diff_ids is not a list of sha256 digests")
    return tuple(ids)


def _copy_layer(src: IO[bytes], dest: Path, diff_id: str, where: str) -> None:
    """Copy a layer (gzip'd or not) to *dest* uncompressed; its sha256 must be *diff_id*."""
    head = src.read(2)
    stream: IO[bytes]
    if head == b"\x1f\x8b":
        rest = src
        stream = gzip.GzipFile(fileobj=_Prefixed(head, rest), mode="rb")  # type: ignore[call-overload]
    else:
        stream = _Prefixed(head, src)  # type: ignore[assignment]
    h = hashlib.sha256()
    tmp = dest.with_name(dest.name + ".part")
    try:
        with open(tmp, "wb") as out:
            while True:
                try:
                    buf = stream.read(1 << 20)
                except (OSError, EOFError, zlib.error) as exc:
                    raise StoreError(where, f"damaged compressed layer ({exc})") from None
                if not buf:
                    break
                h.update(buf)
                out.write(buf)
        got = "sha256:" + h.hexdigest()
        if got != diff_id:
            raise StoreError(where, f"layer hashes to {got}, the config's diff id is {diff_id}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


class _Prefixed:
    """A reader that returns *head* and then the rest of *f*."""

    def __init__(self, head: bytes, f: IO[bytes]) -> None:
        self._head = head
        self._f = f

    def read(self, n: int = -1) -> bytes:
        if self._head:
            h, self._head = self._head, b""
            if n < 0:
                return h + self._f.read()
            return h + self._f.read(max(0, n - len(h)))
        return self._f.read(n)


def _layer_path(work: Path, diff_id: str) -> Path:
    return work / f"{diff_id.removeprefix('sha256:')}.tar"


def _docker_save(src: _Source, work: Path) -> list[InputImage]:
    manifest = src.json("manifest.json")
    where = f"{src.path}:manifest.json"
    if not isinstance(manifest, list):
        raise StoreError(where, "not a list")
    out = []
    for i, ent in enumerate(manifest):
        if not isinstance(ent, dict) or not isinstance(ent.get("Config"), str) \
                or not isinstance(ent.get("Layers"), list):
            raise StoreError(where, f"entry {i}: needs Config and Layers")
        config = src.read(ent["Config"])
        cwhere = f"{src.path}:{ent['Config']}"
        diff_ids = _diff_ids(config, cwhere)
        if len(diff_ids) != len(ent["Layers"]):
            raise StoreError(where, f"entry {i}: {len(ent['Layers'])} layers, the config "
                             f"names {len(diff_ids)}")
        for name, d in zip(ent["Layers"], diff_ids, strict=True):
            dest = _layer_path(work, d)
            if not dest.exists():
                with src.open(str(name)) as f:
                    _copy_layer(f, dest, d, f"{src.path}:{name}")
        tags = ent.get("RepoTags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise StoreError(where, f"entry {i}: RepoTags is not a list of strings")
        out.append(InputImage("sha256:" + hashlib.sha256(config).hexdigest(), config,
                              tuple(_normal_tag(t, where) for t in tags), diff_ids,
                              str(src.path)))
    return out


def _blob(digest: str, where: str) -> str:
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        raise StoreError(where, f"digest {digest!r} is not a sha256 digest")
    return f"blobs/sha256/{digest.removeprefix('sha256:')}"


def _checked_blob(src: _Source, digest: str, where: str) -> bytes:
    data = src.read(_blob(digest, where))
    if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise StoreError(f"{src.path}:{_blob(digest, where)}", "content differs from its "
                         "digest")
    return data


def _oci(src: _Source, work: Path) -> list[InputImage]:
    index = src.json("index.json")
    out: list[InputImage] = []

    def manifests(idx: Any, where: str) -> Iterator[tuple[dict[str, Any], list[str]]]:
        if not isinstance(idx, dict) or not isinstance(idx.get("manifests"), list):
            raise StoreError(where, "needs a manifests list")
        for d in idx["manifests"]:
            if not isinstance(d, dict):
                raise StoreError(where, "a manifest descriptor is not an object")
            ann = d.get("annotations") or {}
            name = ann.get(REF_NAME) if isinstance(ann, dict) else None
            tags = [name] if isinstance(name, str) and name else []
            mt = d.get("mediaType")
            if mt in (OCI_INDEX, DOCKER_LIST):
                nested = json.loads(_checked_blob(src, d.get("digest", ""), where))
                for m, t in manifests(nested, f"{src.path}:{_blob(d['digest'], where)}"):
                    yield m, t or tags
            else:
                blob = _checked_blob(src, d.get("digest", ""), where)
                try:
                    yield json.loads(blob), tags
                except ValueError as exc:
                    raise StoreError(where, f"manifest {d.get('digest')}: malformed JSON "
                                     f"({exc})") from None

    for man, tags in manifests(index, f"{src.path}:index.json"):
        where = f"{src.path}: manifest"
        cfg = man.get("config") if isinstance(man, dict) else None
        layers = man.get("layers") if isinstance(man, dict) else None
        if not isinstance(cfg, dict) or not isinstance(layers, list):
            raise StoreError(where, "needs config and layers")
        config = _checked_blob(src, cfg.get("digest", ""), where)
        diff_ids = _diff_ids(config, f"{src.path}:{_blob(cfg['digest'], where)}")
        if len(diff_ids) != len(layers):
            raise StoreError(where, f"{len(layers)} layers, the config names {len(diff_ids)}")
        for desc, d in zip(layers, diff_ids, strict=True):
            mt = desc.get("mediaType", "") if isinstance(desc, dict) else ""
            if "zstd" in mt:
                raise StoreError(where, f"layer {desc.get('digest')}: zstd layers are not "
                                 "supported")
            dest = _layer_path(work, d)
            if not dest.exists():
                name = _blob(desc.get("digest", ""), where)
                with src.open(name) as f:
                    _copy_layer(f, dest, d, f"{src.path}:{name}")
        out.append(InputImage("sha256:" + hashlib.sha256(config).hexdigest(), config,
                              tuple(_normal_tag(t, where) for t in tags if ":" in t or
                                    "/" not in t), diff_ids, str(src.path)))
    return out


def _normal_tag(tag: str, where: str) -> str:
    """``repo:tag`` as repositories.json keeps it (``:latest`` when no tag is given);
    ``docker.io/library/`` is dropped, as Docker shows familiar names."""
    t = tag
    for prefix in ("docker.io/library/", "docker.io/"):
        if t.startswith(prefix):
            t = t[len(prefix):]
    name, _, tg = t.rpartition(":")
    if not name or "/" in tg:
        name, tg = t, "latest"
    if not name or any(c.isspace() for c in t) or name != name.lower():
        raise StoreError(where, f"{tag!r} is not a repo:tag reference")
    return f"{name}:{tg}"


def read_inputs(paths: list[Path], work: Path) -> list[InputImage]:
    """Every image of every input, layers copied into *work* as ``<diff hex>.tar``."""
    work.mkdir(parents=True, exist_ok=True)
    images: list[InputImage] = []
    for p in paths:
        if not p.exists():
            raise StoreError(str(p), "not found")
        src = _Source(p)
        try:
            if src.exists("manifest.json"):
                images += _docker_save(src, work)
            elif src.exists("index.json") and src.exists("oci-layout"):
                images += _oci(src, work)
            else:
                raise StoreError(str(p), "neither a docker save tarball (manifest.json) nor "
                                 "an OCI image layout (oci-layout, index.json)")
        finally:
            src.close()
    return images


def layer_file(work: Path, diff_id: str) -> Path:
    return _layer_path(work, diff_id)


def remove_work(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
