"""Programmatic dependent launch (PDL) for the decode step's chain of small kernels (Hopper and later).

A decode step is about ten dependent launches of a few microseconds each, and between two of them
the GPU idles while the next grid is launched. With PDL a kernel lets the next one launch as soon
as it starts (griddepcontrol.launch_dependents); the next one's programs then wait
(griddepcontrol.wait) until it has finished and its writes are visible. Every kernel calls
`wait_for_predecessor` before its first load, so the order and the results are those of plain
launches; only the launch latency is hidden. Off on the CPU interpreter, before sm90, and with
SEA_NO_PDL=1.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


def enabled(device: torch.device) -> bool:
    """Whether kernels launched on `device` use PDL."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("SEA_NO_PDL") == "1":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


@triton.jit
def wait_for_predecessor(PDL: tl.constexpr):
    """First statement of a PDL kernel: wait for the kernel before, then let the one after launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
