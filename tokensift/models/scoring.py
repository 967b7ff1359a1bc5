"""The scoring engine: per-token losses of a causal LM at the speed of its plain forward pass.

Every LM-scoring path runs through here: ``lm_nll``'s windows, ICon's contexts and assessment samples, and
the offline token scorers (through :func:`token_losses`).

- **Batches by tokens.** Sequences are sorted by length (longest first) and cut into batches of at most
  ``max_tokens`` padded positions (rows x longest row; a longer sequence runs alone) and, optionally, at
  most ``max_rows`` rows. Results come back in input order. A batch whose rows share one length runs
  without an attention mask, on SDPA's causal kernel.
- **Loss from the hidden states.** With h_t the decoder's last hidden state at position t and z_t = W h_t
  the logits of the LM head,

      loss_t = -log softmax(z_t)[x_{t+1}] = logsumexp(z_t) - z_t[x_{t+1}]

  computed over chunks of ``LOSS_CHUNK`` real (unpadded) positions, each chunk upcast to fp32 on its own:
  there is never more than one chunk of full-vocabulary logits, and none at padded positions. A model
  whose logits are more than ``lm_head(h)`` (soft-capping, scaling) is detected once, by comparing with
  its own forward pass, and scored from its full logits instead (still chunked).
- **Prepacked weights on CPUs.** In fp32 on a CPU every linear layer multiplies by its oneDNN-prepacked
  weight (``packed.py``), not through MKL's per-call packing.
- ``torch.inference_mode``; inside a Ray worker, torch threads = the CPUs Ray gave it
  (:func:`use_assigned_cpus`).
"""

from __future__ import annotations

import inspect
import math
import sys
import weakref

import numpy as np
import torch

from tokensift.models.packed import packs_linears

DEFAULT_MAX_TOKENS = 4096  # padded positions per forward pass on CPUs; GPUs want 16k-64k
LOSS_CHUNK = 256  # positions whose full-vocabulary logits exist at once

_PLAIN_HEAD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_batches(lengths: list[int], max_tokens: int, max_rows: int | None = None) -> list[list[int]]:
    """Indices of ``lengths`` grouped into batches, longest first, by a padded-token budget.

    Args:
        lengths: tokens per sequence.
        max_tokens: a batch holds at most this many padded positions (rows x its longest row); a sequence
            longer than that forms a batch of its own.
        max_rows: at most this many rows per batch (``None``: only the token budget).
    """
    if max_tokens < 1 or (max_rows is not None and max_rows < 1):
        raise ValueError(f"token_batches: max_tokens and max_rows must be >= 1, got {max_tokens}, {max_rows}")
    out: list[list[int]] = []
    width = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        last = out[-1] if out else None
        if last is None or (len(last) + 1) * width > max_tokens or (max_rows and len(last) >= max_rows):
            out.append([i])
            width = max(lengths[i], 1)
        else:
            last.append(i)
    return out


def use_assigned_cpus() -> int | None:
    """In a Ray actor or task, set torch's threads to the CPUs Ray assigned it (a fraction rounds up).

    Ray starts workers with ``OMP_NUM_THREADS`` = the integer part of their CPUs (at least 1), which leaves
    a 1.5-CPU actor on one thread. Returns the threads set, or ``None`` outside a Ray worker (the driver
    and plain scripts keep their threads).
    """
    ray = sys.modules.get("ray")  # a Ray worker has imported it; plain scripts need not
    if ray is None or not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return None
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    if cpus <= 0:
        return None
    threads = max(1, math.ceil(cpus - 1e-6))
    torch.set_num_threads(threads)
    return threads


def plain_head(model) -> bool:
    """Whether ``model``'s logits are ``get_output_embeddings()(base_model(...).last_hidden_state)``.

    Checked once per model on 8 tokens against its own forward pass (soft-capped or scaled heads fail it).
    """
    if model not in _PLAIN_HEAD:
        head, base = model.get_output_embeddings(), getattr(model, "base_model", None)
        ok = head is not None and base is not None and base is not model
        if ok:
            ids = torch.arange(1, 9, device=_device(model)).unsqueeze(0) % model.config.vocab_size
            with torch.inference_mode():
                full = model(input_ids=ids).logits.float()
                states = getattr(base(input_ids=ids), "last_hidden_state", None)
                ok = states is not None and torch.allclose(head(states).float(), full, rtol=1e-3, atol=1e-3)
        _PLAIN_HEAD[model] = ok
    return _PLAIN_HEAD[model]


