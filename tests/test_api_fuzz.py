"""Fuzz the REST API from its own OpenAPI document (schemathesis): generated paths, queries, headers
and recipe bodies (JSON objects, YAML strings) never get a 5xx, and every error answer is a 4xx."""

from __future__ import annotations

import collections
import os
import tempfile
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from api.app import create_app  # noqa: E402
from api.settings import Settings  # noqa: E402


def _app(tmp_dir):
    return create_app(Settings(database_url=f"sqlite:///{tmp_dir / 'fuzz.db'}", admin_tokens="admin", read_tokens="reader",
                               output_root=tmp_dir / "outputs", max_body_bytes=20_000, runner="off"))


SEEN: collections.Counter = collections.Counter()  # (operation, status) over the whole run
APP = _app(Path(tempfile.mkdtemp(prefix="fuzz-", dir=os.environ["SEA_TEST_ROOT"])))  # conftest made it
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    for token in ("admin", "reader"):
        response = case.call(headers={"Authorization": f"Bearer {token}"})
        SEEN[(case.operation.label, response.status_code)] += 1
        assert response.status_code < 500, f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"


def test_the_fuzzing_reached_every_operation_with_good_and_bad_input():
    """Runs after the fuzz (file order): it sent many requests, to every operation, and got both
    answers that worked and 4xx for bad input; the figures are printed for the record."""
    ops = {op for op, _ in SEEN}
    statuses = collections.Counter()
    for (_, code), n in SEEN.items():
        statuses[code] += n
    print(f"fuzz: {sum(SEEN.values())} requests over {len(ops)} operations; statuses {dict(sorted(statuses.items()))}")
    declared = {f"{m.upper()} {path}" for path, item in APP.openapi()["paths"].items() for m in item}
    assert ops == declared, declared ^ ops
    assert sum(SEEN.values()) >= 200 and all(code < 500 for code in statuses)
    assert any(200 <= c < 300 for c in statuses) and any(400 <= c < 500 for c in statuses)
