"""The image build steps without a Docker engine (none runs here): the same script the Dockerfiles run,
docker/install.sh, in fresh virtual environments. The API image's set is installed for real and its
entry modules imported (with no torch); the GPU image's set (about 3 GB of CUDA wheels) is resolved
and hash-checked against the index by uv's dry run. The lock files agree with the tested versions."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / "docker" / "install.sh"


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s;\\]+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    res = subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "PYTHON": sys.executable})  # the machine's index and CA settings
    print(res.stdout[-1500:], res.stderr[-1500:])
    return res


def test_lock_files_hold_every_dependency_at_the_tested_version():
    tested = _pins(ROOT / "requirements" / "constraints.txt")
    gpu, api = (_pins(ROOT / "requirements" / f"lock-{name}.txt") for name in ("gpu", "api"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [re.split(r"[<>=\[ ;]", d, maxsplit=1)[0].lower()
              for d in project["dependencies"] + project["optional-dependencies"]["service"] + ["triton"]]
    assert sorted(set(wanted) - set(gpu)) == []
    assert gpu["torch"] == "2.13.0"  # the version scripts/install.sh pins for the tests
    for lock in (gpu, api):
        drift = {n: (v, tested[n]) for n, v in lock.items() if n in tested and n != "triton" and tested[n] != v}
        assert drift == {}, drift
    assert "torch" not in api and {"fastapi", "ray", "sqlalchemy", "s3fs"} <= set(api)
    text = (ROOT / "requirements" / "lock-gpu.txt").read_text()
    assert text.count("--hash=sha256:") >= len(gpu)  # every pin hash-locked


def test_api_image_steps_install_the_locked_set_and_the_service_imports_without_torch(tmp_path):
    res = _run(["api", str(tmp_path / "venv")], timeout=900)
    assert res.returncode == 0
    assert "api environment ready" in res.stdout
    out = subprocess.run([str(tmp_path / "venv" / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
                         capture_output=True, text=True, check=True).stdout
    installed = {line.split("==")[0].lower().replace("_", "-") for line in out.splitlines() if "==" in line}
    assert "torch" not in installed and "ray" in installed and "fastapi" in installed


def test_gpu_image_steps_resolve_and_hash_check_the_locked_set(tmp_path):
    res = _run(["gpu", str(tmp_path / "venv"), "--dry-run"], timeout=900)
    assert res.returncode == 0
    report = res.stdout + res.stderr
    for pkg in ("torch==2.13.0", "triton==3.7.1", "ray==2.60.0", "nvidia-cudnn-cu13", "sea-convert"):
        assert pkg in report, pkg
    assert not (tmp_path / "venv" / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" /
                "site-packages" / "torch").exists()  # a dry run installs nothing


def test_install_script_refuses_an_unknown_image(tmp_path):
    res = _run(["cpu", str(tmp_path / "venv")], timeout=60)
    assert res.returncode == 2 and "lock-cpu.txt" in res.stderr
    assert not (tmp_path / "venv").exists()
