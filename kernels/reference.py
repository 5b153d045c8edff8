"""The PyTorch reference ops of SEA attention: every op of `kernels.dispatch.OP_NAMES`, with the exact
signature of its Triton counterpart, gathered from the reference modules that sit beside their kernels:

    reference_linear_attention   kernels.linear_attention
    reference_teacher_target     kernels.teacher_target (and the oracle's block attention mass)
    reference_block_sparse       kernels.block_sparse_attention, kernels.cpu_block_sparse
    reference_select             kernels.select_blocks (block scores, grouped top-k, per-query bins)
    reference_sparse_decode      kernels.sparse_decode
    reference_decode_step        kernels.decode_step_* (built on reference_predictor's row math)
    reference_gates              the output gates of the gated / mixed kernels
    reference_block_rows         the block-row predictor (sea.predictor_rows: block)

Tests compare each kernel with its reference. Every op works in query chunks so that no T x T tensor
is ever held. No reference module imports this one: it only gathers them (the ops, and the helpers
bin_starts, key_bins, blocks_to_index, block_attention_mass, dense_causal_attention).
"""

from kernels.bins import bin_starts, key_bins
from kernels.reference_block_rows import (
    block_linear_attention,
    block_rows_estimate,
    block_scores_from_bins,
    block_sparse_attention_gated,
    block_teacher_target,
    decode_block_cnn_probs,
    decode_block_row,
    decode_block_sums,
    decode_select_block_row,
    opening_means,
)
from kernels.reference_block_sparse import block_sparse_attention, dense_causal_attention, per_query_sparse_attention
from kernels.reference_decode_step import decode_cnn_probs, decode_predictor_rows, decode_select_blocks
from kernels.reference_gates import decode_mix_output
from kernels.reference_linear_attention import causal_linear_attention, linear_attention_step
from kernels.reference_select import (
    blocks_to_index,
    pool_key_block_scores,
    select_bins_per_query,
    select_key_blocks,
    spread_bins_to_key_blocks,
)
from kernels.reference_sparse_decode import per_query_sparse_decode, sparse_decode_attention, sparse_decode_mixed
from kernels.reference_teacher_target import block_attention_mass, teacher_target
