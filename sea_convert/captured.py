"""A whole model's prefill at one fixed shape, captured once in a CUDA graph and replayed for new token ids.

At short and middle lengths a SEA layer is dozens of small kernels, and launching them from the host costs more
than running them (docs/benchmarks.md): a replayed graph launches nothing per kernel. Dense attention captures
the same way, so a comparison can give both the same treatment. The batch must be plain causal (no padding mask,
no cache): `sea_convert.integration._sea_mask` then hands the attention no mask even while the stream captures,
where transformers' own builder would make the full (B, 1, T, T) one.
"""

from __future__ import annotations

import torch
from torch import nn

from sea_convert.integration import attention_mode


def capture(fn, warmup: int = 3) -> tuple[torch.cuda.CUDAGraph, object]:
    """(graph, fn's output) for fn captured in a CUDA graph on the current device, after `warmup` calls on a side
    stream (they compile what torch.compile will and allocate the caches). Replaying the graph refills the output."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


class CapturedPrefill:
    """`model(input_ids).logits` for ids of one shape, from a CUDA graph.

    The returned logits are the graph's own output buffer: the next call overwrites them (clone to keep).
    logits_to_keep: the positions whose logits are made (1: the last, what generation and a prefill benchmark
    need; at 128k the full logits of a 32k vocabulary would be 16 GB)."""

    def __init__(self, model: nn.Module, batch_size: int, seq_len: int, mode: str = "sea", logits_to_keep: int = 1,
                 warmup: int = 3):
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"CapturedPrefill needs a model on a CUDA device, got {device}: call the model directly")
        self.input_ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)

        def forward() -> torch.Tensor:
            with torch.no_grad(), attention_mode(model, mode):
                return model(input_ids=self.input_ids, use_cache=False, logits_to_keep=logits_to_keep).logits

        self.graph, self.logits = capture(forward, warmup)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        if tuple(input_ids.shape) != tuple(self.input_ids.shape):
            raise ValueError(f"input_ids of shape {tuple(input_ids.shape)}; this prefill was captured for"
                             f" {tuple(self.input_ids.shape)}")
        self.input_ids.copy_(input_ids)
        self.graph.replay()
        return self.logits
