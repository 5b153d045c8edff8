"""Pick the kernel implementation: Triton on CUDA, the PyTorch reference elsewhere.

On the CPU the reference's ops come with one replacement: block-sparse attention from
`kernels.cpu_block_sparse`, which computes only the selected key blocks (the reference's
dense-mask version is the specification, slower than dense attention on a CPU). The
environment variable SEA_CONVERT_CPU_ATTENTION=reference keeps the plain reference there
(for comparisons). The choice is logged once per (backend, device type). A recipe can force
either with `sea.backend`; forcing Triton where it cannot run is an error, not a fallback.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

import torch

from kernels import reference

log = logging.getLogger("sea_convert.kernels")
_announced: set[tuple[str, str]] = set()

# The ops every implementation provides, with the reference's signatures.
OP_NAMES = (
    "causal_linear_attention",
    "teacher_target",
    "block_sparse_attention",
    "per_query_sparse_attention",
    "pool_key_block_scores",
    "select_key_blocks",
    "select_bins_per_query",
    # the block-row predictor (sea.predictor_rows: block; kernels.reference_block_rows)
    "block_linear_attention",
    "block_rows_estimate",
    "block_teacher_target",
    "block_scores_from_bins",
    "opening_means",
    "block_sparse_attention_gated",
    "decode_block_sums",
    "decode_block_row",
    "decode_block_cnn_probs",
    "decode_select_block_row",
    # decoding (sea_convert.attention.decode)
    "linear_attention_step",
    "spread_bins_to_key_blocks",
    "sparse_decode_attention",
    "per_query_sparse_decode",
    "decode_predictor_rows",
    "decode_cnn_probs",
    "decode_select_blocks",
    "decode_mix_output",
    "sparse_decode_mixed",
)


def _triton_module() -> ModuleType | None:
    try:
        return importlib.import_module("kernels.triton_ops")
    except ImportError:
        return None


_cpu_ops: ModuleType | None = None


def _cpu_module() -> ModuleType:
    """The reference's ops with kernels.cpu_block_sparse's block_sparse_attention in place of the
    reference's dense-mask one. Built once."""
    global _cpu_ops
    if _cpu_ops is None:
        from kernels import cpu_block_sparse, reference_block_rows

        mod = ModuleType("kernels.cpu_ops", "kernels.reference with kernels.cpu_block_sparse.block_sparse_attention")
        for name in OP_NAMES:
            setattr(mod, name, getattr(reference, name))
        mod.block_sparse_attention = cpu_block_sparse.block_sparse_attention
        mod.block_sparse_attention_gated = reference_block_rows.gated_with(cpu_block_sparse.block_sparse_attention)
        _cpu_ops = mod
    return _cpu_ops


def ops(backend: str, device: torch.device) -> ModuleType:
    """The module of ops to use for tensors on `device` under the recipe's `backend` setting."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"sea.backend must be auto, torch or triton, got {backend!r}")
    chosen, why = reference, "PyTorch reference"
    if backend == "triton" or (backend == "auto" and device.type == "cuda"):
        triton_ops = _triton_module() if device.type == "cuda" else None
        if triton_ops is not None:
            chosen, why = triton_ops, "Triton kernels"
        elif backend == "triton":
            raise RuntimeError(
                f"sea.backend is 'triton' but Triton kernels cannot run on {device.type}"
                " (they need a CUDA device and the triton package)"
            )
        else:
            why = "PyTorch reference (Triton kernels unavailable)"
    if device.type == "cpu" and os.environ.get("SEA_CONVERT_CPU_ATTENTION", "").strip().lower() != "reference":
        chosen, why = _cpu_module(), "PyTorch reference, block-sparse attention over the selected blocks only"
    key = (why, device.type)
    if key not in _announced:
        _announced.add(key)
        log.info("SEA attention on %s: %s", device.type, why)
    return chosen
