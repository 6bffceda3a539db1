"""The deployment files in cluster/: parse, hold the fields that matter, validate where Ray can.

Quick: nothing here starts Ray or a cluster (cluster/demo.sh does, through `make cluster-demo`).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess

import pytest

yaml = pytest.importorskip("yaml")  # PyYAML comes with ray[default]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "cluster")
LAUNCHER_CONFIGS = ["ray-local.yaml", "ray-aws.yaml"]
KUBERAY = ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"]
IMAGE = re.compile(r"^rayproject/ray(-ml)?:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3\d+)(-(cpu|cu\d+|gpu))?$")


def load(name: str):
    with open(os.path.join(CLUSTER, name)) as f:
        return yaml.safe_load(f)


def test_every_yaml_parses():
    names = sorted(n for n in os.listdir(CLUSTER) if n.endswith((".yaml", ".yml")))
    assert set(LAUNCHER_CONFIGS + KUBERAY + ["runtime_env.yaml"]) <= set(names)
    for name in names:
        assert isinstance(load(name), dict), name


def _start_resources(command: str) -> dict:
    """The JSON after --resources= in a `ray start` command line."""
    m = re.search(r"--resources=(['\"]?)(\{.*?\})\1", command)
    return json.loads(m.group(2)) if m else {}


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_fields(name):
    c = load(name)
    assert c["cluster_name"]
    provider = c["provider"]
    setup = " ".join(c.get("setup_commands", []) + c.get("head_setup_commands", []))
    assert "actorgrad" in setup and "pip install" in setup, "setup_commands must install actorgrad"
    assert "torch" in setup, "setup_commands must install torch"
    # The repository the setup installs is copied to the nodes, without the local virtualenv.
    mounts = c.get("file_mounts", {})
    assert any(local in (".", "./") and "actorgrad" in remote for remote, local in mounts.items()), mounts
    assert ".venv" in c.get("rsync_exclude", [])
    if provider["type"] == "local":
        assert isinstance(provider["head_ip"], str) and provider["head_ip"]
        assert isinstance(provider["worker_ips"], list) and provider["worker_ips"]
        assert c["auth"]["ssh_user"]
        # On-prem nodes get their custom resources from `ray start --resources`.
        head = _start_resources(" ".join(c["head_start_ray_commands"]))
        worker = _start_resources(" ".join(c["worker_start_ray_commands"]))
        assert head.get("head_node", 0) > 0, c["head_start_ray_commands"]
        assert worker.get("worker_node", 0) > 0, c["worker_start_ray_commands"]
        assert any("--head" in cmd for cmd in c["head_start_ray_commands"])
        assert any("$RAY_HEAD_IP" in cmd for cmd in c["worker_start_ray_commands"])
    else:
        assert provider["type"] == "aws" and provider["region"]
        types = c["available_node_types"]
        head_type = c["head_node_type"]
        assert head_type in types
        workers = {k: v for k, v in types.items() if k != head_type}
        assert workers, "a worker node type"
        assert types[head_type]["resources"].get("head_node", 0) > 0
        for spec in types.values():
            assert spec["resources"].get("CPU", 0) > 0, spec
            assert spec["node_config"].get("InstanceType"), spec
        # ag.spawn fails fast on a custom resource no live node has: keep such workers running.
        assert all(v["resources"].get("worker_node", 0) > 0 and v.get("min_workers", 0) >= 1
                   for v in workers.values())
        assert sum(v.get("min_workers", 0) for v in workers.values()) <= c["max_workers"]
        image = c.get("docker", {}).get("image")
        if image:
            assert IMAGE.match(image), image


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_rays_own_schema(name):
    """What `ray up` checks before it touches a machine: defaults filled in, then ray-schema.json."""
    pytest.importorskip("jsonschema")
    ray = pytest.importorskip("ray")
    from ray.autoscaler._private.util import prepare_config, validate_config

    assert os.path.exists(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json"))
    prepared = prepare_config(copy.deepcopy(load(name)))
    validate_config(prepared)  # raises jsonschema.ValidationError or ValueError
    assert prepared["head_node_type"] in prepared["available_node_types"]


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _check_raycluster_spec(spec: dict) -> None:
    head = spec["headGroupSpec"]
    head_container = _containers(head["template"])[0]
    assert IMAGE.match(head_container["image"]), head_container["image"]
    assert head_container["resources"]["limits"]["cpu"]
    # rayStartParams values are strings; `resources` is JSON inside a quoted string.
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())
    assert json.loads(json.loads(head["rayStartParams"]["resources"])).get("head_node", 0) > 0
    groups = spec["workerGroupSpecs"]
    assert groups
    for g in groups:
        assert g["groupName"]
        assert isinstance(g["replicas"], int) and g["replicas"] >= 1
        assert g.get("minReplicas", 0) <= g["replicas"] <= g.get("maxReplicas", g["replicas"])
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
        custom = json.loads(json.loads(g["rayStartParams"]["resources"]))
        assert custom.get("worker_node", 0) > 0
        for c in _containers(g["template"]):
            assert c["image"] == head_container["image"], "head and workers run the same Ray"
            assert c["resources"]["limits"]["cpu"] and c["resources"]["limits"]["memory"]
    tag = IMAGE.match(head_container["image"])
    assert spec["rayVersion"] == tag.group("ray")
    assert tag.group("py").startswith("3")


def test_kuberay_raycluster():
    c = load("kuberay-raycluster.yaml")
    assert c["apiVersion"] == "ray.io/v1"
    assert c["kind"] == "RayCluster"
    assert c["metadata"]["name"]
    _check_raycluster_spec(c["spec"])


def test_kuberay_rayjob():
    c = load("kuberay-rayjob.yaml")
    assert c["apiVersion"] == "ray.io/v1"
    assert c["kind"] == "RayJob"
    spec = c["spec"]
    assert "examples/" in spec["entrypoint"] and spec["entrypoint"].startswith("python ")
    assert spec["shutdownAfterJobFinishes"] is True
    env = yaml.safe_load(spec["runtimeEnvYAML"])  # the embedded runtime env
    assert isinstance(env, dict)
    packages = env["pip"]["packages"] if isinstance(env["pip"], dict) else env["pip"]
    assert any(re.match(r"^actorgrad\b", p) for p in packages), packages
    assert any(p.startswith("torch") for p in packages), packages
    # No local directory can be uploaded by a RayJob: the working dir is a URL.
    assert re.match(r"^(https?|s3|gs)://", env["working_dir"]), env["working_dir"]
    assert "PYTHONPATH" not in env.get("env_vars", {})
    _check_raycluster_spec(spec["rayClusterSpec"])


def test_runtime_env():
    env = load("runtime_env.yaml")
    packages = env["pip"]["packages"] if isinstance(env["pip"], dict) else env["pip"]
    names = {re.split(r"[<>=!~ @\[;]", p, maxsplit=1)[0].lower() for p in packages}
    if "actorgrad" not in names:
        # Not on PyPI: its source travels with `--working-dir .` (the repository root), so the
        # excludes must keep it, and pip brings the dependencies Ray images lack.
        assert not any(e.strip("/*") == "actorgrad" for e in env["excludes"]), env["excludes"]
        assert {"msgpack", "torch"} <= names, names
    # The working dir must not drag the virtualenv or git history along.
    assert {".venv", ".git"} <= set(env["excludes"])
    # A job-level PYTHONPATH cannot be merged with the one ag.init() passes to ray.init().
    assert "PYTHONPATH" not in env.get("env_vars", {})
    assert all(isinstance(v, str) for v in env.get("env_vars", {}).values())


def test_runtime_env_is_valid_for_ray():
    """Ray's own parsing of a runtime env (what `ray job submit --runtime-env` does)."""
    pytest.importorskip("ray")
    from ray.runtime_env import RuntimeEnv

    env = load("runtime_env.yaml")
    parsed = RuntimeEnv(**env)
    assert parsed.get("pip")
    rayjob_env = yaml.safe_load(load("kuberay-rayjob.yaml")["spec"]["runtimeEnvYAML"])
    assert RuntimeEnv(**rayjob_env).get("pip")


def test_demo_script_syntax():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    script = os.path.join(CLUSTER, "demo.sh")
    subprocess.run([bash, "-n", script], check=True)
    text = open(script).read()
    assert text.startswith("#!/usr/bin/env bash")
    assert "set -euo pipefail" in text
    assert re.search(r"^trap cleanup EXIT$", text, re.M)
    assert "ray job submit" in text.replace('"$RAY" job submit', "ray job submit")
    assert "cluster/placement_job.py" in text


def test_placement_job_compiles():
    import py_compile

    py_compile.compile(os.path.join(CLUSTER, "placement_job.py"), doraise=True)
