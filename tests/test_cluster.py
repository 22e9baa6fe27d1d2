"""cluster/: every file parses and has what a real deployment needs; checked with Ray's and MLflow's own
validators where they exist (the launcher schema, RuntimeEnv, the `mlflow server` CLI), field by field where not
(KubeRay CRDs, Kubernetes objects). Running them needs a cloud; tests/test_job_submit.py runs the same job on a
local head."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

from jobutil import load_job

ROOT = Path(__file__).parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))
CREDENTIAL_NAME = re.compile(r"(^|_)(PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIALS?)(_|$)", re.I)
URI_WITH_PASSWORD = re.compile(r"://[^/\s:@]+:[^@\s]+@")


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def mlflow_server_module():
    return load_job("mlflow_server")


def ray_versions_allowed():
    """The Ray versions pyproject.toml allows (its ``ray[...]`` dependency), as a packaging SpecifierSet."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray_req,) = [r for r in map(Requirement, deps) if r.name == "ray"]
    return ray_req.specifier


def strings(obj) -> list[str]:
    """Every string value in a parsed YAML tree."""
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in strings(v)]
    return [obj] if isinstance(obj, str) else []


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def check_env_credentials(env: list[dict], where: str) -> None:
    """Credential-like variables come from Secrets, never as literal values."""
    for var in env:
        if CREDENTIAL_NAME.search(var["name"]):
            assert "value" not in var and "secretKeyRef" in var.get("valueFrom", {}), f"{where}: {var['name']}"


# ---------------------------------------------------------------------------------------------------------------
# Ray cluster launcher (AWS)


def test_aws_launcher_config_passes_rays_schema():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    validate_config(cfg)
    validate_config(prepare_config(copy.deepcopy(cfg)))  # with the AWS provider's defaults filled in
    broken = copy.deepcopy(cfg)
    broken["available_node_types"]["head"]["node_confg"] = {}  # a typo the schema must catch
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)


def test_aws_launcher_config_has_cpu_head_spot_gpu_workers_shared_storage_and_token_auth():
    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert not re.match(r"(p\d|g\d)", head["node_config"]["InstanceType"])  # a CPU instance family
    gpu_types = {n: t for n, t in types.items() if n != cfg["head_node_type"] and t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "no GPU worker type"
    for name, t in gpu_types.items():
        assert t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot", name
        assert t["min_workers"] == 0 and t["max_workers"] >= 1, name
        assert "IamInstanceProfile" in t["node_config"], name  # S3 through the instance role, not keys
    # configs/ctrate_vitb.yaml fits one GPU node
    from volvlp_ray.config import load_config

    vitb = load_config(ROOT / "configs" / "ctrate_vitb.yaml")
    assert any(t["resources"]["GPU"] >= vitb.scaling.num_workers and
               t["resources"]["CPU"] >= vitb.scaling.num_workers * vitb.scaling.cpus_per_worker
               for t in gpu_types.values())
    # shared storage: mounted on every host and bound into the container, where the workspace of ctrate_vitb lives
    init = " ".join(cfg["initialization_commands"])
    assert "mount" in init and "/mnt/shared" in init
    assert any("/mnt/shared:/mnt/shared" in o for o in cfg["docker"]["run_options"])
    assert vitb.workspace.startswith("/mnt/shared")
    # token authentication on every node; the dashboard (job API) on the head's loopback, reached by SSH tunnel
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    (head_start,) = [c for c in cfg["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head_start
    assert any(Path(dst).name == "auth_token" for dst in cfg["file_mounts"])
    assert not [s for s in strings(cfg) if URI_WITH_PASSWORD.search(s)]


# ---------------------------------------------------------------------------------------------------------------
# KubeRay


def cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def test_kuberay_manifests_exist():
    kinds = sorted((d["kind"], p.name) for p in KUBERAY for d in load_all(p))
    assert [k for k, _ in kinds] == ["RayCluster", "RayJob", "RayJob"], kinds
    entrypoints = [d["spec"]["entrypoint"] for p in KUBERAY for d in load_all(p) if d["kind"] == "RayJob"]
    assert any("jobs/pretrain.py" in e for e in entrypoints) and any("jobs/sweep.py" in e for e in entrypoints)


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_cluster_spec(path):
    import ray

    (doc,) = load_all(path)
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    spec = cluster_spec(doc)
    # the image's Ray is one the project allows (as is the Ray it runs on here): pyproject.toml sets the bound
    allowed = ray_versions_allowed()
    assert allowed.contains(spec["rayVersion"]) and allowed.contains(ray.__version__), (spec["rayVersion"], allowed)
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus") == "0"
    for c in containers(head["template"]):
        assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})
        check_env_credentials(c.get("env", []), f"{path.name} head")
    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        pod = group["template"]["spec"]
        for c in containers(group["template"]):
            check_env_credentials(c.get("env", []), f"{path.name} {group['groupName']}")
            res = c["resources"]
            if "nvidia.com/gpu" in res.get("limits", {}):
                assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
                assert int(res["limits"]["nvidia.com/gpu"]) >= 1
                gpu_groups.append((group, c))
            assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/mnt/shared", "/dev/shm"}
        keys = {t["key"] for t in pod.get("tolerations", [])}
        assert "nvidia.com/gpu" in keys and "spot" in keys, keys
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert claims, "no shared volume"
    assert gpu_groups, "no worker group requests GPUs"


@pytest.mark.parametrize("path", [p for p in KUBERAY if "rayjob" in p.name], ids=lambda p: p.name)
def test_kuberay_rayjob_entrypoint_and_runtime_env(path):
    from ray.runtime_env import RuntimeEnv

    from volvlp_ray.config import load_config

    (doc,) = load_all(path)
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["submissionMode"] == "K8sJobMode"
    assert spec["activeDeadlineSeconds"] > 0
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and argv[1].startswith("jobs/") and argv[2] == "--config"
    script, config, overrides = ROOT / argv[1], ROOT / argv[3], argv[4:]
    if not script.is_file():
        pytest.skip(f"{argv[1]} is not in the tree yet")
    assert config.is_file(), argv[3]
    cfg = load_config(config, overrides)  # every override is a real config key
    assert cfg.scaling.use_gpu and cfg.workspace.startswith("/mnt/shared")
    # the worker groups hold what the job asks for: GPUs for every worker of every concurrent trial, and a
    # pod's CPUs for each worker on it
    groups = spec["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) * g["maxReplicas"]
               for g in groups for c in containers(g["template"]))
    trials = max(1, cfg.sweep.max_concurrent) if argv[1] == "jobs/sweep.py" else 1
    assert gpus >= cfg.scaling.num_workers * trials
    for g in groups:
        for c in containers(g["template"]):
            per_pod = int(c["resources"]["limits"]["nvidia.com/gpu"])
            assert int(c["resources"]["requests"]["cpu"]) >= cfg.scaling.cpus_per_worker * min(
                per_pod, cfg.scaling.num_workers)
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")
    assert not [k for k in runtime_env["env_vars"] if CREDENTIAL_NAME.search(k)]  # the dashboard shows runtime envs
    assert runtime_env["working_dir"] == "/home/ray/volvlp_ray"  # this repository, inside the image
    RuntimeEnv(**{**runtime_env, "working_dir": str(ROOT)})  # Ray's own validation of the other fields


# ---------------------------------------------------------------------------------------------------------------
# runtime_env, MLflow server


def test_runtime_env_file():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)
    assert {"workspace/", ".venv/", "mlflow.db", "mlruns/"} <= set(env["excludes"])
    assert not [k for k in env.get("env_vars", {}) if CREDENTIAL_NAME.search(k)]
    assert "working_dir" not in env  # given on the command line: --working-dir .


