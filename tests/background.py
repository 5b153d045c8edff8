"""Self-contained checks that run as a child process from the end of collection, at the lowest CPU priority,
while the rest of the suite runs in this one.

Why: the suite leaves about half of its two cores idle (Ray heads starting, services polling, subprocesses
waited on): a full run on the 2-core machine took 20 min 13 s of wall time and 17.5 CPU-minutes. A check that
is a whole process anyway (the Triton kernels in the interpreter, pip's resolver) fills that idle core instead
of adding its own minutes. At nice 19 it takes CPU only when this process leaves some, so the timed waits of
the service tests see no more load than before.

A test asks for its child with `@pytest.mark.background(factory=...)`: `factory()` returns a `BackgroundRun`, or
None where no child should run (the test then skips itself, e.g. on a GPU, where the kernels run in process). The conftest starts every selected test's run once the
collection is final; the `background_run` fixture hands the test its run (starting it then, when the test was
selected alone), and the test waits for the result.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class BackgroundRun:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # on top of this process's environment
    whole_module: bool = False  # the child runs the test's whole module: its other tests are not run here
    outcome: str = field(default="", init=False)  # for the session's summary: the child's last line and its time
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _log: Path | None = field(default=None, init=False, repr=False)
    _started: float = field(default=0.0, init=False, repr=False)

    def start(self, log_dir: Path) -> "BackgroundRun":
        if self._proc is None:
            fd, log = tempfile.mkstemp(prefix=f"background-{self.name}-", suffix=".log", dir=log_dir)
            self._log = Path(log)
            self._started = time.monotonic()
            self._proc = subprocess.Popen(self.argv, cwd=ROOT, env={**os.environ, **self.env}, stdout=fd,
                                          stderr=subprocess.STDOUT, preexec_fn=lambda: os.nice(19))
            os.close(fd)
        return self

    def result(self, timeout_s: float) -> tuple[int, str, float]:
        """(exit code, output, seconds since the start): waits at most `timeout_s` counted from the start."""
        left = max(1.0, timeout_s - (time.monotonic() - self._started))
        try:
            rc = self._proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            self.stop()
            rc = -9
        out, seconds = self._log.read_text(errors="replace"), time.monotonic() - self._started
        last = next((line for line in reversed(out.splitlines()) if line.strip()), "(no output)")
        self.outcome = f"exit {rc} after {seconds:.0f} s: {last.strip()}"
        return rc, out, seconds

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
