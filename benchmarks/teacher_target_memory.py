"""Peak memory of the teacher-target computation on CPU at several T (it must grow linearly).

Each T runs in a fresh process; the peak is the resident high-water mark (VmHWM, reset just
before the call through /proc/self/clear_refs) minus the resident size just before it (inputs
already allocated), so it counts the computation's own memory, output included. SmolLM2 shapes: 9 query heads,
3 KV heads, d=64, K=256. Prints a table; writes JSON with --json PATH.

    python benchmarks/teacher_target_memory.py --lengths 1024 2048 4096 --json docs/teacher_target_memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import sys, torch
from kernels.reference import teacher_target
T, chunk, K = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
q, k = torch.randn(1, 9, T, 64), torch.randn(1, 3, T, 64)
def status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident size (VmHWM) to the current one: import-time peaks drop out
before = status_kib("VmRSS")
pooled, lse = teacher_target(q, k, 0.125, K, chunk)
peak = status_kib("VmHWM")
print(before, peak, pooled.numel() * 4 // 1024)
"""


def measure(T: int, chunk: int = 256, K: int = 256) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, str(T), str(chunk), str(K)], capture_output=True, text=True, check=True)
    before, peak, out_kib = map(int, res.stdout.split())
    dense_mib = 9 * T * T * 4 / 2**20
    return {"T": T, "query_chunk": chunk, "K": K, "peak_mib": round((peak - before) / 1024, 1),
            "output_mib": round(out_kib / 1024, 1), "dense_scores_mib": round(dense_mib, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--json", type=str, default=None)
    a = ap.parse_args()
    rows = [measure(T, a.chunk) for T in a.lengths]
    print(f"{'T':>6} {'peak MiB':>9} {'of it output':>12} {'dense T x T scores MiB':>22} {'peak / T (KiB)':>14}")
    for r in rows:
        print(f"{r['T']:>6} {r['peak_mib']:>9} {r['output_mib']:>12} {r['dense_scores_mib']:>22} {r['peak_mib'] * 1024 / r['T']:>14.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": "cpu", "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