def test_mlflow_server_manifest():
    docs = {d["kind"]: d for d in load_all(CLUSTER / "mlflow-server.yaml")}
    assert set(docs) == {"Deployment", "Service"}
    assert docs["Service"]["spec"]["type"] == "ClusterIP"  # not exposed outside the cluster
    (c,) = containers(docs["Deployment"]["spec"]["template"])
    cmd = " ".join(c.get("command", []) + c.get("args", []))
    assert "mlflow server" in cmd and "--serve-artifacts" in cmd and "--allowed-hosts" in cmd
    assert re.search(r"--artifacts-destination s3://\S+", cmd)
    assert "--backend-store-uri" not in cmd  # the database URI and its password come from a Secret
    env = {v["name"]: v for v in c["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"]
    port = docs["Service"]["spec"]["ports"][0]
    assert port["port"] == 5000
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert not [s for s in strings(list(docs.values())) if URI_WITH_PASSWORD.search(s)]


def test_mlflow_server_launcher_builds_a_valid_mlflow_command(tmp_path):
    """The command of `jobs/mlflow_server.py` is accepted by MLflow's own CLI parser, with SQLite and local
    artifacts by default, the database from the environment when it is set there, and any backend on request."""
    from mlflow.cli import server

    mod = mlflow_server_module()

    def parsed(argv, environ=None):
        cmd = mod.build_command(argv, environ or {})
        assert cmd[1:4] == ["-m", "mlflow", "server"]
        return server.make_context("server", cmd[4:]).params

    p = parsed(["--workspace", str(tmp_path)])
    assert p["backend_store_uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert p["artifacts_destination"] == (tmp_path / "mlartifacts").as_uri() and p["serve_artifacts"]
    assert p["port"] == 5000
    p = parsed(["--port", "5123", "--artifacts-destination", "s3://b/mlflow", "--workers", "2"],
               {"MLFLOW_BACKEND_STORE_URI": "postgresql://u:pw@db/mlflow"})
    assert p["port"] == 5123 and p["artifacts_destination"] == "s3://b/mlflow" and p["workers"] == "2"
    cmd = mod.build_command([], {"MLFLOW_BACKEND_STORE_URI": "postgresql://u:pw@db/mlflow"})
    assert "--backend-store-uri" not in cmd and not any("pw" in a for a in cmd)
    p = parsed(["--backend-store-uri", "postgresql://db/mlflow"])
    assert p["backend_store_uri"] == "postgresql://db/mlflow"
    assert mod.redact("postgresql://user:s3cret@db:5432/x") == "postgresql://user:***@db:5432/x"


def test_readme_cluster_section_points_at_real_files():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"^## Running on a cluster\n(.*?)(?=^## )", readme, re.S | re.M)
    assert m, "README has no 'Running on a cluster' section"
    section = m.group(1)
    for needed in ("ray job submit --address", "--working-dir .", "jobs/pretrain.py --config", "storage_path",
                   "MLFLOW_TRACKING_URI", "RAY_AUTH_MODE=token", "mlflow_server.py"):
        assert needed in section, needed
    for ref in set(re.findall(r"\b((?:cluster|configs|jobs)/[\w./-]+\.(?:ya?ml|py))", section)):
        if ref not in ("configs/sweep.yaml", "jobs/sweep.py"):
            assert (ROOT / ref).is_file(), ref
