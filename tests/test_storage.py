"""Publishing and pulling checkpoints: a local folder, and a real S3-protocol server on loopback (moto's
server mode, as s3fs's own tests use), including a connection dropped mid-upload."""

from __future__ import annotations

import datetime as dt
import json
import socket
import threading
from pathlib import Path

import pytest

from conftest import make_bucket, s3_options
from workers.pipeline.storage import MANIFEST, StorageError, build_manifest, latest_version, list_versions, publish, pull

pytest.importorskip("s3fs")


def _checkpoint(folder: Path, seed: int = 0) -> Path:
    folder.mkdir(parents=True)
    rng = __import__("random").Random(seed)
    (folder / "model.safetensors").write_bytes(rng.randbytes(3_000_000))
    (folder / "sea_predictors.safetensors").write_bytes(rng.randbytes(200_000))
    (folder / "config.json").write_text(json.dumps({"sea": {"k": 64}, "seed": seed}))
    (folder / "sub").mkdir()
    (folder / "sub" / "tokenizer.json").write_text("{}")
    return folder


def _options(endpoint: str) -> dict:
    return s3_options(endpoint)


@pytest.fixture
def bucket(s3_endpoint, request):
    return make_bucket(s3_endpoint, request.node.name)


def _roundtrip(tmp_path: Path, uri: str, options: dict | None):
    ck = _checkpoint(tmp_path / "ck")
    first = publish(ck, uri, promote=False, storage_options=options, now=dt.datetime(2026, 11, 22, 3, 0, tzinfo=dt.timezone.utc))
    assert not first.reused and not first.promoted
    assert first.version.startswith("20261122T030000Z-")
    assert latest_version(uri, options) is None  # not promoted: gates had not passed
    with pytest.raises(StorageError, match="no latest.json"):
        pull(uri, tmp_path / "nothing", storage_options=options)
    again = publish(ck, uri, promote=True, storage_options=options)
    assert again.reused and again.promoted and again.version == first.version  # same content: no new version
    assert [v["version"] for v in list_versions(uri, options)] == [first.version]
    assert latest_version(uri, options) == first.version
    manifest = pull(uri, tmp_path / "pulled", storage_options=options)
    assert manifest["content_hash"] == build_manifest(ck)["content_hash"]
    for f in manifest["files"]:
        assert (tmp_path / "pulled" / f["path"]).read_bytes() == (ck / f["path"]).read_bytes()
    # new content -> a new dated version; latest moves only when promoted
    other = publish(_checkpoint(tmp_path / "ck2", seed=1), uri, promote=False, storage_options=options)
    assert other.version != first.version and latest_version(uri, options) == first.version
    pull(uri, tmp_path / "pinned", version=other.version, storage_options=options)
    assert json.loads((tmp_path / "pinned" / "config.json").read_text())["seed"] == 1


def test_local_folder_publish_and_pull(tmp_path):
    _roundtrip(tmp_path, str(tmp_path / "store" / "smollm2"), None)


def test_s3_publish_and_pull(tmp_path, s3_endpoint, bucket):
    _roundtrip(tmp_path, f"s3://{bucket}/models/smollm2", _options(s3_endpoint))


def test_pull_detects_a_corrupted_file_and_leaves_nothing(tmp_path):
    store = tmp_path / "store"
    pub = publish(_checkpoint(tmp_path / "ck"), str(store), promote=True)
    target = store / "versions" / pub.version / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[1000] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(StorageError, match="model.safetensors: checksum mismatch"):
        pull(str(store), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.pull-*"))


def test_a_version_without_manifest_is_not_a_version(tmp_path):
    store = tmp_path / "store"
    pub = publish(_checkpoint(tmp_path / "ck"), str(store), promote=False)
    (store / "versions" / pub.version / MANIFEST).unlink()
    assert list_versions(str(store)) == []
    with pytest.raises(StorageError, match="no manifest"):
        pull(str(store), tmp_path / "out", version=pub.version)


class CuttingProxy:
    """A TCP proxy to the S3 server that drops every connection once `cut_after` bytes went upstream,
    and from then on closes new connections at once: a network that fails mid-upload."""

    def __init__(self, upstream_port: int, cut_after: int):
        self.upstream_port, self.cut_after = upstream_port, cut_after
        self.sent, self.broken, self.lock = 0, False, threading.Lock()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(32)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.broken:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src, dst, counts):
        try:
            while chunk := src.recv(65536):
                if counts:
                    with self.lock:
                        self.sent += len(chunk)
                        if self.sent > self.cut_after:
                            self.broken = True
                if self.broken:
                    break
                dst.sendall(chunk)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self.listener.close()


def test_connection_dropped_mid_upload_leaves_no_version_and_a_retry_completes(tmp_path, s3_endpoint, bucket):
    ck = _checkpoint(tmp_path / "ck")
    uri = f"s3://{bucket}/models/smollm2"
    proxy = CuttingProxy(int(s3_endpoint.rsplit(":", 1)[1]), cut_after=1_500_000)  # mid model.safetensors
    try:
        with pytest.raises(Exception) as err:
            publish(ck, uri, promote=True, storage_options=_options(f"http://127.0.0.1:{proxy.port}"))
        print(f"upload through the cut connection failed with {type(err.value).__name__}; {proxy.sent} bytes went up")
        assert proxy.broken
    finally:
        proxy.close()
    direct = _options(s3_endpoint)
    assert list_versions(uri, direct) == [] and latest_version(uri, direct) is None  # no manifest, no pointer
    pub = publish(ck, uri, promote=True, storage_options=direct)  # the retry
    assert not pub.reused and pub.promoted
    manifest = pull(uri, tmp_path / "pulled", storage_options=direct)
    assert len(manifest["files"]) == 4
