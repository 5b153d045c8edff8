"""SEA inside transformers models: the "sea" attention function, predictors in the attention modules.

Supported: LLaMA-family decoders (Llama, Mistral, Qwen2; SmolLM2 is a Llama) and OPT.
Three attention modes share one model object, since stage A never changes base weights:
  "dense"   torch SDPA (the teacher),
  "capture" dense, and each layer's q, k, v and output are kept for distillation,
  "sea"     SEA attention through each module's `sea_predictor`,
  "oracle"  sparse attention over the truly most-attended blocks at SEA's budget (the quality ceiling).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function, sdpa_mask

from kernels import dispatch
from kernels.reference_block_sparse import dense_causal_attention
from sea_convert.attention import SEAPredictor, sea_attention
from sea_convert.attention.decode import prefill
from sea_convert.attention.decode import step as decode_step
from sea_convert.attention.layer import oracle_attention
from sea_convert.recipe import SEAConfig

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "opt")
# dense is SDPA itself, registered under its own name only to take _sea_mask (no (B, 1, T, T) mask under capture)
_MODES = {"dense": "sea_dense", "capture": "sea_capture", "sea": "sea", "oracle": "sea_oracle"}


class UnsupportedArchitecture(ValueError):
    pass


def check_supported(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is not supported by SEA conversion; supported: "
            + ", ".join(SUPPORTED_ARCHITECTURES)
            + " (LLaMA-family models such as SmolLM2, Llama 2/3, Mistral, Qwen2; and OPT)"
        )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    check_supported(model.config)
    base = getattr(model, "model", model)
    return base.decoder.layers if model.config.model_type == "opt" else base.layers


def attention_modules(model: nn.Module) -> list[nn.Module]:
    return [layer.self_attn for layer in decoder_layers(model)]


def head_shape(config) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


@dataclass
class Captured:
    """One layer's teacher attention inputs and output, detached."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor  # (B, Hq, T, d)
    scale: float


_capture_sink: contextvars.ContextVar[dict | None] = contextvars.ContextVar("sea_capture_sink", default=None)


def _check_plain_causal(module, query, key, attention_mask) -> torch.Tensor | None:
    """None for a plain causal batch, else the (B, T) bool validity of each position of a padded one
    (right padding: each sequence's real tokens first; left padding: last, as for generation).

    transformers (5.x, through `sdpa_mask`) passes None when nothing is padded, and with padding a
    (B, 1, T, T) bool mask: causal and the padding keys masked out, so a pad query row cannot see
    itself and the diagonal is the validity. Anything else is refused.
    """
    if query.shape[2] != key.shape[2]:
        raise ValueError(
            "SEA attention got more keys than queries without its decoding state: incremental decoding runs"
            " through a transformers Cache passed as past_key_values (generate() does this)"
        )
    if attention_mask is None:
        return None
    B, T = query.shape[0], query.shape[2]
    if attention_mask.dtype != torch.bool or tuple(attention_mask.shape) != (B, 1, T, T):
        raise ValueError(
            f"SEA attention takes no mask or the (B, 1, T, T) bool mask of a padded batch;"
            f" got {attention_mask.dtype} {tuple(attention_mask.shape)}"
        )
    mask = attention_mask[:, 0]
    valid = mask.diagonal(dim1=-2, dim2=-1)  # (B, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()
    right = bool((valid[:, 1:] <= valid[:, :-1]).all())
    left = bool((valid[:, 1:] >= valid[:, :-1]).all())
    if not (right or left) or not torch.equal(mask, causal & valid[:, None, :]) or not bool(valid.any(-1).all()):
        raise ValueError(
            "SEA attention supports causal batches padded on one side (each sequence's real tokens in one run,"
            " first or last) with at least one real token per sequence"
        )
    return None if bool(valid.all()) else valid


