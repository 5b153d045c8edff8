"""scripts/gpu_states.sh carries trained states from the device machine back here and into a later session's
machine: a state comes back whole and checked, or not at all."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_states.sh"


def states(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OUT": "/nonexistent"})


def test_a_state_goes_out_in_parts_and_comes_in_whole(tmp_path):
    there, out, kept, later = (tmp_path / d for d in ("there", "out", "kept", "later"))
    there.mkdir()
    big = os.urandom(16 * 2**20 + 123)  # over one 15-MiB part: two parts
    (there / "i22-ctx8k-A.pt").write_bytes(big)
    (there / "small.pt").write_bytes(b"predictors")
    r = states("out", "i22-ctx8k-A,small", str(there), str(out))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["MANIFEST", "i22-ctx8k-A.pt.part-a", "i22-ctx8k-A.pt.part-b",
                                                     "small.pt.part-a"]
    assert all(p.stat().st_size <= 16 * 2**20 for p in out.iterdir())  # what a call may send back
    assert states("keep", str(out), str(kept)).returncode == 0
    r = states("in", str(kept), str(later), str(tmp_path / "gathered"))
    assert r.returncode == 0 and "state i22-ctx8k-A: carried in" in r.stdout
    assert (later / "i22-ctx8k-A.pt").read_bytes() == big and (later / "small.pt").read_bytes() == b"predictors"
    assert sorted(p.name for p in later.iterdir()) == ["i22-ctx8k-A.pt", "small.pt"]


def test_a_name_kept_again_replaces_its_parts_and_others_stay(tmp_path):
    there, kept = tmp_path / "there", tmp_path / "kept"
    there.mkdir()
    for content, call in ((b"old", "1"), (b"new", "2")):
        (there / "a.pt").write_bytes(content)
        assert states("out", "a", str(there), str(tmp_path / call)).returncode == 0
    (there / "b.pt").write_bytes(b"other")
    assert states("out", "b", str(there), str(tmp_path / "3")).returncode == 0
    for call in ("1", "3", "2"):
        assert states("keep", str(tmp_path / call), str(kept)).returncode == 0
    assert len((kept / "MANIFEST").read_text().splitlines()) == 2
    later = tmp_path / "later"
    assert states("in", str(kept), str(later), str(tmp_path / "gathered")).returncode == 0
    assert (later / "a.pt").read_bytes() == b"new" and (later / "b.pt").read_bytes() == b"other"


def test_a_damaged_or_missing_state_is_named_and_left_out(tmp_path):
    there, out, kept, later = (tmp_path / d for d in ("there", "out", "kept", "later"))
    there.mkdir()
    r = states("out", "nothing-here", str(there), str(out))
    assert r.returncode == 2 and "nothing-here.pt" in r.stderr
    (there / "a.pt").write_bytes(b"state")
    assert states("out", "a", str(there), str(out)).returncode == 0
    (out / "a.pt.part-a").write_bytes(b"stale")
    r = states("keep", str(out), str(kept))
    assert r.returncode == 1 and "a.pt's parts do not match" in r.stderr
    assert states("out", "a", str(there), str(out)).returncode == 0
    assert states("keep", str(out), str(kept)).returncode == 0
    (kept / "a.pt.part-a").write_bytes(b"rot")  # damaged after keeping
    r = states("in", str(kept), str(later), str(tmp_path / "gathered"))
    assert "state a: checksum mismatch" in r.stderr and not list(later.iterdir())  # nothing half-written
    assert states("in", str(tmp_path / "no-states"), str(later)).returncode == 0  # nothing carried: nothing to do
    assert states("sideways").returncode == 2


def test_a_state_larger_than_a_call_travels_in_two_calls_each_way(tmp_path):
    """An 8k state is ~70 MB: five 15-MiB parts, more than the 64 MiB a call sends back or carries."""
    there, kept, later, gathered = (tmp_path / d for d in ("there", "kept", "later", "gathered"))
    there.mkdir()
    big = os.urandom(4 * 15 * 2**20 + 4567)  # five parts
    (there / "ctx8k.pt").write_bytes(big)
    (there / "small.pt").write_bytes(b"predictors")
    calls = []
    r = states("out", "ctx8k,small", str(there), str(tmp_path / "call1"))
    assert r.returncode == 0 and "parts 1-4 of 6 sent" in r.stdout
    assert "the rest: bash scripts/gpu_states.sh out ctx8k,small" in r.stdout and r.stdout.rstrip().endswith(" 4")
    r = states("out", "ctx8k,small", str(there), str(tmp_path / "call2"), "4")
    assert r.returncode == 0 and "parts 5-6 of 6 sent" in r.stdout and "the rest" not in r.stdout
    for call in ("call1", "call2"):
        files = list((tmp_path / call).iterdir())
        calls.append(sorted(p.name for p in files))
        assert len(files) <= 8 and sum(p.stat().st_size for p in files) <= 64 * 2**20  # what one call sends back
    assert calls[1] == ["MANIFEST", "ctx8k.pt.part-e", "small.pt.part-a"]

    r = states("keep", str(tmp_path / "call1"), str(kept))
    assert r.returncode == 0 and "4 of 5 parts kept" in r.stdout
    r = states("keep", str(tmp_path / "call2"), str(kept))
    assert r.returncode == 0 and "ctx8k.pt: all 5 parts kept and checked" in r.stdout

    r = states("plan", str(kept))
    plan = [line.split("carry ")[1].split() for line in r.stdout.splitlines()]
    assert r.returncode == 0 and len(plan) == 2
    for i, carried in enumerate(plan):  # each call carries only its paths; the parts gather in /tmp between calls
        here = tmp_path / f"carried{i}"
        here.mkdir()
        assert sum(os.path.getsize(p) for p in carried) <= 64 * 2**20
        for p in carried:
            (here / Path(p).name).write_bytes(Path(p).read_bytes())
        r = states("in", str(here), str(later), str(gathered))
        assert r.returncode == 0, r.stderr
        if i == 0:
            assert "ctx8k: 4 of 5 parts here" in r.stderr and not (later / "ctx8k.pt").exists()
    assert (later / "ctx8k.pt").read_bytes() == big and (later / "small.pt").read_bytes() == b"predictors"
    assert not list(gathered.iterdir())  # the gathered parts go once the state is whole
