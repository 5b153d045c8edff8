"""The Triton implementation of the ops in `kernels.dispatch.OP_NAMES`, with the reference's signatures.

`kernels.dispatch` imports this module on CUDA; an ImportError (and only that) makes it fall
back to the PyTorch reference, so a missing or broken triton is reported as ImportError.
"""

from __future__ import annotations

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as exc:  # a broken install can raise more than ImportError; dispatch expects ImportError
    raise ImportError(f"triton is not usable: {exc}") from exc

from kernels.block_estimator import block_rows_estimate
from kernels.block_sparse_attention import block_sparse_attention, block_sparse_attention_gated
from kernels.decode_step_cnn import decode_cnn_probs
from kernels.decode_step_mix import decode_mix_output
from kernels.decode_step_rows import decode_predictor_rows
from kernels.decode_step_select import decode_select_blocks
from kernels.linear_attention import block_linear_attention, causal_linear_attention
from kernels.opening_means import opening_means
from kernels.select_blocks import block_scores_from_bins, select_key_blocks
from kernels.sparse_decode import sparse_decode_attention, sparse_decode_mixed
from kernels.teacher_target import teacher_target

# Re-exported from the reference on purpose:
# - per_query_sparse_attention: the paper's faithful per-query mode, kept as the reference mode
#   (irregular key sets per row; the GPU path is block-sparse). No Triton version yet.
# - pool_key_block_scores, select_bins_per_query: O(T x K) or O(NQB x NKB)
#   elementwise work plus a sort on small tensors; bandwidth-bound and negligible next to attention.
# - decoding: linear_attention_step and spread_bins_to_key_blocks (the decode step's kernels in
#   kernels.decode_step_* fuse them), per_query_sparse_decode (the reference mode).
# - the block-row predictor's ops (block_teacher_target,
#   and its decoding: decode_block_sums, decode_block_row, decode_block_cnn_probs, decode_select_block_row):
#   the reference until their Triton versions land (issue 20).
from kernels.reference import (
    decode_block_cnn_probs,
    decode_block_row,
    decode_block_sums,
    decode_select_block_row,
    block_teacher_target,
    linear_attention_step,
    per_query_sparse_attention,
    per_query_sparse_decode,
    pool_key_block_scores,
    select_bins_per_query,
    spread_bins_to_key_blocks,
)

__all__ = [
    "block_linear_attention",
    "block_rows_estimate",
    "opening_means",
    "decode_block_cnn_probs",
    "decode_block_row",
    "decode_block_sums",
    "decode_select_block_row",
    "block_scores_from_bins",
    "block_sparse_attention",
    "block_sparse_attention_gated",
    "block_teacher_target",
    "decode_cnn_probs",
    "decode_mix_output",
    "decode_predictor_rows",
    "decode_select_blocks",
    "causal_linear_attention",
    "linear_attention_step",
    "per_query_sparse_decode",
    "sparse_decode_attention",
    "sparse_decode_mixed",
    "spread_bins_to_key_blocks",
    "per_query_sparse_attention",
    "pool_key_block_scores",
    "select_bins_per_query",
    "select_key_blocks",
    "teacher_target",
]
