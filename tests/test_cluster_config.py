"""cluster.yaml and the KubeRay RayJob, checked by Ray's own config code; no cloud is contacted.

cluster.yaml goes through what `ray up` does to a config before it talks to the provider:
``prepare_config`` (merge with the AWS defaults, per-node-type min/max workers, setup commands)
and ``validate_config`` (ray-schema.json plus the cross-field checks). The provider's own
bootstrap (IAM, subnets, key pairs) needs AWS and is left out.
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
RAYJOB_YAML = ROOT / "pipelines" / "k8s" / "rayjob.yaml"


def _cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _validated(config: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def prepared() -> dict:
    return _validated(_cluster())


def _repo_mount(config: dict) -> str:
    """The remote path that file_mounts fills with this repository."""
    mounts = [
        remote
        for remote, local in config["file_mounts"].items()
        if (ROOT / Path(local).expanduser()).resolve() == ROOT
    ]
    assert len(mounts) == 1, (
        f"file_mounts should mount the repository once: {config['file_mounts']}"
    )
    return mounts[0].rstrip("/")


def test_cluster_yaml_passes_rays_validation(prepared):
    assert prepared["provider"]["type"] == "aws"
    assert prepared["cluster_name"] == "vlray"


def test_head_is_cpu_only(prepared):
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("CPU", 0) >= 1
    assert head["resources"].get("GPU", 0) == 0
    assert head["max_workers"] == 0


def test_a_gpu_worker_type_autoscales(prepared):
    workers = {
        name: node
        for name, node in prepared["available_node_types"].items()
        if name != prepared["head_node_type"] and node["resources"].get("GPU", 0) >= 1
    }
    assert workers, "no worker node type with a GPU"
    for name, node in workers.items():
        assert 0 <= node["min_workers"] <= node["max_workers"], name
        assert node["max_workers"] >= 1, name
        assert node["max_workers"] <= prepared["max_workers"], name
        assert node["node_config"]["InstanceType"], name


def test_file_mounts_carry_the_repo_and_setup_installs_it(prepared):
    remote = _repo_mount(prepared)
    install = re.compile(rf"\bpip install\b.*\s-e\s+{re.escape(remote)}/?$")
    # prepare_config prepends setup_commands to both the head's and the workers' commands.
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any(install.search(cmd) for cmd in prepared[key]), (key, prepared[key])
    # What git ignores (.venv, demo-out) is not shipped to the nodes.
    assert ".gitignore" in prepared["rsync_filter"]
    assert ".venv/" in (ROOT / ".gitignore").read_text().split()


def test_cluster_ray_matches_the_local_ray(prepared):
    pins = re.findall(r"ray\[[a-z,]+\]==([\w.]+)", " ".join(prepared["setup_commands"]))
    assert pins == [ray.__version__], "pin the cluster's Ray to `ray --version` of the launcher"
    head_start = " ".join(prepared["head_start_ray_commands"])
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start


def test_cluster_yaml_names_an_object_store_lake():
    text = CLUSTER_YAML.read_text()
    assert re.search(r"VLRAY_LAKE=s3://\S+", text)
    assert re.search(r"--lake s3://\S+", text)


def _gpu_worker(config: dict) -> dict:
    return config["available_node_types"]["gpu_worker"]


# Each breaks one thing, and Ray's validator must say so.
BREAKERS = {
    "max_workers-not-an-integer": (
        lambda c: _gpu_worker(c).update(max_workers="many"),
        jsonschema.ValidationError,
    ),
    "unknown-top-level-key": (lambda c: c.update(gpu_count=4), jsonschema.ValidationError),
    "unknown-node-type-key": (lambda c: _gpu_worker(c).update(gpus=1), jsonschema.ValidationError),
    "fractional-gpu": (
        lambda c: _gpu_worker(c)["resources"].update(GPU=0.5),
        jsonschema.ValidationError,
    ),
    "unknown-head-type": (lambda c: c.update(head_node_type="no_such_type"), ValueError),
    "min_workers-over-global-max": (
        lambda c: _gpu_worker(c).update(min_workers=c["max_workers"] + 1),
        ValueError,
    ),
}


@pytest.mark.parametrize(("break_it", "error"), BREAKERS.values(), ids=BREAKERS.keys())
def test_broken_cluster_yaml_is_rejected(break_it, error):
    config = _cluster()
    _validated(copy.deepcopy(config))  # the unbroken copy passes
    break_it(config)
    with pytest.raises(error):
        _validated(config)


# --- KubeRay RayJob -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load(RAYJOB_YAML.read_text())


def test_rayjob_kind_and_lifecycle(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    # A generated name, so that the nightly CronJob can create it again and again.
    assert rayjob["metadata"]["generateName"]
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True


def test_rayjob_entrypoint_runs_existing_pipelines(rayjob):
    steps = [shlex.split(step) for step in rayjob["spec"]["entrypoint"].split("&&")]
    scripts = [argv[1] for argv in steps]
    assert scripts == ["pipelines/refresh.py"]
    for argv in steps:
        assert argv[0] == "python"
        assert (ROOT / argv[1]).is_file(), argv[1]
        assert (ROOT / argv[argv.index("--config") + 1]).is_file()
        assert argv[argv.index("--lake") + 1].startswith("s3://")


def test_rayjob_cluster_has_a_gpu_worker_group_on_the_local_ray(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    gpu_groups = [
        group
        for group in cluster["workerGroupSpecs"]
        if any(
            int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1
            for c in group["template"]["spec"]["containers"]
        )
    ]
    assert gpu_groups, "no worker group asks for nvidia.com/gpu"
    for group in gpu_groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    images = [head["image"]] + [
        c["image"] for g in cluster["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]
    ]
    for image in images:
        repo, tag = image.split(":")
        assert repo.startswith("rayproject/ray")
        assert tag.split("-")[0] == ray.__version__, image


def test_rayjob_runtime_env_is_valid_and_installs_vlrays_dependencies(rayjob):
    env_dict = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert set(env_dict) <= set(RuntimeEnv.known_fields)
    env = RuntimeEnv(**env_dict)  # Ray's own validation of working_dir and pip
    assert env.working_dir().endswith(".zip")
    installed = {canonicalize_name(Requirement(p).name) for p in env.pip_config()["packages"]}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {canonicalize_name(Requirement(d).name) for d in pyproject["project"]["dependencies"]}
    assert needed - {"ray"} <= installed, sorted(needed - {"ray"} - installed)
    assert "ray" not in installed  # the image's Ray, never a second one


def test_refresh_cronjob_creates_the_rayjob_nightly_one_at_a_time():
    docs = list(yaml.safe_load_all((ROOT / "pipelines/k8s/refresh-cronjob.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert {"ServiceAccount", "Role", "RoleBinding", "CronJob"} <= set(kinds)
    cron = kinds["CronJob"]["spec"]
    assert len(cron["schedule"].split()) == 5
    assert cron["concurrencyPolicy"] == "Forbid"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == kinds["ServiceAccount"]["metadata"]["name"]
    command = pod["containers"][0]["command"]
    assert command[:3] == ["kubectl", "create", "-f"]
    mount = pod["containers"][0]["volumeMounts"][0]["mountPath"]
    assert command[3] == f"{mount}/rayjob.yaml"
    rule = kinds["Role"]["rules"][0]
    assert rule["resources"] == ["rayjobs"] and "create" in rule["verbs"]
