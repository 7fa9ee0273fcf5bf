"""The legacy v1 layer ids and ``json`` files of a ``docker save`` tarball, as dockerd 20.10
computes them (moby ``image/tarexport/save.go`` ``saveImage``, ``image/v1`` ``CreateID``).

Per layer i of an image, a v1 image record: for every layer but the top one, an empty record
created at the epoch; for the top one, the image config decoded into moby's ``V1Image``
struct (parent, comment, created, container, container_config, docker_version, author,
config, architecture, variant, os). Its id is the sha256 of the record re-encoded with its
``id`` dropped, ``layer_id`` (the chain id) and ``parent`` (the previous layer's v1 id, as
``sha256:...``) added, keys sorted: Go's encoding/json output, which this module reproduces
(struct field order and omitempty rules, HTML-safe escaping, RFC 3339 times with trailing
zeros of the fraction dropped, case-insensitive field matching on decode).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from dmimage.docker.errors import StoreError

EPOCH = "1970-01-01T00:00:00Z"

# (Go field name, kind, omitempty): kind s string, b bool, l []string, m map, p port set,
# h *HealthConfig, i *int, v map[string]struct{}
_CONFIG = (("Hostname", "s", False), ("Domainname", "s", False), ("User", "s", False),
           ("AttachStdin", "b", False), ("AttachStdout", "b", False),
           ("AttachStderr", "b", False), ("ExposedPorts", "v", True), ("Tty", "b", False),
           ("OpenStdin", "b", False), ("StdinOnce", "b", False), ("Env", "l", False),
           ("Cmd", "L", False), ("Healthcheck", "h", True), ("ArgsEscaped", "b", True),
           ("Image", "s", False), ("Volumes", "v", False), ("WorkingDir", "s", False),
           ("Entrypoint", "L", False), ("NetworkDisabled", "b", True),
           ("MacAddress", "s", True), ("OnBuild", "l", False), ("Labels", "m", False),
           ("StopSignal", "s", True), ("StopTimeout", "i", True), ("Shell", "L", True))
_HEALTH = (("Test", "l", True), ("Interval", "n", True), ("Timeout", "n", True),
           ("StartPeriod", "n", True), ("Retries", "n", True))


class _Bad(ValueError):
    pass


def go_string(s: str) -> str:
    """A JSON string as Go's encoding/json writes it (HTML-safe)."""
    out = json.dumps(s, ensure_ascii=False)
    out = out.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    out = out.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return out.replace("\\b", "\\u0008").replace("\\f", "\\u000c")


def _field(obj: dict[str, Any], name: str) -> tuple[bool, Any]:
    """Go's decoding: an exact key match wins, else a case-insensitive one (the last)."""
    if name in obj:
        return True, obj[name]
    hit: tuple[bool, Any] = (False, None)
    for k, v in obj.items():
        if k.lower() == name.lower():
            hit = (True, v)
    return hit


def _enc(kind: str, v: Any) -> str | None:
    """Encode a decoded value of *kind*; None when it is Go's zero value for omitempty."""
    if kind == "s":
        if v is None:
            v = ""
        if not isinstance(v, str):
            raise _Bad("string")
        return go_string(v)
    if kind == "b":
        if v is None:
            v = False
        if not isinstance(v, bool):
            raise _Bad("bool")
        return "true" if v else "false"
    if kind in ("l", "L"):
        if kind == "L" and isinstance(v, str):
            v = [v]  # strslice accepts a single string
        if v is None:
            return "null"
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise _Bad("list of strings")
        return "[" + ",".join(go_string(x) for x in v) + "]"
    if kind in ("m", "v"):
        if v is None:
            return "null"
        if not isinstance(v, dict):
            raise _Bad("object")
        if kind == "m" and not all(isinstance(x, str) for x in v.values()):
            raise _Bad("string values")
        items = sorted(v.items())
        if kind == "v":
            return "{" + ",".join(f"{go_string(k)}:{{}}" for k, _ in items) + "}"
        return "{" + ",".join(f"{go_string(k)}:{go_string(x)}" for k, x in items) + "}"
    if kind in ("n", "i"):
        if v is None:
            return "null" if kind == "i" else "0"
        if isinstance(v, bool) or not isinstance(v, int):
            raise _Bad("integer")
        return str(v)
    if kind == "h":
        if v is None:
            return "null"
        if not isinstance(v, dict):
            raise _Bad("object")
        return _struct(v, _HEALTH)
    raise AssertionError(kind)


