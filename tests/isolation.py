"""A test run leaves the user's machine as it found it.

Everything the suite and the processes it starts would write into the home folder or a shared /tmp
path (Ray's session folders and auth token, the datasets / HF / matplotlib / Triton / inductor caches,
Hypothesis' example database) goes to one temporary folder per pytest session instead, through the
variables those tools read. Child processes (Ray heads, Ray Train and torchrun workers) inherit them.

`HomeGuard` lists the real home's tool folders when the session starts and again when it ends; a
difference fails the run and is printed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

MARKER = "SEA_TEST_ROOT"  # set once by the first pytest process; children and nested runs reuse it

# The folders of ~ that tools write caches, settings and tokens into (what the suite once changed:
# ~/.ray/auth_token, ~/.cache/huggingface, ~/.cache/matplotlib, ~/.config/matplotlib).
WATCHED = (".ray", ".cache", ".config", ".triton", ".nv", ".local", ".keras", ".huggingface", ".matplotlib")


def isolate() -> Path:
    """Point HOME, the XDG folders and every tool cache at a fresh temporary folder; return it."""
    if os.environ.get(MARKER):
        return Path(os.environ[MARKER])
    root = Path(tempfile.mkdtemp(prefix="sea-test-"))  # short: Ray's socket paths under it must stay < 108 chars
    home = root / "home"
    home.mkdir()
    os.environ.update({
        MARKER: str(root),
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "HF_HOME": str(home / ".cache" / "huggingface"),
        "MPLCONFIGDIR": str(home / ".config" / "matplotlib"),
        "TRITON_CACHE_DIR": str(home / ".triton"),
        "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
        "RAY_TMPDIR": str(root),  # Ray's session folders: <root>/ray/session_*
    })
    return root


def cleanup(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)


def _listing(home: Path) -> dict[str, int]:
    """Every file and folder under the watched folders of `home`: relative path -> size (-1 for a folder)."""
    seen: dict[str, int] = {}
    for name in WATCHED:
        top = home / name
        if not top.exists():
            continue
        seen[name] = -1
        for folder, dirs, files in os.walk(top):
            rel = Path(folder).relative_to(home)
            for d in dirs:
                seen[str(rel / d)] = -1
            for f in files:
                try:
                    seen[str(rel / f)] = (Path(folder) / f).lstat().st_size
                except OSError:
                    pass  # gone between listing and stat: a change the final listing shows
    return seen


class HomeGuard:
    """The real home's watched folders, listed at the start and compared at the end."""

    def __init__(self, home: Path):
        self.home = home
        self.before = _listing(home)

    def changes(self) -> list[str]:
        after = _listing(self.home)
        added = sorted(set(after) - set(self.before))
        removed = sorted(set(self.before) - set(after))
        resized = sorted(p for p in set(after) & set(self.before) if after[p] != self.before[p])
        return [f"+ ~/{p}" for p in added] + [f"- ~/{p}" for p in removed] + [f"~ ~/{p} (size)" for p in resized]

    def summary(self) -> str:
        present = [n for n in WATCHED if (self.home / n).exists()]
        return (f"home check: {len(self.before)} entries under ~/{{{','.join(present)}}} of {self.home} "
                f"listed before and after the run")
