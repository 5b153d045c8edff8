"""A whole model's prefill at one fixed shape, captured once in a CUDA graph and replayed for new token ids.

At short and middle lengths a SEA layer is dozens of small kernels, and launching them from the host costs more
than running them (docs/benchmarks.md): a replayed graph launches nothing per kernel. Dense attention captures
the same way, so a comparison can give both the same treatment. The batch must be plain causal (no padding mask,
no cache): `sea_convert.integration._sea_mask` then hands the attention no mask even while the stream captures
(inside `known_plain_causal`), where transformers' own builder would make the full (B, 1, T, T) one.
"""

from __future__ import annotations

import torch
from torch import nn

from sea_convert.attention.decode import advance_host, host_copies, restore_host_copies, step_opens
from sea_convert.integration import attention_mode, attention_modules, known_plain_causal


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
            with torch.no_grad(), attention_mode(model, mode), known_plain_causal():  # ids only: no mask, no positions
                return model(input_ids=self.input_ids, use_cache=False, logits_to_keep=logits_to_keep).logits

        self.graph, self.logits = capture(forward, warmup)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        if tuple(input_ids.shape) != tuple(self.input_ids.shape):
            raise ValueError(f"input_ids of shape {tuple(input_ids.shape)}; this prefill was captured for"
                             f" {tuple(self.input_ids.shape)}")
        self.input_ids.copy_(input_ids)
        self.graph.replay()
        return self.logits


class CapturedDecoding:
    """Greedy decoding with a static KV cache, each step replayed from a CUDA graph (dense or SEA attention).

    A step is the model's forward on one token per sequence: its positions come from the cache's own device
    counter, the token buffer is refilled with the argmax, so the step takes no input from the host. SEA's
    block-row decoder makes one choice on the host (`decode.step_opens`: a step that opens a query block makes its
    row and selection, the others add to sums): one graph for each answer. `start` prefills the prompt and runs
    real steps eagerly until each kind of step has run once (that compiles what is compiled: at most a block of
    64 steps), then captures each kind; capturing runs the Python without the kernels, so the host's copies of
    SEA's positions are put back after it, and advanced after each replay as an eager step would.
    graphs=False runs every step eagerly through the same loop (CPU, and the reference the tests compare to).
    """

    def __init__(self, model: nn.Module, mode: str = "sea", graphs: bool = True):
        self.model, self.mode = model, mode
        self.device = next(model.parameters()).device
        if graphs and self.device.type != "cuda":
            raise ValueError(f"CapturedDecoding with graphs needs a model on a CUDA device, got {self.device}")
        self.use_graphs = graphs
        self.graphs: dict = {}
        self.block_size = attention_modules(model)[0].sea_config.block_size if mode == "sea" else None

    def start(self, input_ids: torch.Tensor, max_new_tokens: int) -> list[torch.Tensor]:
        """Prefill `input_ids` (B, T: unpadded, every sequence T tokens) into a fresh static cache of
        T + max_new_tokens slots and make the first token; then (graphs) eager steps until every kind of step has
        run, and the captures. Returns the tokens made so far, each (B, 1)."""
        from transformers import StaticCache

        T = input_ids.shape[1]
        self.cache = StaticCache(config=self.model.config, max_cache_len=T + max_new_tokens)
        self.graphs = {}
        self.left = max_new_tokens
        with torch.no_grad(), attention_mode(self.model, self.mode):
            logits = self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits
        self.token = logits[:, -1].argmax(-1, keepdim=True)  # the step's input and output buffer
        made = [self.token.clone()]
        self.left -= 1
        if not self.use_graphs:
            return made
        seen = set()
        while self.left > 0 and not self._kinds() <= seen:
            seen.add(self._kind())
            made.append(self.step())
        for kind in self._kinds() & seen:
            self.graphs[kind] = self._capture(kind)
        return made

    def step(self) -> torch.Tensor:
        """The next token (B, 1), from the graph of this step's kind when there is one."""
        if self.left <= 0:
            raise ValueError("every token of max_new_tokens is made: start a new generation")
        graph = self.graphs.get(self._kind())
        if graph is None:
            self._forward()
        else:
            graph.replay()
            for state in self._states():
                advance_host(state, self.block_size)
        self.left -= 1
        return self.token.clone()

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """input_ids followed by max_new_tokens greedy tokens, (B, T + max_new_tokens)."""
        made = self.start(input_ids, max_new_tokens)
        while self.left > 0:
            made.append(self.step())
        return torch.cat([input_ids, *made], dim=1)

    def _forward(self) -> None:
        with torch.no_grad(), attention_mode(self.model, self.mode):
            logits = self.model(input_ids=self.token, past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits
        self.token.copy_(logits[:, -1].argmax(-1, keepdim=True))

    def _states(self) -> list:
        return list(getattr(self.cache, "_sea_states", {}).values()) if self.mode == "sea" else []

    def _kind(self):
        states = self._states()
        return step_opens(states[0]) if states and states[0].residues else None

    def _kinds(self) -> set:
        """The kinds of step this generation has: SEA block rows open a block or not; everything else one kind."""
        states = self._states()
        return {True, False} if states and states[0].residues else {None}

    def _capture(self, kind) -> torch.cuda.CUDAGraph:
        """A graph of one step of `kind`; the host's copies are forced to that kind and put back (nothing runs)."""
        states = self._states()
        copies = [host_copies(state) for state in states]
        if kind is not None:
            for state in states:
                state.residues = frozenset({0} if kind else {1})
        try:
            graph, _ = capture(self._forward, warmup=0)
        finally:
            for state, saved in zip(states, copies):
                restore_host_copies(state, saved)
        return graph
