"""Fingerprints that never name where a thing lies: by key for stage outputs, by content
for everything else — so a copied or moved workspace stays current.

Files up to 256 MiB are hashed whole; larger ones by their size and 64 evenly spaced
64 KiB blocks; object-store files by their ETag (derived from the content). Chunks of a
Zarr v3 array whose codec chain ends in ``crc32c`` (every workspace array) already carry
a checksum of their own bytes: on a local disk they are fingerprinted by size and that trailing checksum,
4 bytes read per chunk instead of the whole chunk (a hand-placed 2.4 GB ``ae.zarr`` took
3.6 s to hash on every run). A chunk changed without its checksum is a damaged store,
which the read detects. Results are cached per process by (path, size, mtime, inode).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import fsspec

__all__ = ["fingerprint_path", "output_fingerprint", "stable_hash"]

_WHOLE_FILE = 256 * 2**20
_SAMPLES, _SAMPLE = 64, 64 * 1024


def stable_hash(obj: Any, n: int = 16) -> str:
    """A short, stable hash of a JSON-able object (key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def output_fingerprint(key: str, name: str) -> str:
    """Fingerprint of output ``name`` of a stage run whose key is ``key``."""
    return hashlib.sha256(f"{key}:{name}".encode()).hexdigest()[:16]


_FP_CACHE: dict[tuple, str] = {}


def _file_fingerprint(fs: Any, path: str, info: Mapping[str, Any]) -> str:
    size = int(info.get("size") or 0)
    etag = info.get("ETag") or info.get("etag")
    if etag and not _is_local_fs(fs):  # object stores: the ETag is derived from the content
        return f"etag:{str(etag).strip(chr(34))}:{size}"
    stamp = (path, size, info.get("mtime") or info.get("LastModified"), info.get("ino"))
    hit = _FP_CACHE.get(stamp)
    if hit is not None:
        return hit
    h = hashlib.blake2b(digest_size=16)
    h.update(str(size).encode())
    with fs.open(path, "rb") as f:
        if size <= _WHOLE_FILE:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            step = (size - _SAMPLE) // (_SAMPLES - 1)
            for k in range(_SAMPLES):
                f.seek(k * step)
                h.update(f.read(_SAMPLE))
    out = h.hexdigest()
    _FP_CACHE[stamp] = out
    return out


def _chunk_fingerprint(fs: Any, path: str, info: Mapping[str, Any]) -> str:
    """A crc32c-terminated Zarr chunk: its size and its own trailing checksum."""
    size = int(info.get("size") or 0)
    if size < 4:
        return _file_fingerprint(fs, path, info)
    with fs.open(path, "rb") as f:
        f.seek(size - 4)
        tail = f.read(4)
    return f"crc32c:{tail.hex()}:{size}"


def _checksummed_arrays(fs: Any, files: Mapping[str, Any]) -> set[str]:
    """Folders (with trailing ``/``) of the Zarr v3 arrays among ``files`` whose last
    codec is crc32c: each of their chunk files ends in a checksum of its bytes. A sharded
    array's last codec is ``sharding_indexed`` (its trailer checks only the index), so it
    is not one of them."""
    out: set[str] = set()
    for sub in files:
        if not sub.endswith("/zarr.json"):
            continue
        try:
            with fs.open(sub, "rb") as f:
                md = json.loads(f.read())
            codecs = md.get("codecs") or []
            last = codecs[-1].get("name") if codecs and isinstance(codecs[-1], dict) else None
        except (OSError, ValueError, AttributeError):
            continue  # not metadata we can read: its folder is hashed by content
        if md.get("node_type") == "array" and last == "crc32c":
            out.add(sub[: -len("zarr.json")])
    return out


def _is_local_fs(fs: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def fingerprint_path(path: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """Content fingerprint of a file, a folder (relative paths + content of every file)
    or an object-store URL — never of where it is, so copies fingerprint alike.

    Files up to 256 MiB are hashed whole; larger ones by size and 64 evenly spaced
    64 KiB blocks (a change elsewhere in a multi-GB tile is not seen: use ``--force``).
    Local chunks of crc32c-terminated Zarr v3 arrays use their size and own checksum.
    Object-store files use their ETag. Raises FileNotFoundError. A remote read that
    fails in passing is retried (:func:`aether_scale.storage.with_retries`).
    """
    from .. import storage

    if storage.is_url(path):
        return storage.with_retries(lambda: _fingerprint_path(path, storage_options),
                                    what=str(path))
    return _fingerprint_path(path, storage_options)


def _fingerprint_path(path: str, storage_options: Mapping[str, Any] | None) -> str:
    fs, p = fsspec.core.url_to_fs(str(path), **dict(storage_options or {}))
    if not fs.exists(p):
        raise FileNotFoundError(f"input {path} does not exist")
    h = hashlib.blake2b(digest_size=8)
    if fs.isdir(p):
        base = p.rstrip("/") + "/"
        files = fs.find(p, detail=True)
        # object stores already give each file a content ETag in the listing
        arrays = tuple(_checksummed_arrays(fs, files)) if _is_local_fs(fs) else ()
        for sub, info in sorted(files.items()):
            h.update(sub[len(base):].encode() + b"\0")
            chunk = (arrays and not sub.endswith("/zarr.json")
                     and sub[: sub.rfind("/") + 1].startswith(arrays))
            fp = _chunk_fingerprint if chunk else _file_fingerprint
            h.update(fp(fs, sub, info).encode())
        return h.hexdigest()
    h.update(_file_fingerprint(fs, p, fs.info(p)).encode())
    return h.hexdigest()
