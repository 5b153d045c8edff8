"""Publishing converted checkpoints to object storage, and pulling them back, through fsspec.

`s3://bucket/prefix` goes through s3fs; a plain path is a local folder. Layout under the URI:
    versions/<UTC time>-<content hash[:12]>/...files...   a version
    versions/<version>/manifest.json                       written last: a version without it is not one
    staging/<version>-<random>/...                         uploads in progress (or abandoned)
    latest.json                                            {"version": ...}, moved only when gates pass
Publishing uploads to a staging prefix, checks every size, copies into the version folder, checks
again, and only then writes the manifest (every file with its size and sha256). A reader that goes
through the manifest therefore never sees half a checkpoint. The same content published again
is a no-op: versions are matched by the hash of their manifest's file list.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import fsspec

MANIFEST = "manifest.json"
LATEST = "latest.json"
_CHUNK = 1 << 20


class StorageError(RuntimeError):
    pass


@dataclass
class Published:
    uri: str  # the version's folder URI
    version: str
    content_hash: str
    reused: bool  # the same content was already published: nothing uploaded
    promoted: bool  # latest.json points at this version now


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def build_manifest(folder: Path) -> dict:
    """Every regular file under `folder` (sorted), with size and sha256; the content hash covers them all."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StorageError(f"checkpoint folder not found: {folder}")
    files = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files.append({"path": p.relative_to(folder).as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)})
    if not files:
        raise StorageError(f"checkpoint folder is empty: {folder}")
    content_hash = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"format": "sea-convert-manifest-v1", "content_hash": content_hash, "files": files}


def _filesystem(uri: str, storage_options: dict | None):
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return fs, root.rstrip("/")


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts))


def _uri(fs, path: str) -> str:
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def _parent_ready(fs, path: str) -> str:
    """Local folders must exist before a write; object stores have no folders (makedirs is a no-op there)."""
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    return path


def _read_json(fs, path: str) -> dict | None:
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


def list_versions(uri: str, storage_options: dict | None = None) -> list[dict]:
    """Complete versions (those with a manifest), oldest first: [{"version", "content_hash"}]."""
    fs, root = _filesystem(uri, storage_options)
    base = _join(root, "versions")
    if not fs.exists(base):
        return []
    out = []
    for entry in sorted(fs.ls(base, detail=False)):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        manifest = _read_json(fs, _join(base, name, MANIFEST))
        if manifest is not None:
            out.append({"version": name, "content_hash": manifest["content_hash"]})
    return out


def latest_version(uri: str, storage_options: dict | None = None) -> str | None:
    fs, root = _filesystem(uri, storage_options)
    pointer = _read_json(fs, _join(root, LATEST))
    return None if pointer is None else pointer["version"]


def _promote(fs, root: str, version: str, content_hash: str) -> None:
    body = json.dumps({"version": version, "content_hash": content_hash,
                       "updated": _dt.datetime.now(_dt.timezone.utc).isoformat()}).encode()
    fs.pipe_file(_parent_ready(fs, _join(root, LATEST)), body)  # one small object: readers see the old or the new pointer


def _check_sizes(fs, folder: str, files: list[dict]) -> None:
    for f in files:
        path = _join(folder, f["path"])
        try:
            size = fs.info(path)["size"]
        except FileNotFoundError:
            raise StorageError(f"{_uri(fs, path)}: missing after upload") from None
        if size != f["size"]:
            raise StorageError(f"{_uri(fs, path)}: {size} bytes after upload, expected {f['size']}")


def publish(folder: Path, uri: str, *, promote: bool, storage_options: dict | None = None,
            now: _dt.datetime | None = None, manifest: dict | None = None) -> Published:
    """Publish a checkpoint folder as a new dated version under `uri` (no-op if its content is there).
    `manifest`: the folder's `build_manifest`, when the caller has it already (hashing is the slow part)."""
    folder = Path(folder)
    manifest = dict(manifest) if manifest is not None else build_manifest(folder)
    content_hash = manifest["content_hash"]
    fs, root = _filesystem(uri, storage_options)
    for existing in list_versions(uri, storage_options):
        if existing["content_hash"] == content_hash:
            version = existing["version"]
            promoted = promote and latest_version(uri, storage_options) != version
            if promoted:
                _promote(fs, root, version, content_hash)
            return Published(_uri(fs, _join(root, "versions", version)), version, content_hash, True, promoted)

    now = now or _dt.datetime.now(_dt.timezone.utc)
    version = f"{now:%Y%m%dT%H%M%SZ}-{content_hash[:12]}"
    staging = _join(root, "staging", f"{version}-{uuid.uuid4().hex[:8]}")
    final = _join(root, "versions", version)
    for f in manifest["files"]:
        fs.put_file(str(folder / f["path"]), _parent_ready(fs, _join(staging, f["path"])))
    _check_sizes(fs, staging, manifest["files"])
    for f in manifest["files"]:
        fs.copy(_join(staging, f["path"]), _parent_ready(fs, _join(final, f["path"])))
    _check_sizes(fs, final, manifest["files"])
    manifest["version"] = version
    manifest["published"] = now.isoformat()
    fs.pipe_file(_join(final, MANIFEST), json.dumps(manifest, indent=1).encode())  # last: the version now exists
    try:
        fs.rm(staging, recursive=True)
    except FileNotFoundError:
        pass
    if promote:
        _promote(fs, root, version, content_hash)
    return Published(_uri(fs, final), version, content_hash, False, promote)


def pull(uri: str, dest: Path, *, version: str = "latest", storage_options: dict | None = None) -> dict:
    """Download a published version into `dest` (must not exist), checking every size and sha256.
    Written to a temporary sibling folder and renamed at the end: `dest` is complete or absent."""
    dest = Path(dest)
    if dest.exists():
        raise StorageError(f"destination {dest} already exists")
    fs, root = _filesystem(uri, storage_options)
    if version == "latest":
        found = latest_version(uri, storage_options)
        if found is None:
            raise StorageError(f"{uri}: no {LATEST} (nothing has passed its gates and been promoted yet)")
        version = found
    folder = _join(root, "versions", version)
    manifest = _read_json(fs, _join(folder, MANIFEST))
    if manifest is None:
        raise StorageError(f"{_uri(fs, folder)}: no manifest: not a (complete) published version")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.pull-{uuid.uuid4().hex[:8]}"
    try:
        for f in manifest["files"]:
            local = tmp / f["path"]
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(_join(folder, f["path"]), str(local))
            size, digest = local.stat().st_size, sha256_file(local)
            if size != f["size"] or digest != f["sha256"]:
                raise StorageError(f"{f['path']}: checksum mismatch after download (size {size}, sha256 {digest[:12]}...,"
                                   f" manifest {f['size']}, {f['sha256'][:12]}...)")
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return manifest
