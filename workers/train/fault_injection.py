"""A lost worker on purpose: SIGKILL one training worker of a running stage A once it has a whole checkpoint.

The tests (tests/test_ray_train.py), the scaling benchmark (benchmarks/distributed_scaling.py, issue 25) and
scripts/service_e2e.py (issue 24) use it to show a group restarts from the newest distributed checkpoint and
ends where an uninterrupted run ends.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil

from workers.train.dist_checkpoint import DistCheckpoints

# the process that hosts a worker, per launcher: Ray Train names its actor in the process title, torchrun runs
# the worker module
WORKER_MARKERS = {"ray": "RayTrainWorker", "torchrun": "workers.train.train_worker"}


def training_workers(marker: str) -> list[psutil.Process]:
    """The training workers: processes whose command line names `marker`, the torchrun agent (whose own
    command line names the worker module too) left out."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = p.info["cmdline"] or []
        if any(marker in part for part in cmdline) and "torch.distributed.run" not in cmdline:
            found.append(p)
    return found


class KillOneWorkerAfterTheFirstCheckpoint(threading.Thread):
    """SIGKILL one training worker (a process whose command line names `marker`) as soon as the run has
    a whole checkpoint: a lost node, as far as the worker group can tell. The workers are found while
    they load the teacher, before any checkpoint, so the kill follows the first checkpoint by one poll
    (20 ms) however fast the remaining steps run. `killed`: (pid, checkpoint step), or None."""

    def __init__(self, ckpts: DistCheckpoints, marker: str, timeout_s: float = 300):
        super().__init__(daemon=True)
        self.ckpts, self.marker, self.timeout_s, self.killed = ckpts, marker, timeout_s, None

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        victims: list[psutil.Process] = []
        while time.monotonic() < deadline:
            victims = victims or training_workers(self.marker)
            newest = self.ckpts.latest() if victims else None
            if newest is not None:
                victim = next((p for p in reversed(victims) if p.is_running()), None)
                if victim is None:  # the group was replaced meanwhile: look again
                    victims = []
                    continue
                os.kill(victim.pid, signal.SIGKILL)
                self.killed = (victim.pid, newest)
                return
            time.sleep(0.02)