def _own_positions(valid: torch.Tensor | None, B: int, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, length) per sequence: its first real slot and its real tokens."""
    if valid is None:
        return torch.zeros(B, dtype=torch.long, device=device), torch.full((B,), T, dtype=torch.long, device=device)
    return valid.int().argmax(-1), valid.sum(-1)


def _roll_rows(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Row t of sequence b <- row (t + shift[b]) mod T: a left-padded batch's real tokens to the front and back."""
    T = x.shape[2]
    idx = (torch.arange(T, device=x.device)[None, :] + shift[:, None]) % T
    return x.gather(2, idx[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


def _capture_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if _check_plain_causal(module, query, key, attention_mask) is not None:
        raise ValueError("capture (distillation targets) needs unpadded batches: pack or crop sequences to one length")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = dense_causal_attention(query, key, value, scale)
    sink = _capture_sink.get()
    if sink is not None:
        sink[module.sea_layer_idx] = Captured(query.detach(), key.detach(), value.detach(), out.detach(), scale)
    return out.transpose(1, 2), None


def _sea_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    cache = getattr(module, "_sea_cache", None)
    states = decode_states(cache) if cache is not None else None
    layer = module.sea_layer_idx
    if states is not None and layer in states:
        return _decode_forward(module, query, key, value, scale, states[layer]), None
    if states is not None and _preallocated(cache) and key.shape[2] > query.shape[2]:
        # a static cache's prefill (a generation's first forward: its states are empty): the prompt fills the
        # first T of the cache's preallocated slots; a cache holding earlier tokens SEA did not see is refused
        positions = kwargs.get("position_ids")
        if positions is not None and int(positions.min()) != 0:
            raise ValueError("SEA's decoding state is empty but this static cache holds earlier tokens (filled with"
                             " another attention, or not reset between generations): call cache.reset() first")
        T = query.shape[2]
        key, value = key[:, :, :T], value[:, :, :T]
        attention_mask = None if attention_mask is None else attention_mask[..., :T]
    valid = _check_plain_causal(module, query, key, attention_mask)
    B, T = query.shape[0], query.shape[2]
    start, length = _own_positions(valid, B, T, query.device)
    # every sequence in its own positions (real tokens first), where the right-padded path is exact; an unpadded
    # batch is there already (no gather: three copies of q, k and v at 1 GB each for a 13B layer at 128k)
    q, k, v = (query, key, value) if valid is None else (_roll_rows(x, start) for x in (query, key, value))
    own_valid = None if valid is None else torch.arange(T, device=q.device)[None, :] < length[:, None]
    if states is not None:  # the prefill of a generation: keep what decoding continues from
        res, states[layer] = prefill(q, k, v, module.sea_predictor, module.sea_config, scale,
                                     dispatch.ops(module.sea_config.backend, q.device), length, start, layer)
        if _preallocated(cache):  # the slot the first new token fills, on the device from the start (capturable steps)
            states[layer].next_slot = torch.tensor([T], device=q.device)
    else:
        res = sea_attention(q, k, v, module.sea_predictor, module.sea_config, scale, layer, valid=own_valid)
    out = res.out if valid is None else _roll_rows(res.out, -start)
    return out.to(query.dtype).transpose(1, 2), None


def _decode_forward(module, query, key, value, scale, state) -> torch.Tensor:
    """New tokens against the cache, one at a time (generate() sends one; assisted decoding more)."""
    new = query.shape[2]
    seen = state.slots
    static = _preallocated(module._sea_cache)
    fits = seen + new <= key.shape[2] if static else seen + new == key.shape[2]
    if not fits:
        raise ValueError(f"SEA decoding state covers {seen} cache slots but the cache has {key.shape[2]} with"
                         f" {new} new: SEA decodes with a growing cache (DynamicCache, generate()'s default) or a"
                         " static one (the tokens so far in its first slots), not a sliding one, nor one cropped")
    ops = dispatch.ops(module.sea_config.backend, query.device)
    outs = []
    for i in range(new):
        # a static cache is read whole (fixed shapes: the step can be captured), a growing one up to the new token
        k, v = (key, value) if static else (key[:, :, : seen + i + 1], value[:, :, : seen + i + 1])
        outs.append(decode_step(query[:, :, i : i + 1], k, v, module.sea_predictor, module.sea_config, scale, ops,
                                state))
    return torch.cat(outs, dim=2).to(query.dtype).transpose(1, 2)


def _preallocated(cache) -> bool:
    """A static cache: its slots exist before they are filled (the tokens so far are its first slots)."""
    max_length = getattr(cache, "get_max_length", None)
    return max_length is not None and (max_length() or -1) > 0


def decode_states(cache) -> dict:
    """The SEA decoding states {layer: DecodeState} that live with a transformers Cache object (so a new
    generation starts fresh, also when generate() resets and reuses a static cache). Beam search's reordering
    reorders them too; cropping is refused."""
    states = getattr(cache, "_sea_states", None)
    if states is None:
        states = cache._sea_states = {}
        reset = getattr(cache, "reset", None)
        if reset is not None:
            def reset_with_sea(*args, _reset=reset, **kwargs):
                _reset(*args, **kwargs)
                states.clear()
            cache.reset = reset_with_sea
        reorder = getattr(cache, "reorder_cache", None)
        if reorder is not None:
            def reorder_with_sea(beam_idx, _reorder=reorder):
                _reorder(beam_idx)
                for st in states.values():
                    st.select(beam_idx)
            cache.reorder_cache = reorder_with_sea
        if hasattr(cache, "crop"):
            def crop_refused(*args, **kwargs):
                raise NotImplementedError("SEA decoding cannot crop its cache (assisted decoding, prompt lookup)")
            cache.crop = crop_refused
    return states


def _remember_cache(module, args, kwargs):
    """Forward pre-hook of each attention module: the attention function is not handed the Cache, so
    the module holds it for the duration of its forward."""
    module._sea_cache = kwargs.get("past_key_values")


def _forget_cache(module, args, kwargs, output):
    module._sea_cache = None


def _oracle_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if getattr(module, "_sea_cache", None) is not None and query.shape[2] != key.shape[2]:
        raise ValueError("oracle attention is for scoring full sequences: run it with use_cache=False")
    valid = _check_plain_causal(module, query, key, attention_mask)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    start, length = _own_positions(valid, query.shape[0], query.shape[2], query.device)
    q, k, v = (_roll_rows(x, start) for x in (query, key, value))
    own_valid = None if valid is None else torch.arange(q.shape[2], device=q.device)[None, :] < length[:, None]
    out = oracle_attention(q, k, v, module.sea_config, scale, module.sea_layer_idx, valid=own_valid)
    return _roll_rows(out, -start).to(query.dtype).transpose(1, 2), None


# a plain global, not a ContextVar: dynamo traces _sea_mask inside compiled forwards and cannot read a ContextVar
_known_plain_causal = {"depth": 0}


@contextlib.contextmanager
def known_plain_causal():
    """Inside, the caller vouches that every forward is a plain causal batch: token ids only, no attention mask, no
    position ids (the model numbers the tokens 0..T-1 itself, so nothing is padded or packed). transformers checks
    those default positions for packed sequences with a read back to the host, which it skips while a CUDA graph
    captures: it then asks for the full (B, 1, T, T) mask (causal and "packed"), 16 GiB at 128k. Here _sea_mask
    knows the answer without the read (sea_convert.captured captures inside this)."""
    _known_plain_causal["depth"] += 1
    try:
        yield
    finally:
        _known_plain_causal["depth"] -= 1


def _sea_mask(*, q_length: int, kv_length: int, q_offset: int = 0, attention_mask=None,
              mask_function=causal_mask_function, allow_is_causal_skip: bool = True, local_size: int | None = None,
              **kwargs):
    """SDPA's mask builder, except that a plain causal batch (no padding mask, as many keys as queries) always
    gets None. SDPA's builder gives None there only when nothing traces: under CUDA-graph capture or
    torch.compile it builds the (B, 1, T, T) mask (16 GiB at 128k), and reading it back in _check_plain_causal is
    a host sync that breaks the capture; dense SDPA given that mask leaves FlashAttention (2x slower at 32k).
    Both attentions are causal there, so None is exact. Under known_plain_causal() the builder's "causal and not
    packed" (transformers cannot tell while capturing) counts as plain too; a sliding window (local_size) never."""
    plain = (mask_function is causal_mask_function and allow_is_causal_skip) or _known_plain_causal["depth"] > 0
    # q_length first: a cache's q_offset is a device tensor (comparing it would sync), and with a cache q_length < kv_length
    if (plain and q_length == kv_length and attention_mask is None and local_size is None
            and not isinstance(q_offset, torch.Tensor) and q_offset == 0):
        return None
    return sdpa_mask(q_length=q_length, kv_length=kv_length, q_offset=q_offset, attention_mask=attention_mask,
                     mask_function=mask_function, allow_is_causal_skip=allow_is_causal_skip, local_size=local_size,
                     **kwargs)


@functools.cache
def _eager(fn):
    return torch.compiler.disable(fn)


def register_attention_functions() -> None:
    """Idempotent. Masks: _sea_mask (None for plain causal batches) and a (B, 1, T, T) bool mask for padded
    ones (right padding is supported, see _check_plain_causal). "sea_dense" is transformers' SDPA attention with
    that mask builder: dense as the teacher runs it, and capturable at FlashAttention's speed."""
    # SEA's own functions are never traced by dynamo (compile_decoder_layers compiles around them; their Triton
    # launches and decoding state are their own fast paths); dense SDPA stays traceable, as transformers compiles it
    functions = {"sea": _eager(_sea_forward), "sea_capture": _eager(_capture_forward),
                 "sea_oracle": _eager(_oracle_forward), "sea_dense": sdpa_attention_forward}
    for name, fn in functions.items():
        AttentionInterface.register(name, fn)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, _sea_mask)


def attach_sea(model: nn.Module, cfg: SEAConfig, device: torch.device | str | None = None) -> list[SEAPredictor]:
    """Give every attention module a fresh SEA predictor (fp32, on `device`, default the model's device:
    a teacher built on the meta device passes a real one so the predictors get real weights)."""
    register_attention_functions()
    heads, kv_heads, head_dim = head_shape(model.config)
    table_len = cfg.position_table_len or model.config.max_position_embeddings
    device = device if device is not None else next(model.parameters()).device
    predictors = []
    for idx, attn in enumerate(attention_modules(model)):
        pred = SEAPredictor(cfg, heads, kv_heads, head_dim, table_len, idx).to(device)
        attn.sea_predictor = pred
        attn.sea_config = cfg
        attn.sea_layer_idx = idx
        if not hasattr(attn, "_sea_hooks"):
            attn._sea_hooks = (attn.register_forward_pre_hook(_remember_cache, with_kwargs=True),
                               attn.register_forward_hook(_forget_cache, with_kwargs=True, always_call=True))
        predictors.append(pred)
    model.config.sea = cfg.model_dump(mode="json")
    if getattr(model, "generation_config", None) is not None:
        # generate() with a static cache on a GPU would compile the whole forward in reduce-overhead mode: SEA's
        # attention is a graph break there (it keeps host-side decoding state), and CUDA-graph trees split at it
        # overwrite the rotary tables one segment hands the next (seen on an H100). SEA's decode step is compiled
        # on its own (sea.compile); sea_convert.captured.CapturedDecoding replays whole steps from CUDA graphs.
        model.generation_config.disable_compile = True
    return predictors


def compile_predictors(model: nn.Module) -> None:
    """torch.compile every predictor in place (applied from outside the layer code; CUDA only)."""
    for attn in attention_modules(model):
        attn.sea_predictor.compile()


def predictors(model: nn.Module) -> list[SEAPredictor]:
    mods = [getattr(a, "sea_predictor", None) for a in attention_modules(model)]
    if any(m is None for m in mods):
        raise ValueError("this model has no SEA predictors; call attach_sea first")
    return mods


def set_sea_config(model: nn.Module, cfg: SEAConfig) -> None:
    """Change selection settings (k, mode, blocks, backend) without touching predictor weights."""
    for attn in attention_modules(model):
        attn.sea_config = cfg
    model.config.sea = cfg.model_dump(mode="json")


@contextlib.contextmanager
def attention_mode(model: nn.Module, mode: str):
    """Run the model with "dense", "capture", "sea" or "oracle" attention inside the block."""
    if mode not in _MODES:
        raise ValueError(f"attention mode must be one of {sorted(_MODES)}, got {mode!r}")
    register_attention_functions()
    before = model.config._attn_implementation
    model.set_attn_implementation(_MODES[mode])
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


@contextlib.contextmanager
def capture_attention(model: nn.Module):
    """Dense forward passes inside the block fill the yielded dict {layer index: Captured}."""
    for idx, attn in enumerate(attention_modules(model)):
        attn.sea_layer_idx = idx
    sink: dict[int, Captured] = {}
    token = _capture_sink.set(sink)
    try:
        with attention_mode(model, "capture"):
            yield sink
    finally:
        _capture_sink.reset(token)