def final_states(model, last_only: bool = False, **inputs):
    """One forward pass: ``(states, head, output)`` with ``head(states)`` the logits.

    ``states`` are the decoder's last hidden states and ``head`` the LM head when :func:`plain_head`
    holds, else the model's logits and ``None``. ``last_only`` keeps the last position only.
    """
    if plain_head(model):
        out = model.base_model(**inputs)
        states = out.last_hidden_state
        return (states[:, -1:] if last_only else states), model.get_output_embeddings(), out
    out = model(**inputs, logits_to_keep=1 if last_only else 0)
    return out.logits, None, out


def target_losses(states: torch.Tensor, targets: torch.Tensor, head=None, chunk: int = LOSS_CHUNK) -> torch.Tensor:
    """``logsumexp(z) - z[target]`` (nats, fp32) per row of ``states``, ``z = head(states)`` chunk by chunk.

    Args:
        states: ``(N, hidden)`` final hidden states, or ``(N, vocab)`` logits when ``head`` is ``None``.
        targets: ``(N,)`` token ids predicted at those positions.
        head: the LM head (``None``: ``states`` are logits already).
        chunk: positions projected at once.
    """
    out = torch.empty(len(targets), dtype=torch.float32, device=states.device)
    for lo in range(0, len(targets), chunk):
        z = states[lo : lo + chunk]
        z = (head(z) if head is not None else z).float()
        out[lo : lo + chunk] = torch.logsumexp(z, -1) - z.gather(-1, targets[lo : lo + chunk, None]).squeeze(-1)
    return out


def pad(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Right-padded ids and their attention mask (``None`` when every row has the same length)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long)
    if all(len(r) == width for r in rows):
        return ids.to(device), None
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long)
    return ids.to(device), mask.to(device)


def split_rows(losses: torch.Tensor, counts: list[int]) -> list[np.ndarray]:
    """Cut a flat loss vector into per-row numpy arrays of ``counts`` entries."""
    flat = losses.cpu().numpy()
    return np.split(flat, np.cumsum(counts)[:-1]) if counts else []


def context_limit(model) -> int:
    """Longest sequence the model takes (``max_position_embeddings``; unbounded when it has none)."""
    return getattr(model.config, "max_position_embeddings", None) or 1 << 30


@torch.inference_mode()
@packs_linears
def token_losses(
    model, sequences: list[list[int]], batch_size: int | None = None, max_tokens: int = DEFAULT_MAX_TOKENS
) -> list[np.ndarray]:
    """Per-token negative log-likelihood (nats, float32) of each sequence under ``model``.

    ``loss[t] = -log p(x_{t+1} | x_{<=t})``, so a sequence of L tokens gets L-1 losses (none for L < 2).
    Sequences are right-padded per batch and padded positions never reach the loss, so a sequence's
    losses do not depend on what it is batched with. Long sequences are truncated to the model's context.

    Args:
        model: a causal LM in eval mode.
        sequences: token ids.
        batch_size: at most this many sequences per forward pass (``None``: only ``max_tokens``).
        max_tokens: padded positions per forward pass.
    """
    device, limit = _device(model), context_limit(model)
    seqs = [list(s[:limit]) for s in sequences]
    out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(seqs)
    for idx in token_batches([len(s) for s in seqs], max_tokens, batch_size):
        idx = [i for i in idx if len(seqs[i]) >= 2]
        if not idx:
            continue
        rows = [seqs[i] for i in idx]
        ids, mask = pad(rows, device)
        states, head, _ = final_states(model, input_ids=ids, attention_mask=mask)
        if mask is None:
            flat, targets = states[:, :-1].flatten(0, 1), ids[:, 1:].flatten()
        else:
            valid = mask[:, 1:].bool()
            flat, targets = states[:, :-1][valid], ids[:, 1:][valid]
        losses = target_losses(flat, targets, head)
        for i, lo in zip(idx, split_rows(losses, [len(r) - 1 for r in rows]), strict=True):
            out[i] = lo
    return out


