"""cluster/: every manifest parses, and the fields that decide whether a GPU cluster works are right.

Fast and offline: nothing is launched. The cluster launcher config also goes through Ray's own
schema and consistency checks (what `ray up` runs before touching AWS); the KubeRay manifests and
the Dockerfile are checked field by field. Every Ray version written in cluster/ must agree with the
installed Ray, so upgrading Ray without updating the images fails here rather than on a cluster.
"""
from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

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
        assert any(c.get("command", [])[-1:] == ["selfment_dist.model.cuda_check"] and _gpus(c) >= 1
                   for c in checks), f"{name}/{group['groupName']}: no CUDA check before Ray"

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
