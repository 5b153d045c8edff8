"""Incremental SEA decoding: the prefill builds a small state per layer, each new token updates it.

What a full re-run of the prefix computes for its last position, the decoder computes from:
- the estimator's running sums (kf^T [v, position] and kf; the keys' stabiliser from the first key);
- the causal CNN's last receptive_rows - 1 input rows (a ring: it sees rows t-6..t);
- block mode: the sum of the current query block's estimate rows (the prefix re-run pools the rows
  of its last, partial block: the same rows); block rows: the current block's row, made when it opened,
  and the sums that make the next block's opening window;
- the running sum of v (the output gates' mean).
It reads the KV cache only in the selected key blocks. Sequences are in their own positions: a
left-padded batch keeps each sequence's first key slot (`start`) and its length.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields

import torch

from kernels.block_budget import BlockBudget
from kernels.reference_gates import kept_from_blocks_row
from sea_convert.attention.layer import SEAOutput, sea_attention
from sea_convert.attention.predictor import SEAPredictor
from sea_convert.attention.select import block_budget, kept_from_bins_row
from sea_convert.recipe import SEAConfig


@dataclass
class DecodeState:
    """One layer's decoding state for a batch (every tensor has the batch first)."""

    shift: torch.Tensor  # (B, Hkv, 1, 1) the keys' feature stabiliser (from each sequence's first key)
    kv: torch.Tensor  # (B, Hkv, F, 2d) sum of kf^T [v, position], fp32
    norm: torch.Tensor  # (B, Hkv, F) sum of kf, fp32
    image: torch.Tensor  # (B, Hq*C, R, K/4) ring of the CNN's last R = receptive_rows - 1 input rows: position p in slot p % R
    v_sum: torch.Tensor  # (B, Hkv, 1, d) fp32
    block_sum: torch.Tensor  # (B, Hkv, K) fp32: the current query block's estimate rows, summed (block rows: its one row)
    start: torch.Tensor  # (B,) cache slot of each sequence's first key
    length: torch.Tensor  # (B,) keys so far
    # block rows (sea.predictor_rows: block): `image` rings the rows of the complete query blocks before
    # the current one (block b in slot b % R); these hold the current block
    q_tail: torch.Tensor | None = None  # (B, Hq, 1, d) fp32: sum of the current block's queries after its first
    v_tail: torch.Tensor | None = None  # (B, Hkv, 1, d) fp32: ... and values (the next opening window's other rows)
    current: torch.Tensor | None = None  # (B, Hq*C, 1, K/4): the current block's CNN input row
    gates: torch.Tensor | None = None  # (B, Hq, 1, 2) fp32: the current block's gates (with sea.output_gates)
    block_index: torch.Tensor | None = None  # (B, Hkv, MAXB) int32: the current block's selection ...
    block_count: torch.Tensor | None = None  # (B, Hkv) int32
    residues: frozenset[int] = frozenset()  # host: the sequences' positions modulo the block (no device sync)
    # host copies, so that a step needs no device sync (and can be captured in a CUDA graph)
    slots: int = 0  # cache slots covered: max(start + length); every sequence ends in the last slot
    max_length: int = 0  # max(length)
    # a static (preallocated) cache: the slot the next token's key and value fill, (1,) int64 on the device, so
    # that a step reads the whole cache at fixed shapes (None: a growing cache, the new token in its last slot)
    next_slot: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search reorders its beams)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor) and f.name != "next_slot":  # one slot for the whole batch
                setattr(self, f.name, value.index_select(0, index.to(self.start.device)))


