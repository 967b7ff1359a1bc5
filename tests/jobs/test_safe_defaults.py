"""Safe defaults: no unpickling of untrusted files, configs that cannot run code, loopback-only Ray.

The source scans are AST-based, so they name the file and line of any new offender.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest
from omegaconf.basecontainer import BaseContainer

from tokensift.config import ConfigError, RunConfig, load, to_yaml
from tokensift.jobs.submit import job_config

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = [ROOT / "tokensift", ROOT / "bench"]  # code that runs on user files
# omegaconf's own resolvers: none evaluates code (oc.decode parses YAML-like literals only)
SAFE_RESOLVERS = {"oc.coerce", "oc.create", "oc.decode", "oc.deprecated", "oc.dict.keys", "oc.dict.values",
                  "oc.env", "oc.select"}
UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("cloudpickle", "load"), ("cloudpickle", "loads"),
              ("dill", "load"), ("dill", "loads"), ("joblib", "load"), ("pd", "read_pickle"),
              ("pandas", "read_pickle"), ("yaml", "unsafe_load"), ("yaml", "full_load")}


def _calls(roots: list[Path]):
    """Yield ``(where, owner, name, call)`` for every ``owner.name(...)`` / ``name(...)`` call under roots."""
    for root in roots:
        for path in sorted(root.rglob("*.py")) if root.is_dir() else []:
            yield from _file_calls(path)


@functools.cache
def _file_calls(path: Path) -> list:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            f = node.func
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else None
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            out.append((f"{path.relative_to(ROOT)}:{node.lineno}", owner, name, node))
    return out


def _kw(call: ast.Call, key: str):
    for k in call.keywords:
        if k.arg == key:
            return k.value.value if isinstance(k.value, ast.Constant) else "<expr>"
    return None


def test_every_torch_load_in_the_tree_sets_weights_only_true():
    bad = [w for w, owner, name, call in _calls([*PRODUCT, ROOT / "tests"])
           if (owner, name) == ("torch", "load") and _kw(call, "weights_only") is not True]
    assert not bad, f"torch.load without weights_only=True (unpickles arbitrary objects): {bad}"


def test_no_unpickling_or_unsafe_yaml_in_product_code():
    bad = [f"{w} {owner}.{name}" for w, owner, name, call in _calls(PRODUCT) if (owner, name) in UNPICKLERS]
    bad += [f"{w} np.load(allow_pickle=True)" for w, owner, name, call in _calls(PRODUCT)
            if name == "load" and owner in ("np", "numpy") and _kw(call, "allow_pickle") not in (None, False)]
    bad += [f"{w} yaml.load without SafeLoader" for w, owner, name, call in _calls(PRODUCT)
            if (owner, name) == ("yaml", "load") and "Safe" not in ast.unparse(call)]
    assert not bad, bad


def test_no_code_execution_paths_in_product_code():
    bad = [f"{w} {name}" for w, owner, name, call in _calls(PRODUCT)
           if (isinstance(call.func, ast.Name) and name in ("eval", "exec")) or name in ("register_new_resolver", "register_resolver")]
    bad += [f"{w} trust_remote_code" for w, _, _, call in _calls(PRODUCT) if _kw(call, "trust_remote_code") not in (None, False)]
    assert not bad, f"code execution from data or config: {bad}"


def test_product_code_never_binds_all_interfaces():
    bad = [f"{p.relative_to(ROOT)}" for root in PRODUCT for p in sorted(root.rglob("*.py")) if "0.0.0.0" in p.read_text()]
    assert not bad, f"0.0.0.0 in {bad}: bind to loopback unless the user asks otherwise"


def test_only_omegaconf_builtin_resolvers_are_registered():
    import tokensift.cli  # noqa: F401  imports the config machinery every command uses

    assert set(BaseContainer._resolvers) <= SAFE_RESOLVERS, set(BaseContainer._resolvers) - SAFE_RESOLVERS


def test_config_interpolation_allows_env_and_rejects_anything_else(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENSIFT_TEST_OUT", str(tmp_path / "out"))
    base = ["source.paths=[a.parquet]"]
    cfg = load(RunConfig, None, [*base, "output.path=${oc.env:TOKENSIFT_TEST_OUT}"])
    assert f"path: {tmp_path / 'out'}" in to_yaml(cfg)

    marker = tmp_path / "pwned"
    code = f"__import__('os').system('touch {marker}')"
    with pytest.raises(ConfigError, match="Unsupported interpolation type eval"):
        job_config(_write(tmp_path / "eval.yaml", f'output: {{path: "${{eval:\\"{code}\\"}}"}}\n'), base)
    with pytest.raises(Exception, match="python/object"):
        load(RunConfig, _write(tmp_path / "tag.yaml", f'name: !!python/object/apply:os.system ["touch {marker}"]\n'))
    assert not marker.exists()


def test_embedded_ray_is_loopback_only_without_dashboard(ray_local):
    import ray

    node = ray._private.worker.global_worker.node
    assert node.node_ip_address == "127.0.0.1"
    assert node.gcs_address.startswith("127.0.0.1:")
    assert not node.address_info.get("webui_url")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
