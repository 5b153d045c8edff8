"""The recipe's `distill` section: stage A (the predictors against the teacher's attention), stage B
(the whole model against the teacher's outputs), and the parallel run's settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from sea_convert.recipe_fields import _at_most, _output_path, _policy, _storage_options, _storage_uri, _Strict


class StageAConfig(_Strict):
    """Stage A: frozen teacher, all layers' predictors trained from one teacher pass per batch."""

    steps: int = Field(200, ge=1)
    batch_size: int = Field(1, ge=1, description="windows per optimizer step (over all workers)")
    micro_batch_size: int | None = Field(
        None, ge=1, description="windows per teacher pass on one worker, gradients accumulated (memory ~ this); None: all"
    )
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    warmup_steps: int = Field(10, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    kl_weight: float = Field(1.0, ge=0, description="KL(teacher pooled attention || estimate)")
    output_mse_weight: float = Field(1.0, ge=0, description="MSE of SEA output vs the teacher's attention output")
    query_chunk: int = Field(256, ge=1, description="rows per chunk of the teacher target (memory ~ chunk x T)")

    _bounded_steps = field_validator("steps", "warmup_steps")(_at_most("max_steps"))
    _bounded_batch = field_validator("batch_size", "micro_batch_size")(_at_most("max_batch_size"))
    _bounded_chunk = field_validator("query_chunk")(_at_most("max_seq_len"))

    @model_validator(mode="after")
    def _some_loss(self) -> "StageAConfig":
        if self.kl_weight == 0 and self.output_mse_weight == 0:
            raise ValueError("kl_weight and output_mse_weight are both 0: nothing to train")
        return self


class StageBConfig(_Strict):
    """Stage B: end-to-end fine-tuning with the student's SEA attention in the loop.

    The teacher is the model as it was before stage B (LoRA switched off, or a frozen copy
    for `train_base: full`). Losses: logit KL and hidden-state MSE against the teacher,
    optionally the LM loss, and the estimate's KL against the student's own attention
    (keeps the predictor tracking the base weights as they move).
    """

    steps: int = Field(100, ge=1)
    batch_size: int = Field(1, ge=1, description="windows per optimizer step")
    lr: float = Field(1e-4, ge=0, description="learning rate of the SEA predictors")
    base_lr: float = Field(1e-5, ge=0, description="learning rate of the base weights (LoRA adapters or all)")
    train_base: Literal["none", "lora", "full"] = Field(
        "lora", description="none: predictors only; lora: low-rank adapters on the attention projections; full: all base weights"
    )
    lora_rank: int = Field(16, ge=1)
    lora_alpha: float = Field(32.0, gt=0, description="adapter scale = lora_alpha / lora_rank")
    lora_targets: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "out_proj"],
        min_length=1,
        description="names of the linear layers inside each attention module that get adapters (those present)",
    )
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    logit_kl_weight: float = Field(1.0, ge=0, description="KL(teacher next-token distribution || student's)")
    hidden_mse_weight: float = Field(1.0, ge=0, description="relative MSE of every layer's hidden state vs the teacher's")
    lm_weight: float = Field(0.0, ge=0, description="next-token cross-entropy on the training text: fine-tunes the "
                             "model toward that text (the dense model gains as much, docs/quality.md), so 0 for a "
                             "conversion that stays close to its teacher")
    estimate_kl_weight: float = Field(0.1, ge=0, description="KL(student's own pooled attention || estimate) per layer")
    query_chunk: int = Field(512, ge=1, description="rows per chunk of the estimate's target")

    _bounded_steps = field_validator("steps", "warmup_steps")(_at_most("max_steps"))
    _bounded_batch = field_validator("batch_size")(_at_most("max_batch_size"))
    _bounded_chunk = field_validator("query_chunk")(_at_most("max_seq_len"))
    _bounded_rank = field_validator("lora_rank")(_at_most("max_seq_len"))

    @model_validator(mode="after")
    def _something_to_do(self) -> "StageBConfig":
        if self.logit_kl_weight + self.hidden_mse_weight + self.lm_weight + self.estimate_kl_weight == 0:
            raise ValueError("every stage B loss weight is 0: nothing to train")
        if self.train_base == "none" and self.lr == 0:
            raise ValueError("train_base is none and lr is 0: nothing to train")
        return self


class ParallelConfig(_Strict):
    """Stage A over several processes (one per GPU): the frozen teacher sharded with FSDP2, the
    predictors trained data-parallel, the recipe's global batch split over the workers."""

    workers: int = Field(1, ge=1, description="training processes, one per GPU; 1 trains in the stage's own process")
    launcher: Literal["ray", "torchrun"] = Field(
        "ray", description="ray: Ray Train's TorchTrainer (restarts lost workers); torchrun: local processes"
    )
    param_dtype: Literal["bfloat16", "float16", "float32"] | None = Field(
        None, description="dtype the sharded teacher computes in (FSDP2 mixed precision); None: model.dtype"
    )
    shard_teacher: bool = Field(
        True, description="FSDP2-shard the frozen teacher over the workers; false: every worker holds it whole"
        " (small models: no all-gathers per block)"
    )
    meta_init: bool = Field(
        True, description="build the teacher on the meta device and read only each worker's shard of every"
        " weight (safetensors folders); GGUF and hub-only sources load whole on every worker, then shard"
    )
    checkpoint_uri: str | None = Field(
        None, description="where the training checkpoints (DCP) go, with 1 worker or N (a folder or"
        " s3://bucket/prefix); default: the state folder's 'dcp' subfolder"
    )
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for checkpoint_uri")
    keep_checkpoints: int = Field(2, ge=1, description="complete training checkpoints kept (oldest deleted)")
    max_failures: int = Field(3, ge=0, description="worker-group restarts after a lost worker (Ray Train or torchrun)")
    cpus_per_worker: float = Field(1, gt=0, description="CPU cores each training worker reserves")
    launch_single: bool = Field(
        False, description="with 1 worker, still run stage A under the launcher, in a worker process of its own"
        " (Ray Train restarts it if it is lost; in the stage's own process nothing does)"
    )

    @property
    def launched(self) -> bool:
        """Stage A runs in launcher workers (Ray Train or torchrun), not in the distill stage's own process."""
        return self.workers > 1 or self.launch_single

    @field_validator("checkpoint_uri")
    @classmethod
    def _uri(cls, v: str | None, info: ValidationInfo) -> str | None:
        return _storage_uri(v, info)

    @field_validator("storage_options")
    @classmethod
    def _options(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return _storage_options(v, info)

    _bounded_workers = field_validator("workers")(_at_most("max_gpus"))
    _bounded_cpus = field_validator("cpus_per_worker")(_at_most("max_cpus"))


class DistillConfig(_Strict):
    stage_a: StageAConfig = StageAConfig()
    stage_b: StageBConfig | None = Field(None, description="optional end-to-end fine-tuning after stage A")
    parallel: ParallelConfig = ParallelConfig()
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    checkpoint_every: int | None = Field(
        None, ge=1, description="save the training state every N optimizer steps (and at each stage's end)"
    )
    state_dir: Path | None = Field(
        None, description="where the training state lives; default: the output folder's name + '.state' beside it"
    )
    resume: bool = Field(True, description="continue from the training state when one matching this recipe exists")

    @field_validator("state_dir")
    @classmethod
    def _state_dir(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is not None and (policy := _policy(info)) is not None:
            return policy.state_folder(Path(v))
        return _output_path(v, info)  # relative to the cwd, like output.dir