def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, predictor: SEAPredictor, cfg: SEAConfig, scale: float,
            ops, lengths: torch.Tensor, start: torch.Tensor, layer: int = -1) -> tuple[SEAOutput, DecodeState]:
    """sea_attention over a batch in its own positions (q/k/v real rows first: lengths (B,) of them),
    and the state that continues it. start: each sequence's first slot in the KV cache."""
    B, Hq, T, d = q.shape
    Hkv = k.shape[1]
    valid = torch.arange(T, device=q.device)[None, :] < lengths[:, None]
    res = sea_attention(q, k, v, predictor, cfg, scale, layer, valid=None if bool(valid.all()) else valid, keep_image=True)
    est = predictor.estimator
    shift = est.shift(k[:, :, :1], scale)
    _, kf = est.features(q[:, :, :1], k, scale, shift=shift)
    kf = kf * valid[:, None, :, None]
    values = est.values(v)
    R = predictor.cnn.receptive_rows - 1
    image = res.estimate.image
    last = lengths - 1
    bs = cfg.block_size
    # the rows the CNN's ring keeps: the last R token rows, or (block rows) the R blocks before the last one
    now = lengths if predictor.block_rows is None else last // bs
    rows = now[:, None] - R + torch.arange(R, device=q.device)
    index = rows.clamp_min(0)[:, None, :, None].expand(-1, image.shape[1], -1, image.shape[3])
    kept_rows = image.gather(2, index).masked_fill((rows < 0)[:, None, :, None], 0.0)
    ring = torch.empty_like(kept_rows).scatter_(2, (rows % R)[:, None, :, None].expand_as(index), kept_rows)
    first = last - last % bs  # the current block's first row
    in_block = valid & (torch.arange(T, device=q.device)[None, :] >= first[:, None])
    if predictor.block_rows is None:  # the current query block's token rows, pooled
        block_sum = (_grouped(res.estimate.log_probs, Hkv) * in_block[:, None, :, None]).sum(-2)
    else:  # the current block's row
        now_rows = (last // bs)[:, None, None, None]
        block_sum = _grouped(res.estimate.log_probs.gather(2, now_rows.expand(-1, Hq, 1, cfg.predictor_length)), Hkv)[:, :, 0]
    state = DecodeState(
        shift=shift, kv=kf.transpose(-1, -2) @ values, norm=kf.sum(-2),
        image=ring,
        v_sum=(v.float() * valid[:, None, :, None]).sum(-2, keepdim=True),
        block_sum=block_sum,
        start=start.clone(), length=lengths.clone(), slots=T, max_length=int(lengths.max()),
    )
    if predictor.block_rows is not None:  # the last block's row and gates, and its rows' sums after its first
        state.current = image.gather(2, now_rows.expand(-1, image.shape[1], 1, image.shape[3])).contiguous()
        tail = in_block & (torch.arange(T, device=q.device)[None, :] > first[:, None])
        state.q_tail = (q.float() * tail[:, None, :, None]).sum(-2, keepdim=True)
        state.v_tail = (v.float() * tail[:, None, :, None]).sum(-2, keepdim=True)
        if res.estimate.gates is not None:
            state.gates = res.estimate.gates.gather(2, now_rows.expand(-1, Hq, 1, 2)).contiguous()
        # the current block's selection, as the decoder makes it (lists as wide as every step's)
        state.block_index, state.block_count, _ = _select_block_row(ops, state.block_sum, last.clone(), cfg.block_size,
                                                                    _key_blocks(predictor, cfg), block_budget(cfg))
        state.residues = frozenset(int(n) % bs for n in lengths.tolist())  # prefill syncs anyway (max_length)
    res.estimate.image = None
    return res, state


def _grouped(log_probs: torch.Tensor, Hkv: int) -> torch.Tensor:
    """(B, Hq, T, K) log-probabilities -> (B, Hkv, T, K) probabilities pooled over each KV head's group."""
    B, Hq, T, K = log_probs.shape
    return log_probs.exp().view(B, Hkv, Hq // Hkv, T, K).mean(2)


def step(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, predictor: SEAPredictor, cfg: SEAConfig,
         scale: float, ops, state: DecodeState) -> torch.Tensor:
    """One new token per sequence: q (B, Hq, 1, d); the cache (B, Hkv, S, d) with the new key and value
    in its last slot, or (state.next_slot set) a static cache's whole buffer with them in that slot.
    Returns (B, Hq, 1, d) fp32, what the prefix's full re-run gives for that row.

    Every tensor shape here is fixed for a generation (block scores cover the key blocks of the whole
    position table, masked past each sequence's own), the state is updated in place and nothing
    waits for the device: the step can be captured in a CUDA graph once and replayed."""
    table = predictor.estimator.position_values.shape[0]
    if state.max_length >= table:
        raise ValueError(f"position {state.max_length} is past the SEA position table ({table} rows);"
                         " raise sea.position_table_len")
    run = _compiled_step() if cfg.compile and q.is_cuda else _step
    out = run(q, k_cache, v_cache, predictor, cfg, scale, ops, state, _key_blocks(predictor, cfg), block_budget(cfg),
              step_opens(state))
    if state.next_slot is not None:
        state.next_slot.add_(1)
    advance_host(state, cfg.block_size)
    return out


def step_opens(state: DecodeState) -> bool:
    """Block rows: some sequence's next token opens a query block (a superset is safe). The one choice a step makes
    on the host: a captured step is captured once for each answer (sea_convert.captured.CapturedDecoding)."""
    return 0 in state.residues


def advance_host(state: DecodeState, block_size: int) -> None:
    """The host's copies after one step (the device's own are updated by the step's kernels)."""
    state.slots += 1
    state.max_length += 1
    state.residues = frozenset((r + 1) % block_size for r in state.residues)


def host_copies(state: DecodeState) -> tuple[int, int, frozenset[int]]:
    return state.slots, state.max_length, state.residues


def restore_host_copies(state: DecodeState, copies: tuple[int, int, frozenset[int]]) -> None:
    state.slots, state.max_length, state.residues = copies


def _key_blocks(predictor: SEAPredictor, cfg: SEAConfig) -> int:
    """Key blocks of the whole position table: the decoder's block scores have this fixed width."""
    return math.ceil(predictor.estimator.position_values.shape[0] / cfg.block_size)


def _select_block_row(ops, probs: torch.Tensor, length: torch.Tensor, block_size: int, key_blocks: int,
                      budget: BlockBudget):
    """decode_select_block_row at the decoder's fixed widths (key_blocks: the position table's)."""
    return ops.decode_select_block_row(probs, length, block_size, key_blocks, budget,
                                       budget.bound(key_blocks) * probs.shape[1])


@functools.cache
def _compiled_step():
    """The step's ~100 small ops fused by inductor (sea.compile on CUDA): decoding is launch-bound."""
    return torch.compile(_step, dynamic=False)


def _step(q, k_cache, v_cache, predictor: SEAPredictor, cfg: SEAConfig, scale: float, ops, state: DecodeState,
          key_blocks: int, budget: BlockBudget, opens: bool) -> torch.Tensor:
    """Five ops (see kernels.reference_decode_step; block rows: kernels.reference_block_rows): predictor rows,
    CNN row and pooled estimate, selection, sparse attention, gates; in block mode with gates the last two
    are one op. Block rows: only a step where some sequence opens a block (`opens`, known on the host) makes
    rows and selections; the others add to the sums and attend over the stored selection."""
    Hkv = k_cache.shape[1]
    if state.next_slot is None:
        k_new, v_new = k_cache[:, :, -1:], v_cache[:, :, -1:]
    else:  # a static cache: read at a slot held on the device, so the step's shapes never change
        k_new, v_new = k_cache.index_select(2, state.next_slot), v_cache.index_select(2, state.next_slot)
    if predictor.block_rows is not None:
        w = predictor.row_weights()
        if opens:
            row, _ = ops.decode_block_row(q, k_new, v_new, state.length, state.shift, state.kv, state.norm, state.v_sum,
                                          state.q_tail, state.v_tail, state.gates, w, scale, cfg.block_size)
            probs = ops.decode_block_cnn_probs(state.image, state.current, row, state.length, cfg.block_size,
                                               predictor.cnn.weights(), state.block_sum)
            index, count, kept = _select_block_row(ops, probs, state.length, cfg.block_size, key_blocks, budget)
            state.block_index.copy_(index)
            state.block_count.copy_(count)
        else:
            ops.decode_block_sums(q, k_new, v_new, state.length, state.shift, state.kv, state.norm, state.v_sum,
                                  state.q_tail, state.v_tail, w, scale, cfg.block_size)
            kept = kept_from_blocks_row(state.block_index, state.block_count, cfg.block_size, state.length)
            state.length.add_(1)
        return _attend_block_mode(q, k_cache, v_cache, cfg, scale, ops, state, state.block_index, state.block_count,
                                  kept, state.gates)
    row, gates = ops.decode_predictor_rows(q, k_new, v_new, state.length, state.shift, state.kv, state.norm, state.v_sum,
                                           predictor.row_weights(), scale)
    probs = ops.decode_cnn_probs(state.image, row, state.length, predictor.cnn.weights(), Hkv)  # (B, Hkv, K)
    if cfg.mode == "block":
        # counts the new token in: state.length is n = pos + 1 from here on
        index, count, kept = ops.decode_select_blocks(probs, state.block_sum, state.length, cfg.block_size, key_blocks,
                                                      budget, budget.bound(key_blocks) * Hkv)
        return _attend_block_mode(q, k_cache, v_cache, cfg, scale, ops, state, index, count, kept, gates)
    pos = state.length.clone()
    bin_mask = ops.select_bins_per_query(probs[:, :, None], cfg.k, rows=pos[:, None])[:, :, 0]  # (B, Hkv, K)
    kept = kept_from_bins_row(bin_mask, pos)
    state.length.add_(1)
    sparse_out, _ = ops.per_query_sparse_decode(q, k_cache, v_cache, bin_mask, scale, state.start, state.length)
    if gates is None:
        return sparse_out.float()
    return ops.decode_mix_output(sparse_out, gates, kept, state.v_sum, state.length)


def _attend_block_mode(q, k_cache, v_cache, cfg: SEAConfig, scale: float, ops, state: DecodeState, index, count, kept,
                       gates) -> torch.Tensor:
    """The new row's attention over its selected key blocks, then the gates (one op on the GPU when gated)."""
    if gates is not None:  # attention and gates in one op (one kernel fewer on the GPU)
        return ops.sparse_decode_mixed(q, k_cache, v_cache, index, count, cfg.block_size, scale, state.start,
                                       state.length, gates, kept, state.v_sum)
    sparse_out, _ = ops.sparse_decode_attention(q, k_cache, v_cache, index, count, cfg.block_size, scale,
                                                state.start, state.length)
    return sparse_out.float()
