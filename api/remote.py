"""The CLI's commands that talk to a running service over its REST API (httpx): submit, status,
logs, cancel, schedules. Server address and token come from flags or SEA_CONVERT_SERVER /
SEA_CONVERT_TOKEN. A 4xx prints the service's message and exits 2; an unreachable server exits 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import httpx
import typer
import yaml
from rich.console import Console
from rich.table import Table

console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

Server = Annotated[str, typer.Option("--server", envvar="SEA_CONVERT_SERVER", help="the service's base URL")]
Token = Annotated[str, typer.Option("--token", envvar="SEA_CONVERT_TOKEN", help="bearer token", show_default=False)]
DEFAULT_SERVER = "http://127.0.0.1:8000"
FINAL = ("succeeded", "failed", "gated", "cancelled")


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


class Service:
    def __init__(self, server: str, token: str):
        self.http = httpx.Client(base_url=server.rstrip("/"), headers={"Authorization": f"Bearer {token}"}, timeout=60)

    def call(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as err:
            _fail(f"cannot reach the service at {self.http.base_url}: {err}")
        _check(r)
        return r


def _check(r: httpx.Response) -> None:
    if r.status_code < 400:
        return
    try:
        detail = r.json().get("detail", r.text)
    except ValueError:
        detail = r.text
    if isinstance(detail, list):  # FastAPI's field errors
        detail = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail)
    _fail(f"{r.status_code}: {detail}", 2 if r.status_code < 500 else 1)


def recipe_text(path: Path) -> str:
    """The recipe as YAML with the files it reads made absolute against the recipe's folder, so the
    service (which reads them) finds the same files. Not validated here: the model and the data may
    exist only where the service runs, so the service validates it."""
    from sea_convert.recipe import Recipe, RecipeError, read_recipe_file
    from sea_convert.recipe_paths import with_input_paths_resolved

    try:
        data = read_recipe_file(path)
    except RecipeError as err:
        _fail(str(err))
    if not isinstance(data, dict):
        _fail(f"{path}: a recipe is a mapping of fields")
    return yaml.safe_dump(with_input_paths_resolved(data, Recipe, path.resolve().parent), sort_keys=False)


SHORT_ID = 12  # hex digits shown in tables; every command takes such a prefix (the service resolves it)


def _job_table(jobs: list[dict], title: str) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column("id", no_wrap=True)
    for col in ("name", "status", "stages", "created (UTC)", "artifact"):
        t.add_column(col, overflow="fold")
    for j in jobs:
        stages = " ".join(f"{s['name']}:{s['status']}" + (f"x{s['attempts']}" if s["attempts"] > 1 else "") for s in j["stages"])
        t.add_row(j["id"][:SHORT_ID], j["name"], j["status"], stages, j["created_at"][:19].replace("T", " "),
                  j.get("artifact_uri") or "")
    return t


def _progress(p: dict | None) -> str:
    if not p:
        return ""
    return f"{p['stage']}: step {p['step']} of {p['total']}" + (f", ends about {p['eta'][:19].replace('T', ' ')} UTC" if p.get("eta") else "")


def _job_detail(j: dict) -> Table:
    t = Table(title=f"job {j['id']}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    rows = [("name", j["name"]), ("status", j["status"]), ("progress", _progress(j.get("progress"))),
            ("submitted by", j.get("submitted_by") or ""), ("created", j["created_at"]), ("finished", j.get("finished_at") or "")]
    if j.get("cancelled_by"):
        rows.append(("cancelled by", j["cancelled_by"]))
    rows += [(f"stage {s['name']}", f"{s['status']} ({s['attempts']} attempt(s))" + (f": {s['error']}" if s["error"] else ""))
             for s in j["stages"]]
    p = j["metrics"].get("perplexity")
    if p:
        rows.append(("perplexity", f"teacher {p['teacher_ppl']:.3f}, SEA {p['sea_ppl']:.3f} (x{p['ppl_ratio']:.4f}), "
                                   f"density {p['density']:.3f}"))
    m = j["metrics"].get("mmlu")
    if m:
        rows.append(("MMLU", f"teacher {m['teacher_accuracy']:.4f}, SEA {m['sea_accuracy']:.4f}"))
    rows += [("error", j["error"] or ""), ("artifact", j.get("artifact_uri") or ""), ("log", j.get("log_uri") or "")]
    for k, v in rows:
        t.add_row(k, v)
    return t


def _follow(svc: Service, job_id: str) -> dict:
    with out.status(f"following job {job_id} (Ctrl-C stops following, not the job)"):
        try:
            with svc.http.stream("GET", f"/v1/jobs/{job_id}/logs", params={"follow": True}, timeout=None) as r:
                if r.status_code >= 400:
                    r.read()
                    _check(r)
                for line in r.iter_lines():
                    out.print(line, markup=False, highlight=False)
        except httpx.HTTPError as err:
            _fail(f"log stream from {svc.http.base_url} broke: {err}")
    return svc.call("GET", f"/v1/jobs/{job_id}").json()


def register(app: typer.Typer) -> None:
    @app.command()
    def submit(
        recipe: Annotated[Path, typer.Argument(help="recipe YAML file")],
        follow: Annotated[bool, typer.Option("--follow", "-f", help="stream the job's log until it ends")] = False,
        idempotency_key: Annotated[Optional[str], typer.Option(help="the same key never submits twice")] = None,
        server: Server = DEFAULT_SERVER, token: Token = "",
    ) -> None:
        """Submit a recipe to the service. Relative file paths in it are sent as absolute paths."""
        svc = Service(server, token)
        headers = {"Content-Type": "application/yaml"} | ({"Idempotency-Key": idempotency_key} if idempotency_key else {})
        r = svc.call("POST", "/v1/jobs", content=recipe_text(recipe), headers=headers)
        job = r.json()
        out.print(f"job {job['id']} {'submitted' if r.status_code == 201 else 'already submitted with this key'}: {job['status']}")
        if follow:
            job = _follow(svc, job["id"])
            out.print(_job_detail(job))
            if job["status"] != "succeeded":
                raise typer.Exit(1)

    @app.command()
    def status(
        job: Annotated[Optional[str], typer.Argument(help="a job id; none: list jobs")] = None,
        state: Annotated[Optional[str], typer.Option("--status", help="only jobs in this state")] = None,
        limit: Annotated[int, typer.Option(min=1, max=200)] = 20,
        as_json: Annotated[bool, typer.Option("--json")] = False,
        server: Server = DEFAULT_SERVER, token: Token = "",
    ) -> None:
        """One job in detail, or the newest jobs as a table."""
        svc = Service(server, token)
        if job is not None:
            data = svc.call("GET", f"/v1/jobs/{job}").json()
            out.print_json(json.dumps(data)) if as_json else out.print(_job_detail(data))
            return
        params = {"limit": limit} | ({"status": state} if state else {})
        page = svc.call("GET", "/v1/jobs", params=params).json()
        if as_json:
            out.print_json(json.dumps(page))
        else:
            out.print(_job_table(page["items"], f"jobs ({len(page['items'])} of {page['total']})"))

    @app.command()
    def logs(
        job: Annotated[str, typer.Argument(help="job id")],
        follow: Annotated[bool, typer.Option("--follow", "-f", help="stream new lines until the job ends")] = False,
        server: Server = DEFAULT_SERVER, token: Token = "",
    ) -> None:
        """A job's log; with --follow, stream it and end with the job's summary."""
        svc = Service(server, token)
        if not follow:
            print(svc.call("GET", f"/v1/jobs/{job}/logs").text, end="")
            return
        out.print(_job_detail(_follow(svc, job)))

    @app.command()
    def cancel(job: Annotated[str, typer.Argument(help="job id")], server: Server = DEFAULT_SERVER, token: Token = "") -> None:
        """Cancel a queued or running job (its Ray job is stopped)."""
        data = Service(server, token).call("POST", f"/v1/jobs/{job}/cancel").json()
        out.print(f"job {data['id']}: {data['status']}")

    schedules = typer.Typer(help="nightly (any cron) re-distillation of a recipe", no_args_is_help=True)
    app.add_typer(schedules, name="schedules")

    @schedules.command("add")
    def schedules_add(
        name: Annotated[str, typer.Argument(help="schedule name")],
        recipe: Annotated[Path, typer.Argument(help="recipe YAML file")],
        cron: Annotated[str, typer.Option(help="cron expression, e.g. '0 2 * * *'")],
        timezone: Annotated[str, typer.Option(help="IANA time zone")] = "UTC",
        server: Server = DEFAULT_SERVER, token: Token = "",
    ) -> None:
        svc = Service(server, token)
        s = svc.call("POST", "/v1/schedules", params={"name": name, "cron": cron, "timezone": timezone},
                     content=recipe_text(recipe), headers={"Content-Type": "application/yaml"}).json()
        out.print(f"schedule {s['id']} ({s['name']}): {s['cron']} {s['timezone']}")

    @schedules.command("list")
    def schedules_list(as_json: Annotated[bool, typer.Option("--json")] = False,
                       server: Server = DEFAULT_SERVER, token: Token = "") -> None:
        found = Service(server, token).call("GET", "/v1/schedules").json()
        if as_json:
            out.print_json(json.dumps(found))
            return
        t = Table(title="schedules", title_justify="left")
        t.add_column("id", no_wrap=True)
        for col in ("name", "cron", "timezone", "enabled", "last fired (UTC)"):
            t.add_column(col)
        for s in found:
            t.add_row(s["id"][:SHORT_ID], s["name"], s["cron"], s["timezone"], str(s["enabled"]),
                      (s["last_fired_at"] or "")[:19].replace("T", " "))
        out.print(t)

    @schedules.command("rm")
    def schedules_rm(schedule: Annotated[str, typer.Argument(help="schedule id (or the start of it)")],
                     server: Server = DEFAULT_SERVER, token: Token = "") -> None:
        svc = Service(server, token)
        matches = [s["id"] for s in svc.call("GET", "/v1/schedules").json() if s["id"].startswith(schedule)]
        if len(matches) != 1:
            _fail(f"schedule id {schedule!r} matches {len(matches)} schedules: give more of it")
        schedule = matches[0]
        svc.call("DELETE", f"/v1/schedules/{schedule}")
        out.print(f"schedule {schedule} removed")
