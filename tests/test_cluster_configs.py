"""cluster/: every manifest parses, and the fields that decide whether a GPU cluster works are right.

Fast and offline: nothing is launched. The cluster launcher config also goes through Ray's own
schema and consistency checks (what `ray up` runs before touching AWS); the KubeRay manifests'
pod templates through Kubernetes' own schema (kubernetes-validate), their Ray fields and the
Dockerfile field by field. Every Ray version written in cluster/ must agree with the
installed Ray, so upgrading Ray without updating the images fails here rather than on a cluster.
"""
from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
AWS_CONFIG = CLUSTER / "aws-gpu.yaml"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"

RAY_MAJOR_MINOR = tuple(int(p) for p in ray.__version__.split(".")[:2])
_VERSION = re.compile(r"(\d+)\.(\d+)\.(\d+)")


def _load_all(path: Path) -> list:
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def _load_one(path: Path) -> dict:
    docs = _load_all(path)
    assert len(docs) == 1, f"{path.name}: expected one YAML document, found {len(docs)}"
    return docs[0]


def _image_ray_version(image: str) -> str:
    """The Ray version an image reference is built on, e.g. '2.60.0'.

    rayproject/ray tags start with it (`2.60.0-py311-gpu`); our own images carry it as
    `ray<version>` (`0.1.0-ray2.60.0-py311-gpu`).
    """
    repo, _, tag = image.rpartition(":")
    assert repo and "/" not in tag, f"image {image!r} has no explicit tag (':latest' drifts)"
    pattern = r"^(\d+\.\d+\.\d+)(?:-|$)" if repo.endswith("rayproject/ray") else r"ray(\d+\.\d+\.\d+)"
    match = re.search(pattern, tag)
    assert match, f"image {image!r}: no Ray version in its tag"
    return match.group(1)


def _major_minor(version: str) -> tuple[int, int]:
    match = _VERSION.match(version)
    assert match, f"not a Ray version: {version!r}"
    return int(match.group(1)), int(match.group(2))


def _assert_gpu_image(image: str) -> None:
    assert re.search(r"-(gpu|cu\d+)(?:-|$)", image.rpartition(":")[2]), \
        f"image {image!r} is not a GPU (-gpu / -cuXXX) build"


# --- every file ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*.yaml")), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_parses(path):
    docs = _load_all(path)
    assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected mapping documents"


def test_one_ray_version_everywhere():
    """Image tags, rayVersion, the Dockerfile's FROM and the versions in comments and the README
    all name one Ray, that of this install."""
    versions = {}
    for path in [AWS_CONFIG, RAYCLUSTER, RAYJOB, DOCKERFILE, CLUSTER / "README.md"]:
        text = path.read_text()
        for image in re.findall(r"(?:image:|FROM)\s+(\S+:\S+)", text):
            versions[f"{path.name}: {image}"] = _image_ray_version(image.strip("\"'`"))
        for v in re.findall(r"rayVersion:\s*[\"']?([\d.]+)", text):
            versions[f"{path.name}: rayVersion"] = v
        # Docs and comments too: rayproject/ray:X tags, ray==X pins, our ...-rayX tags.
        for v in re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)|ray(?:\[[\w,]+\])?==(\d+\.\d+\.\d+)"
                            r"|-ray(\d+\.\d+\.\d+)", text):
            versions[f"{path.name}: {''.join(v)} (text)"] = "".join(v)
    assert versions
    assert len(set(versions.values())) == 1, f"Ray versions disagree: {versions}"
    (version,) = set(versions.values())
    assert _major_minor(version) == RAY_MAJOR_MINOR, \
        f"cluster/ targets Ray {version}, installed Ray is {ray.__version__}: update both together"


# --- Ray cluster launcher (AWS) ------------------------------------------------------------------

@pytest.fixture(scope="module")
def aws():
    return _load_one(AWS_CONFIG)


