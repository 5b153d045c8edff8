"""Progress bars that read well in a terminal and in a log: on a terminal, tqdm's bar; anywhere else
(a pipe, a file, a CI log), plain lines every `SEA_CONVERT_PROGRESS_EVERY_S` seconds (default 30),
each with the rate and the estimate tqdm computes, instead of one long line of carriage returns.
Always on stderr, so a command's --json output on stdout stays clean."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm


class _Lines:
    """A file for tqdm that ends each refresh with a newline instead of a carriage return."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        for part in text.replace("\r", "\n").split("\n"):
            if part.strip():
                self.stream.write(part.rstrip() + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """tqdm with the project's defaults (see the module docstring); kwargs go to tqdm."""
    stream = sys.stderr
    if not kwargs.get("disable") and not stream.isatty():
        every = float(os.environ.get("SEA_CONVERT_PROGRESS_EVERY_S", "30"))
        # miniters=1: every update checks the clock, so a line shows the count it says. (tqdm's monitor thread,
        # which forces a refresh after maxinterval, prints the count of the last line again while iterating.)
        kwargs = {"mininterval": every, "miniters": 1, "ncols": 100, "ascii": True, **kwargs,
                  "file": _Lines(stream), "dynamic_ncols": False, "leave": True}  # a log keeps each bar's last line
    return tqdm(iterable, **kwargs)


def quiet_library_bars() -> None:
    """Off: the carriage-return bars of transformers, huggingface_hub and datasets (loading weights, files,
    map), for output that is not a terminal. Before they are imported, their variables do it; after, their
    own switches."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()


def gguf_loader_bar() -> None:
    """transformers' GGUF loader draws a tqdm bar of its own that its switch does not reach: outside a
    terminal, it gets the project's plain lines (called before a GGUF file loads)."""
    if not sys.stderr.isatty():
        import transformers.modeling_gguf_pytorch_utils as gguf_loading

        gguf_loading.tqdm = progress_bar