def prefix_cache(model, prefix: list[int]):
    """One pass over ``prefix`` (LM head at its last position only): ``(last, head, kv)``, its last final
    state (``head(last)`` are its logits; ``head`` as :func:`final_states`) and each layer's ``(keys, values)``."""
    ids = torch.tensor([list(prefix)], device=_device(model))
    last, head, out = final_states(model, last_only=True, input_ids=ids, use_cache=True)
    return last, head, [(layer.keys, layer.values) for layer in getattr(out, _cache_keyword(model)).layers]


def suffix_states(model, kv, ids: torch.Tensor, mask: torch.Tensor | None):
    """``(states, head)`` of right-padded ``ids`` (``mask``: their attention mask, ``None`` = all ones) behind
    a cached prefix ``kv`` (:func:`prefix_cache`), expanded over the batch without copying."""
    from transformers import DynamicCache

    (n, width), n_prefix = ids.shape, kv[0][0].shape[-2]
    full_mask = torch.ones(n, n_prefix + width, dtype=torch.long, device=ids.device)
    if mask is not None:
        full_mask[:, n_prefix:] = mask
    cache = DynamicCache(ddp_cache_data=[(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in kv],
                         config=model.config)
    states, head, _ = final_states(
        model,
        input_ids=ids,
        attention_mask=full_mask,
        position_ids=torch.arange(n_prefix, n_prefix + width, device=ids.device).expand(n, -1),
        use_cache=True,
        **{_cache_keyword(model): cache},
    )
    return states, head


@torch.inference_mode()
@packs_linears
def prefix_token_losses(
    model, prefix: list[int], suffixes: list[list[int]], batch_size: int | None = None, max_tokens: int = DEFAULT_MAX_TOKENS
) -> list[np.ndarray]:
    """Per-token NLL (nats) of each suffix after one shared prefix; the prefix runs once.

    ``loss[t] = -log p(s_t | prefix, s_{<t})``, so a suffix of L tokens gets L losses (the first predicted
    from the prefix's last position) and ``prefix_token_losses(m, p, [s])[0]`` equals
    ``token_losses(m, [p + s])[0][len(p) - 1:]``. The prefix's KV cache is computed once (its logits only
    at its last position) and expanded over each batch of right-padded suffixes; batches are cut by
    ``max_tokens`` suffix positions and ``batch_size`` rows. Suffixes are truncated to fit the context.

    Args:
        model: a causal LM in eval mode.
        prefix: the shared context (non-empty).
        suffixes: the continuations scored behind it.
        batch_size: at most this many suffixes per forward pass (``None``: only ``max_tokens``).
        max_tokens: padded suffix positions per forward pass.
    """
    if not prefix:
        raise ValueError("prefix_token_losses needs a non-empty prefix (use token_losses without one)")
    device, limit = _device(model), context_limit(model)
    prefix = list(prefix[: limit - 1])
    last, head, kv = prefix_cache(model, prefix)
    seqs = [list(s[: limit - len(prefix)]) for s in suffixes]
    out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(seqs)
    for idx in token_batches([len(s) for s in seqs], max_tokens, batch_size):
        idx = [i for i in idx if seqs[i]]
        if not idx:
            continue
        rows = [seqs[i] for i in idx]
        ids, mask = pad(rows, device)
        states, _ = suffix_states(model, kv, ids, mask)
        states = torch.cat([last.expand(len(rows), 1, -1), states[:, :-1]], dim=1)  # position t predicts suffix token t
        valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        losses = target_losses(states[valid], ids[valid], head)
        for i, lo in zip(idx, split_rows(losses, [len(r) for r in rows]), strict=True):
            out[i] = lo
    return out


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _cache_keyword(model) -> str:
    """The KV-cache argument (and output field) of this transformers version: ``cache`` or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.base_model.forward).parameters else "past_key_values"