def test_aws_config_passes_rays_own_validation(aws):
    """The schema and consistency checks `ray up` applies before it calls AWS."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(aws)))


def test_aws_head_is_cpu_only_and_schedules_nothing(aws):
    types = aws["available_node_types"]
    assert aws["head_node_type"] in types
    head = types[aws["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must advertise CPU 0 so no task lands on it"
    assert head["resources"].get("GPU", 0) == 0
    assert not re.match(r"(g|p)\d", head["node_config"]["InstanceType"]), "the head needs no GPU instance"


def test_aws_worker_types(aws):
    types = aws["available_node_types"]
    workers = {name: t for name, t in types.items() if name != aws["head_node_type"]}
    gpu = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) > 0}
    cpu = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) == 0}

    assert any(t["resources"]["GPU"] == 1 for t in gpu.values()), "no single-GPU worker type"
    assert any(t["resources"]["GPU"] >= 4 for t in gpu.values()), "no multi-GPU worker type for DDP"
    assert cpu, "no CPU-only worker type for decoding"
    for name, t in types.items():
        # node_config is free-form for Ray's schema: a misspelt key only fails at launch time.
        assert re.fullmatch(r"[a-z]\w*\.\w+", t["node_config"].get("InstanceType", "")), \
            f"{name}: node_config has no valid InstanceType"
    for name, t in workers.items():
        # Autoscaling from zero: nothing runs (or bills) until there is demand.
        assert t.get("min_workers", 0) == 0, f"{name}: min_workers must be 0"
        assert t["max_workers"] >= 1, f"{name}: max_workers must allow at least one node"
        # Workers read and write S3 through an instance profile (Ray gives one to the head only).
        assert "IamInstanceProfile" in t["node_config"], f"{name}: no IamInstanceProfile for S3"
    for name, t in gpu.items():
        assert t["resources"].get("CPU", 0) > 0, f"{name}: declare its CPUs along with its GPUs"
        run_options = t.get("docker", {}).get("worker_run_options", [])
        assert "--gpus all" in run_options, f"{name}: GPU container without --gpus all"
    # The global cap must not silently cut the per-type caps.
    assert aws["max_workers"] >= sum(t["max_workers"] for t in workers.values())


def test_aws_nodes_start_from_the_prebuilt_image(aws):
    image = aws["docker"]["image"]
    assert _major_minor(_image_ray_version(image)) == RAY_MAJOR_MINOR
    _assert_gpu_image(image)
    # cluster/Dockerfile's image (same tag as KubeRay's), not Ray's bare image plus ~4 GB of
    # wheels installed on every node start.
    assert not image.startswith("rayproject/"), f"{image}: nodes must start from our prebuilt image"
    assert image == _cluster_spec(RAYCLUSTER)[1]["headGroupSpec"]["template"]["spec"][
        "containers"][0]["image"]
    installs = [c for c in aws.get("setup_commands") or [] if "pip install" in c]
    assert all("--no-deps" in c for c in installs), f"per-node installs pull dependencies: {installs}"
    assert aws["idle_timeout_minutes"] <= 30, "idle GPU nodes should not linger"


def test_aws_gpu_nodes_pin_a_driver_for_cuda13_torch_and_check_cuda_at_start(aws):
    """torch 2.14 (CUDA 13.0 build) needs driver >= 580: latest_dlami maps to an Ubuntu 18.04 AMI
    with a far older one. Each GPU node checks torch.cuda.is_available() when it starts."""
    types = aws["available_node_types"]
    gpu = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) > 0}
    text = (CLUSTER / "aws-gpu.yaml").read_text()
    assert "driver >= 580" in text and "CUDA 12 wheels" not in text
    for name, t in gpu.items():
        assert t["node_config"]["ImageId"] != "latest_dlami", f"{name}: pin an AMI (driver >= 580)"
        assert any("selfment_dist.model.cuda_check" in c for c in t.get("worker_setup_commands", [])), \
            f"{name}: no CUDA check at node start"
        assert any("preflight.sh host --gpu" in c for c in t.get("initialization_commands", [])), \
            f"{name}: no driver check on the host before the container starts"
    import selfment_dist.model.cuda_check  # noqa: F401  (the module the nodes run exists)


# --- KubeRay -------------------------------------------------------------------------------------

def _cluster_spec(path: Path) -> tuple[dict, dict]:
    """(the document, its RayCluster spec): a RayJob embeds one as spec.rayClusterSpec."""
    doc = _load_one(path)
    return doc, doc["spec"]["rayClusterSpec"] if doc.get("kind") == "RayJob" else doc["spec"]


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _gpus(container: dict) -> int:
    resources = container.get("resources", {})
    limit = int(resources.get("limits", {}).get("nvidia.com/gpu", 0))
    request = resources.get("requests", {}).get("nvidia.com/gpu")
    # Kubernetes rejects extended resources whose request differs from the limit.
    assert request is None or int(request) == limit, f"{container['name']}: GPU request != limit"
    return limit


@pytest.mark.parametrize("path,kind", [(RAYCLUSTER, "RayCluster"), (RAYJOB, "RayJob")],
                         ids=["raycluster", "rayjob"])
def test_kuberay_cluster_spec(path, kind):
    doc, spec = _cluster_spec(path)
    name = path.name
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == kind
    assert _major_minor(str(spec["rayVersion"])) == RAY_MAJOR_MINOR
    assert spec["enableInTreeAutoscaling"] is True

    head = spec["headGroupSpec"]
    groups = [head, *spec["workerGroupSpecs"]]
    for group in groups:
        # KubeRay's CRD types rayStartParams as map[string]string: `num-cpus: 0` fails to apply.
        params = group.get("rayStartParams", {})
        bad = {k: v for k, v in params.items() if not isinstance(v, str)}
        assert not bad, f"{name}: rayStartParams values must be strings: {bad}"
    assert head["rayStartParams"].get("num-cpus") == "0", f"{name}: the head must schedule nothing"
    assert all(_gpus(c) == 0 for c in _containers(head))

    gpu_groups = [g for g in spec["workerGroupSpecs"] if any(_gpus(c) > 0 for c in _containers(g))]
    cpu_groups = [g for g in spec["workerGroupSpecs"] if all(_gpus(c) == 0 for c in _containers(g))]
    assert gpu_groups, f"{name}: no worker group requests nvidia.com/gpu"
    assert cpu_groups, f"{name}: no CPU-only worker group"
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0, f"{name}/{group['groupName']}: minReplicas must be 0"
        assert group["maxReplicas"] >= 1
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]

    for group in gpu_groups:  # a GPU pod refuses to start when torch cannot use its GPU
        checks = group["template"]["spec"].get("initContainers", [])
        assert any("preflight.sh gpu" in " ".join(c.get("command", []))
                   and c.get("command", [])[-1].endswith("python -m selfment_dist.model.cuda_check")
                   and _gpus(c) == max(_gpus(k) for k in _containers(group))
                   for c in checks), f"{name}/{group['groupName']}: no driver/CUDA check before Ray"

    images = {c["image"] for g in groups for c in _containers(g)}
    assert len(images) == 1, f"{name}: head and workers must run one image, found {images}"
    (image,) = images
    assert _major_minor(_image_ray_version(image)) == RAY_MAJOR_MINOR
    _assert_gpu_image(image)


@pytest.fixture(scope="module")
def rayjob():
    return _load_one(RAYJOB)["spec"]


def test_rayjob_runs_the_pipeline(rayjob):
    argv = shlex.split(rayjob["entrypoint"])
    assert argv[:2] == ["python", "jobs/pipeline.py"], rayjob["entrypoint"]
    assert "--config" in argv, "the pipeline takes its settings from --config FILE.yaml"
    config = argv[argv.index("--config") + 1]
    assert config.startswith("jobs/configs/") and config.endswith((".yaml", ".yml")), config
    assert (ROOT / config).is_file(), f"the RayJob runs {config}, which does not exist"
    assert (ROOT / "jobs" / "pipeline.py").is_file()


def test_rayjob_runtime_env_and_lifetime(rayjob):
    runtime_env = yaml.safe_load(rayjob["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict)
    env_vars = runtime_env["env_vars"]
    assert "HF_HOME" in env_vars
    assert all(isinstance(v, str) for v in env_vars.values()), "runtime_env env_vars must be strings"
    # The submitter pod runs the head's image; working_dir is where that image holds the project.
    workdirs = re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), flags=re.M)
    assert runtime_env["working_dir"] == workdirs[-1], "working_dir is not the image's project dir"
    # The cluster (and its GPUs) goes away when the job ends, and a hung run is stopped.
    assert rayjob["shutdownAfterJobFinishes"] is True
    assert isinstance(rayjob["ttlSecondsAfterFinished"], int) and rayjob["ttlSecondsAfterFinished"] >= 0
    assert isinstance(rayjob["activeDeadlineSeconds"], int) and rayjob["activeDeadlineSeconds"] > 0


# --- Dockerfile ----------------------------------------------------------------------------------

def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())  # join continued lines
    lines = [ln.strip() for ln in text.splitlines()]
    return [tuple(ln.split(None, 1)) for ln in lines if ln and not ln.startswith("#")]


def test_dockerfile_base_image():
    froms = [arg for op, arg in _dockerfile_instructions() if op.upper() == "FROM"]
    assert len(froms) == 1, f"expected one FROM, found {froms}"
    image = froms[0].split()[0]
    assert image.startswith("rayproject/ray:"), image
    assert _major_minor(_image_ray_version(image)) == RAY_MAJOR_MINOR
    assert image.rpartition(":")[2].endswith("-gpu"), f"{image}: use Ray's -gpu image"
    # Without a -pyXY tag the image falls back to Ray's oldest supported Python.
    py = re.search(r"-py3(\d+)-", image)
    assert py, f"{image}: pin the Python version (-py311)"
    requires = re.search(r'requires-python\s*=\s*">=3\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert int(py.group(1)) >= int(requires.group(1)), f"{image}: Python older than requires-python"


def test_dockerfile_names_the_cuda_build_it_installs():
    text = (CLUSTER / "Dockerfile").read_text()
    assert "driver >= 580" in text and "CUDA 13.0" in text
    runs = " ".join(arg for op, arg in _dockerfile_instructions() if op.upper() == "RUN")
    assert "torch.version.cuda" in runs, "the build does not check the torch CUDA build"


def test_dockerfile_installs_the_project_and_prefetch_is_off_by_default():
    instructions = _dockerfile_instructions()
    runs = " ".join(arg for op, arg in instructions if op.upper() == "RUN")
    assert re.search(r"pip install\b[^&;]*\s\.(\s|$)", runs), "no `pip install .` of the project"
    args = dict(arg.split("=", 1) for op, arg in instructions if op.upper() == "ARG" and "=" in arg)
    assert args.get("PREFETCH_BACKBONES") in ('""', "''", ""), "hub-weight prefetch must be off by default"


def test_dockerfile_copies_existing_paths():
    for op, arg in _dockerfile_instructions():
        if op.upper() != "COPY":
            continue
        sources = [s for s in arg.split()[:-1] if not s.startswith("--")]
        for src in sources:
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"


def test_readme_points_at_existing_files():
    text = (CLUSTER / "README.md").read_text()
    paths = set(re.findall(r"\bcluster/[\w./-]+\.(?:yaml|md)|\bcluster/Dockerfile\b", text))
    assert paths
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"cluster/README.md names missing files: {missing}"


# --- issue 27: launchable as shipped (AMIs, registry, pre-flight, schemas) -----------------------

PREFLIGHT = CLUSTER / "preflight.sh"
IMAGE_PLACEHOLDER = "registry.example.com/"


def test_aws_config_matches_rays_cluster_schema(aws):
    """ray/autoscaler/ray-schema.json, the schema `ray up` validates against (also inside
    validate_config above; here on its own so that a schema error names the field)."""
    import jsonschema
    import ray.autoscaler

    schema = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(aws, json.loads(schema.read_text()))
    bad = copy.deepcopy(aws)
    bad["available_node_types"]["ray.worker.cpu"]["max_worker"] = 3  # a typo must fail
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, json.loads(schema.read_text()))


def test_every_aws_node_type_uses_one_current_ami(aws):
    """No Ubuntu 18.04 `latest_dlami` anywhere: head, CPU and GPU types share one AMI id (a YAML
    anchor), the base OSS NVIDIA-driver DLAMI the comment names; the placeholder fails `ray up`
    at the head's launch and the config pre-flight before it."""
    ids = {name: t["node_config"]["ImageId"] for name, t in aws["available_node_types"].items()}
    assert len(set(ids.values())) == 1, f"node types use different AMIs: {ids}"
    text = AWS_CONFIG.read_text()
    assert "latest_dlami" not in re.sub(r"#.*", "", text)
    assert "base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id" in text
    assert "ImageId: &ami" in text