def _empty(kind: str, v: Any) -> bool:
    if v is None:
        return True
    if kind in ("s", "l", "L", "m", "v"):
        return len(v) == 0
    if kind in ("b", "n"):
        return not v
    return False  # pointers (h, i) are empty only when nil


def _struct(obj: dict[str, Any], fields: tuple[tuple[str, str, bool], ...]) -> str:
    parts = []
    for name, kind, omit in fields:
        _, v = _field(obj, name)
        if kind == "L" and isinstance(v, str):
            v = [v]
        if omit and _empty(kind, v):
            continue
        enc = _enc(kind, v)
        assert enc is not None
        parts.append(f"{go_string(name)}:{enc}")
    return "{" + ",".join(parts) + "}"


_TIME = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", re.I)


def go_time(s: Any) -> str:
    """An RFC 3339 time as Go re-encodes it (RFC3339Nano: no trailing zeros, +00:00 is Z)."""
    if not isinstance(s, str):
        raise _Bad("time")
    m = _TIME.match(s)
    if m is None:
        raise _Bad("time")
    frac = (m.group(2) or "")[:10].rstrip("0")
    if frac == ".":
        frac = ""
    zone = m.group(3).upper()
    return go_string(f"{m.group(1)}{frac}{'Z' if zone in ('Z', '+00:00', '-00:00') else zone}")


def _v1_fields(img: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(json key, encoded value) of a V1Image in struct order, ``id`` and ``parent`` left
    to the caller (both set after decoding)."""
    if img is None:
        return [("created", go_string(EPOCH)), ("container_config", _struct({}, _CONFIG))]
    out = []
    for key, kind in (("comment", "s"), ("created", "t"), ("container", "s"),
                      ("container_config", "c"), ("docker_version", "s"), ("author", "s"),
                      ("config", "C"), ("architecture", "s"), ("variant", "s"),
                      ("os", "s"), ("Size", "n")):
        present, v = _field(img, key)
        if kind == "t":
            out.append((key, go_time(v) if present and v is not None else
                        go_string("0001-01-01T00:00:00Z")))
        elif kind == "c":
            if v is not None and not isinstance(v, dict):
                raise _Bad("container_config")
            out.append((key, _struct(v or {}, _CONFIG)))
        elif kind == "C":
            if v is None:
                continue
            if not isinstance(v, dict):
                raise _Bad("config")
            out.append((key, _struct(v, _CONFIG)))
        elif not _empty(kind, v):
            enc = _enc(kind, v)
            assert enc is not None
            out.append((key, enc))
    return out


def _obj(pairs: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{go_string(k)}:{v}" for k, v in pairs) + "}"


def layer_records(config: bytes, chain_ids: list[str], where: str
                  ) -> list[tuple[str, bytes]]:
    """(v1 id, ``json`` file content) per layer of the image whose config is *config*."""
    try:
        img = json.loads(config)
        if not isinstance(img, dict):
            raise _Bad("config")
        own_parent = _field(img, "parent")[1]
        out: list[tuple[str, bytes]] = []
        parent = ""
        for i, chain in enumerate(chain_ids):
            top = i == len(chain_ids) - 1
            fields = _v1_fields(img if top else None)
            keep_parent = own_parent if top and isinstance(own_parent, str) else ""
            idmap = dict(fields)
            idmap["layer_id"] = go_string(chain)
            if parent:
                idmap["parent"] = go_string(parent)
            elif keep_parent:
                idmap["parent"] = go_string(keep_parent)
            v1 = hashlib.sha256(_obj(sorted(idmap.items())).encode()).hexdigest()
            # the layer's json: the record with its id, parent (hex) and os, struct order
            os_ = _field(img, "os")[1]
            rec = [("id", go_string(v1))]
            if parent:
                rec.append(("parent", go_string(parent.removeprefix("sha256:"))))
            elif keep_parent:
                rec.append(("parent", go_string(keep_parent)))
            rest = [(k, v) for k, v in fields if k != "os" and k != "Size"]
            size = [(k, v) for k, v in fields if k == "Size"]
            osf = [("os", go_string(os_))] if isinstance(os_, str) and os_ else []
            out.append((v1, _obj(rec + rest + osf + size).encode()))
            parent = "sha256:" + v1
        return out
    except (_Bad, ValueError) as exc:
        raise StoreError(where, f"the image config cannot be decoded as dockerd does ({exc})"
                         ) from None
