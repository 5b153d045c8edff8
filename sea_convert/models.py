"""Loading a pretrained teacher: a hub id, a local folder, or a GGUF file inside an installed package."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from sea_convert.integration import check_supported
from sea_convert.progress import gguf_loader_bar
from sea_convert.recipe import ModelSource

log = logging.getLogger("sea_convert")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def source_location(src: ModelSource) -> tuple[str, dict]:
    """(what from_pretrained takes, its keyword arguments) for a model source."""
    kwargs: dict = {}
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    if src.package is not None:
        spec = importlib.util.find_spec(src.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"model.package: {src.package!r} is not installed")
        return str(Path(list(spec.submodule_search_locations)[0])), kwargs
    if src.path is not None:
        return str(src.path), kwargs
    if src.revision:
        kwargs["revision"] = src.revision
    return src.hub, kwargs


def source_model(src: ModelSource, dtype: torch.dtype, config=None):
    """The source's weights as a plain transformers model. GGUF weights arrive dequantized: the loader's quantizer
    is dropped, so that the model saves as plain safetensors (with it, save_pretrained refuses). `config`: the
    source's config when the caller has read it already (a GGUF's metadata takes ~4 s to parse on 2 cores)."""
    where, kwargs = source_location(src)
    if src.gguf_file:
        gguf_loader_bar()
    if config is not None:
        kwargs["config"] = config
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, attn_implementation="sdpa", **kwargs)
    if src.gguf_file:
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def load_teacher(src: ModelSource, device: str | torch.device = "cpu"):
    """(model in eval mode with frozen weights, tokenizer). The architecture is checked before any weight loads."""
    where, kwargs = source_location(src)
    config = AutoConfig.from_pretrained(where, **kwargs)
    check_supported(config)
    # the config read once, for the check, the weights and the tokenizer: each would parse the GGUF again
    model = source_model(src, DTYPES[src.dtype], config=config)
    tokenizer = AutoTokenizer.from_pretrained(where, config=config, **kwargs)
    model.to(device).eval().requires_grad_(False)
    log.info("loaded %s (%s, %d layers)", src.describe(), config.model_type, config.num_hidden_layers)
    return model, tokenizer


def pick_device(setting: str, field: str = "distill.device") -> torch.device:
    """auto: the GPU when there is one, else the CPU; cpu, cuda or cuda:N as asked. `field` names the setting in
    errors (a ValueError for a malformed one, RuntimeError for a GPU this host lacks)."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError as err:
        raise ValueError(f"{field}: {setting!r} is not a device (auto, cpu, cuda or cuda:N)") from err
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{field}: {setting!r} is not a device (auto, cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{field} is {setting!r} but no CUDA device is available")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise RuntimeError(f"{field} is {setting!r} but this host has {torch.cuda.device_count()} CUDA device(s)")
    return device