def test_every_host_runs_the_preflight_and_logs_in_to_the_registry(aws):
    """initialization_commands run on the host before the image is pulled: the head and CPU
    types use the global list, each GPU type its own with --gpu; all name the config's image,
    and the script is the file mount that Ray syncs to the host's mount folder first."""
    from ray.autoscaler.sdk import get_docker_host_mount_location

    image = aws["docker"]["image"]
    (target,) = [t for t, src in aws["file_mounts"].items() if src == "cluster/preflight.sh"]
    on_host = get_docker_host_mount_location(aws["cluster_name"]) + target
    head = f"bash {on_host} host --image {image}"
    assert aws["initialization_commands"] == [head]
    types = aws["available_node_types"]
    for name, t in types.items():
        commands = t.get("initialization_commands", aws["initialization_commands"])
        gpu = t["resources"].get("GPU", 0) > 0
        assert commands == [f"bash {on_host} host{' --gpu' if gpu else ''} --image {image}"], name
    iam = json.loads((CLUSTER / "iam" / "ecr-read-policy.json").read_text())
    actions = {a for st in iam["Statement"] for a in np.atleast_1d(st["Action"])}
    assert {"ecr:GetAuthorizationToken", "ecr:BatchGetImage",
            "ecr:GetDownloadUrlForLayer"} <= actions
    readme = (CLUSTER / "README.md").read_text()
    assert "cluster/iam/ecr-read-policy.json" in readme and "docker login" in readme


