"""torch.compile around the attention: each decoder layer compiled, its attention function left as it is.

In a model's eager forward the work outside attention and the matrix products is a chain of memory-bound
elementwise passes: RMSNorm in fp32 (a cast, a square, a mean, two products), rotary embeddings (a negation, a
concatenation, two products and a sum for q and for k), SiLU and its product. On a LLaMA-13B-shaped layer at 32k
tokens they took ~13 ms of ~60 (H100 profile, docs/benchmarks.md), as much as SEA's whole attention. Compiled,
each chain is one or two fused kernels. The attention function is a graph break: SEA's is registered
non-traceable (its Triton kernels and decoding state are its own fast paths, `integration.register_attention_functions`),
dense SDPA is traced as transformers traces it. Applied from outside the model code, to dense and SEA alike, so
that a comparison gives both the same treatment. Shapes are static (dynamic=False): a prefill length compiles once.
"""

from __future__ import annotations

import torch
from torch import nn

from sea_convert.integration import decoder_layers, register_attention_functions

# every decoder layer shares one code object; with inline_inbuilt_nn_modules (torch's default) the layers of a
# model share a compiled graph per shape, so a few benchmark shapes stay well under this
RECOMPILE_LIMIT = 64


def compile_decoder_layers(model: nn.Module) -> None:
    """Compile every decoder layer of `model` in place (idempotent: a compiled layer is left as it is)."""
    register_attention_functions()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for layer in decoder_layers(model):
        if getattr(layer, "_compiled_call_impl", None) is None:
            layer.compile(dynamic=False)
