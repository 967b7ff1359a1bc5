"""The cluster recipes in infra/: they parse, pass Ray's own schema, run real tokensift commands, and keep
the Jobs API (dashboard) on loopback or behind token auth."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from tokensift.cli import build_parser
from tokensift.config import RunConfig, load
from tokensift.pipeline import registry

INFRA = Path(__file__).resolve().parents[1] / "infra"


def _tokensift_args(command: str) -> list[str]:
    """The tokensift arguments of ``python -m tokensift.cli ...`` or ``tokensift ...``."""
    argv = shlex.split(command)
    if argv[:3] == ["python", "-m", "tokensift.cli"]:
        return argv[3:]
    assert argv[0] == "tokensift", command
    return argv[1:]


def _docs(name: str) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all((INFRA / "kuberay" / name).read_text())}


@pytest.mark.parametrize("readme", ["README.md", "ray-cluster/README.md", "kuberay/README.md", "slurm/README.md"])
def test_every_recipe_has_a_readme(readme):
    text = (INFRA / readme).read_text()
    assert len(text.split()) > 80 and "change" in text.lower()


def test_cluster_launcher_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((INFRA / "ray-cluster" / "cluster.yaml").read_text())
    validate_config(prepare_config(raw))  # raises on unknown keys, wrong types, missing head_ip...
    head = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    for commands in (raw["head_start_ray_commands"], raw["worker_start_ray_commands"]):
        assert all("RAY_AUTH_MODE=token" in c for c in commands if "ray start" in c)
    assert raw["file_mounts"]["~/.ray/auth_token"]


def test_rayjob_entrypoint_is_a_real_tokensift_run_over_a_valid_config(tmp_path):
    docs = _docs("rayjob.yaml")
    job = docs["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    args = build_parser().parse_args(_tokensift_args(job["spec"]["entrypoint"]))
    assert (args.command, args.address) == ("run", "auto")

    # the config file the entrypoint names is the ConfigMap mounted on the head
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if args.config.startswith(m["mountPath"] + "/"))
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    configmap = docs["ConfigMap"]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    key = args.config[len(mount["mountPath"]) + 1 :]
    (tmp_path / key).write_text(configmap["data"][key])
    cfg = load(RunConfig, tmp_path / key)
    assert [e.spec.name for e in registry.resolve(cfg.stages)] == ["tokenize", "score_threshold"]
    assert all(p.startswith("/shared/") for p in [*cfg.source.paths, cfg.output.path])


@pytest.mark.parametrize("name, path", [("raycluster.yaml", ["spec"]), ("rayjob.yaml", ["spec", "rayClusterSpec"])])
def test_kuberay_clusters_use_token_auth_and_mount_shared_storage(name, path):
    docs = _docs(name)
    kind = "RayCluster" if name == "raycluster.yaml" else "RayJob"
    spec = docs[kind]
    for key in path:
        spec = spec[key]
    assert spec["authOptions"] == {"mode": "token"}
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        pod = group["template"]["spec"]
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert claims == {"tokensift-shared"}
        assert any(m["mountPath"] == "/shared" for m in pod["containers"][0]["volumeMounts"])
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_raycluster_head_is_fenced_by_a_network_policy():
    docs = _docs("raycluster.yaml")
    policy = docs["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"] == {"ray.io/cluster": "tokensift", "ray.io/node-type": "head"}
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert not {"Service", "Ingress"} & set(docs)  # the dashboard is reached by port-forward only
    assert docs["RayCluster"]["spec"]["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"


def test_slurm_script_is_valid_bash_and_submits_a_real_command():
    script = (INFRA / "slurm" / "tokensift-ray.sbatch").read_text()
    subprocess.run(["bash", "-n", str(INFRA / "slurm" / "tokensift-ray.sbatch")], check=True)
    assert re.search(r"^#SBATCH --nodes=\d+", script, re.M)
    assert re.search(r"^export RAY_AUTH_MODE=token", script, re.M)
    head = script[script.index("ray start --head") :].split("&")[0]
    assert "--dashboard-host=127.0.0.1" in head
    (submit_line,) = [ln for ln in script.splitlines() if ln.startswith("tokensift ")]
    filled = submit_line.replace('"$CONFIG" "$@"', "examples/quickstart.yaml output.path=/shared/s").replace(
        "$dashboard_port", "8265")
    args = build_parser().parse_args(_tokensift_args(filled))
    assert (args.command, args.address, args.follow) == ("submit", "http://127.0.0.1:8265", True)
    assert args.overrides == ["output.path=/shared/s"]