def _fake_bin(tmp_path: Path, driver: str) -> dict:
    """PATH with fake nvidia-smi / docker / aws that log their calls."""
    import os

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "calls"
    scripts = {
        "nvidia-smi": f'case "$*" in *driver_version*) echo {driver};; '
                      f'*compute_cap*) echo 8.6;; esac',
        "docker": f'echo "docker $*" >> {log}; cat > /dev/null',
        "aws": f'echo "aws $*" >> {log}; echo token',
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def _preflight(*args: str, env: dict | None = None):
    import subprocess

    return subprocess.run(["bash", str(PREFLIGHT), *args], capture_output=True, text=True,
                          env=env, timeout=60)


@pytest.mark.parametrize("driver, ok", [("535.104.05", False), ("570.172.08", False),
                                        ("580.65.06", True), ("590.10", True)])
def test_preflight_refuses_a_driver_older_than_580(tmp_path, driver, ok):
    env = _fake_bin(tmp_path, driver)
    for args in (["host", "--gpu"], ["gpu"]):
        result = _preflight(*args, env=env)
        assert (result.returncode == 0) == ok, result.stderr
        if not ok:
            assert "older than 580" in result.stderr


def test_preflight_logs_in_to_ecr_and_refuses_placeholder_images(tmp_path):
    env = _fake_bin(tmp_path, "580.65.06")
    ecr = "111122223333.dkr.ecr.us-west-2.amazonaws.com/selfment-dist:0.1.0"
    assert _preflight("host", "--image", ecr, env=env).returncode == 0
    calls = (tmp_path / "calls").read_text()
    assert "aws ecr get-login-password --region us-west-2" in calls
    assert "docker login --username AWS --password-stdin 111122223333.dkr" in calls
    placeholder = _preflight("host", "--image", IMAGE_PLACEHOLDER + "x:1", env=env)
    assert placeholder.returncode == 1 and "placeholder" in placeholder.stderr


@pytest.mark.parametrize("path", [AWS_CONFIG, RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_preflight_config_check_fails_as_shipped_and_passes_once_set(tmp_path, path):
    assert _preflight("config", str(path)).returncode == 1   # placeholders: not launchable yet
    mine = tmp_path / path.name
    mine.write_text(path.read_text()
                    .replace("ami-SET-ME-base-oss-nvidia-driver-580", "ami-0123456789abcdef0")
                    .replace(IMAGE_PLACEHOLDER, "111122223333.dkr.ecr.us-west-2.amazonaws.com/"))
    result = _preflight("config", str(mine))
    assert result.returncode == 0, result.stderr


# A small structural schema of the KubeRay v1 fields these manifests use, written from KubeRay's
# v1 API reference (ray.io/v1 RayCluster / RayJob; the CRDs themselves are not installed here).
# Unknown keys are refused at the levels described, so a misspelt field fails here rather than
# being dropped by `kubectl apply` (KubeRay's CRDs prune unknown fields).
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_POD_TEMPLATE = {
    "type": "object", "required": ["spec"],
    "properties": {"spec": {"type": "object", "required": ["containers"], "properties": {
        "containers": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/container"}},
        "initContainers": {"type": "array", "items": {"$ref": "#/$defs/container"}},
        "tolerations": {"type": "array"}, "serviceAccountName": {"type": "string"},
    }}},
}
_GROUP = {"rayStartParams": _STR_MAP, "template": _POD_TEMPLATE,
          "serviceType": {"type": "string"}}
_RAY_CLUSTER_SPEC = {
    "type": "object", "additionalProperties": False,
    "required": ["headGroupSpec", "rayVersion"],
    "properties": {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {"type": "object", "additionalProperties": False, "properties": {
            "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
            "idleTimeoutSeconds": {"type": "integer", "minimum": 0}}},
        "headGroupSpec": {"type": "object", "additionalProperties": False,
                          "required": ["template"], "properties": _GROUP},
        "workerGroupSpecs": {"type": "array", "items": {
            "type": "object", "additionalProperties": False,
            "required": ["groupName", "template"],
            "properties": {**_GROUP, "groupName": {"type": "string"},
                           "replicas": {"type": "integer", "minimum": 0},
                           "minReplicas": {"type": "integer", "minimum": 0},
                           "maxReplicas": {"type": "integer", "minimum": 0}}}},
    },
}
_CONTAINER = {
    "type": "object", "required": ["name", "image"],
    "properties": {
        "name": {"type": "string"}, "image": {"type": "string"},
        "command": {"type": "array", "items": {"type": "string"}},
        "env": {"type": "array", "items": {"type": "object", "required": ["name"]}},
        "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"]}},
        "resources": {"type": "object", "additionalProperties": False, "properties": {
            "requests": {"type": "object"}, "limits": {"type": "object"}}},
    },
}
KUBERAY_SCHEMA = {
    "$defs": {"container": _CONTAINER},
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"enum": ["RayCluster", "RayJob"]},
                   "metadata": {"type": "object", "required": ["name"]}},
    "if": {"properties": {"kind": {"const": "RayJob"}}},
    "then": {"properties": {"spec": {
        "type": "object", "additionalProperties": False,
        "required": ["entrypoint", "rayClusterSpec"],
        "properties": {
            "entrypoint": {"type": "string"}, "runtimeEnvYAML": {"type": "string"},
            "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode",
                                        "SidecarMode"]},
            "shutdownAfterJobFinishes": {"type": "boolean"},
            "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
            "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
            "rayClusterSpec": _RAY_CLUSTER_SPEC}}}},
    "else": {"properties": {"spec": _RAY_CLUSTER_SPEC}},
}


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_kuberay_manifests_match_the_v1_fields_they_use(path):
    import jsonschema

    jsonschema.validate(_load_one(path), KUBERAY_SCHEMA)
    bad = copy.deepcopy(_load_one(path))
    _cluster_spec_of(bad)["workerGroupSpecs"][0]["maxReplica"] = 3  # a typo must fail
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, KUBERAY_SCHEMA)


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_kuberay_pod_templates_pass_kubernetes_own_schema(path):
    """Every group's pod template is a Kubernetes core/v1 PodTemplateSpec (KubeRay's CRDs embed
    that type): validated, unknown fields refused, against the Kubernetes OpenAPI schema that
    kubernetes-validate ships. The Ray fields around them: the schema above."""
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    _, spec = _cluster_spec(path)
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g)
                                                  for g in spec.get("workerGroupSpecs", [])]
    for name, group in groups:
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name},
                        "template": group["template"]}
        kubernetes_validate.validate(pod_template, version, strict=True)
    bad = copy.deepcopy(pod_template)
    bad["template"]["spec"]["containers"][0]["resource"] = {"limits": {"cpu": "1"}}  # a typo
    with pytest.raises(kubernetes_validate.ValidationError, match="'resource' was unexpected"):
        kubernetes_validate.validate(bad, version, strict=True)


