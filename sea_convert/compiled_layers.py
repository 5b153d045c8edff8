"""torch.compile around the attention: each decoder layer's pieces compiled, its attention function left as it is.

In a model's eager forward the work outside attention and the matrix products is a chain of memory-bound
elementwise passes: RMSNorm in fp32 (a cast, a square, a mean, two products), rotary embeddings (a negation, a
concatenation, two products and a sum for q and for k), SiLU and its product. On a LLaMA-13B-shaped layer at 32k
tokens they took ~13 ms of ~60 (H100 profile, docs/benchmarks.md), as much as SEA's whole attention. Compiled,
each chain is one or two fused kernels. Applied from outside the model code, to dense and SEA alike, so that a
comparison gives both the same treatment. Shapes are static (dynamic=False): a prefill length compiles once.

What is compiled, per layer: the attention module's forward (projections, rotary embeddings, the attention call,
output projection), the two norms and the MLP. The attention function inside is a graph break: SEA's is registered
non-traceable (its Triton kernels and decoding state are its own fast paths, `integration.register_attention_functions`);
dense SDPA is traced as transformers traces it. The attention module's *forward* is compiled, not the module: its
call runs SEA's cache hooks, and dynamo guards each hook's id, so compiling through them compiled every layer apart
(SmolLM2's 30 layers passed dynamo's recompile limit on an H100 run). Without them the layers share their graphs.
"""

from __future__ import annotations

import torch
from torch import nn

from sea_convert.integration import decoder_layers, register_attention_functions

# the layers share a compiled graph per shape and attention; a few benchmark shapes x two attentions stay under this
RECOMPILE_LIMIT = 64


def compile_decoder_layers(model: nn.Module, attention: bool = True) -> None:
    """Compile every decoder layer's norms and MLP, and (attention=True) its attention forward, in place
    (idempotent). attention=False for forwards with a KV cache: the attention forward updates the cache by its
    layer index, which compiled would be a graph per layer (decoding's rotary embeddings stay eager then)."""
    register_attention_functions()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for layer in decoder_layers(model):
        attn = layer.self_attn
        if attention and "forward" not in vars(attn):  # an instance attribute: the class's forward stays as it is
            attn.forward = torch.compile(attn.forward, dynamic=False)
        for name, child in layer.named_children():
            if name != "self_attn" and child._compiled_call_impl is None and next(child.parameters(), None) is not None:
                child.compile(dynamic=False)