def _cluster_spec_of(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


# --- every shipped job config against every shipped manifest -----------------------------------

#: Job configs for a cluster (object storage, GPUs) and for one machine (local paths, CPU).
CLUSTER_JOB_CONFIGS = ("s3.yaml",)
LOCAL_JOB_CONFIGS = ("local.yaml",)
MODEL_STAGES = {"pseudo_label": "pseudo-label", "segment": "segment", "evaluate": "evaluate"}
#: A cold GPU node: boot (2-3 min) + pulling the ~10 GB image (3-6 min) + start-up.
COLD_GPU_NODE_S = 900


def _cpu_quantity(text: str) -> float:
    text = str(text)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _node_groups(path: Path) -> dict[str, tuple[dict[str, float], int]]:
    """Each worker type of a manifest: (its Ray resources, most nodes of it)."""
    if path == AWS_CONFIG:
        doc = _load_one(path)
        return {name: ({k: float(v) for k, v in t["resources"].items()}, t["max_workers"])
                for name, t in doc["available_node_types"].items()
                if name != doc["head_node_type"]}
    groups = {}
    for group in _cluster_spec(path)[1]["workerGroupSpecs"]:
        (container,) = [c for c in _containers(group) if c["name"] == "ray-worker"]
        limits = container["resources"]["limits"]
        params = group.get("rayStartParams", {})
        shape = {"CPU": _cpu_quantity(params.get("num-cpus", limits["cpu"]))}
        gpus = _gpus(container)
        if gpus:
            shape["GPU"] = float(params.get("num-gpus", gpus))
        groups[group["groupName"]] = (shape, group["maxReplicas"])
    return groups


def test_every_job_config_is_classified():
    shipped = {p.name for p in (ROOT / "jobs" / "configs").glob("*.y*ml")}
    assert shipped == set(CLUSTER_JOB_CONFIGS) | set(LOCAL_JOB_CONFIGS)


@pytest.mark.parametrize("manifest", [AWS_CONFIG, RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
@pytest.mark.parametrize("config_name", CLUSTER_JOB_CONFIGS)
def test_job_config_fits_the_manifest(manifest, config_name):
    """Every model stage asks for GPUs explicitly (no CPU plan when GPU nodes are scaled down),
    waits long enough for a cold GPU node, and its actor fits a node type; the training workers
    fit a node type, and the node types' caps hold all of them. Planned with `selfment plan`'s
    own function on each node type's shape."""
    from selfment_dist.config import load_config, values_for
    from selfment_dist.pipeline.plan_command import STAGES, plan_of
    from selfment_dist.pipeline._internal.plan import workers_that_fit

    config = load_config(str(ROOT / "jobs" / "configs" / config_name))
    groups = _node_groups(manifest)
    stages = config["pipeline"]["stages"]
    for section, stage in MODEL_STAGES.items():
        if section not in stages:
            continue
        values = values_for(config, STAGES[stage])
        assert values.get("num_gpus_per_actor"), f"{config_name}/{section}: no GPU setting"
        assert values.get("actor_wait_s", 600) >= COLD_GPU_NODE_S, \
            f"{config_name}/{section}: actor_wait_s too short for a cold GPU node"
        fits = {name: workers_that_fit(plan_of(stage, [shape], values)["need"], [shape])
                for name, (shape, _) in groups.items()}
        assert any(fits.values()), f"{config_name}/{section}: no {manifest.name} node type holds " \
                                   f"a model actor ({groups})"
    if "train" in stages:
        values = values_for(config, STAGES["train"])
        assert values.get("worker_wait_s", 600) >= COLD_GPU_NODE_S, \
            f"{config_name}/train: worker_wait_s too short for a cold GPU node"
        capacity = 0
        for name, (shape, most) in groups.items():
            plan = plan_of("train", [shape], values)
            capacity += plan["workers_the_nodes_hold"] * most
        assert capacity >= values["workers"], \
            f"{config_name}/train: {manifest.name}'s node types hold {capacity} of the " \
            f"{values['workers']} workers ({values.get('resources_per_worker')}; {groups})"
