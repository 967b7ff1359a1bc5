"""Global- vs micro-batch MoE load balancing on mixed-domain real text: expert specialisation per domain.

Qiu et al. ("Demons in the Detail", arXiv 2501.11873): a load-balancing loss counted per micro-batch is
nearly a per-sequence constraint, so single-domain sequences are pushed onto every expert; counting
``f_i`` over the global batch keeps the same overall balance and lets experts specialise by domain.

Setup: the shipped sample corpus (news, math, code, instruction; real text) tokenised with SmolLM2's BPE,
ids remapped to the 4,095 most frequent in the train split plus one shared id (vocabulary 4,096). Every
micro-batch is ONE sequence of 128 tokens from one document (a single domain); 16 micro-batches
of uniformly drawn domains make one optimizer step. Model: the built-in GPT, 2 blocks, n_embd 64, every MLP
an MoE of 8 experts top-2, dropless, LBL coefficient 0.1, AdamW 3e-3. Same seed, data order and steps for
every balancing mode. Measured on heldout documents (eval mode):

- NMI(domain; expert): normalised mutual information (arithmetic mean of entropies) between a token's
  domain and each of its top-2 experts, averaged over layers. Higher = more specialised.
- max/mean load: the busiest expert's share of all heldout assignments over the mean share, averaged over
  layers (1.0 = perfectly balanced over the global batch).
- heldout CE in nats per token.

``python -m bench.moe_specialisation`` prints the full table (none / micro / global / aux_free).
"""

from __future__ import annotations

import contextlib
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

DOMAINS = ("news", "math", "code", "instruction")
SEQ_LEN = 128
VOCAB = 4096


@contextlib.contextmanager
def one_thread():
    """Run torch single-threaded inside the block: tiny models only contend on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def windows(docs: dict[str, list], n: int, seq_len: int, rng: np.random.Generator):
    """``n`` windows of ``seq_len + 1`` tokens, each from one document of a uniformly drawn domain.

    ``docs`` maps domain -> token sequences (bytes or lists of ids) longer than one window (see
    :func:`load_texts`). Returns ``(tokens [n, seq_len + 1] int64, domain index [n])``.
    """
    names = list(docs)
    domains = rng.integers(len(names), size=n)
    rows = []
    for d in domains:
        doc = docs[names[d]][rng.integers(len(docs[names[d]]))]
        start = rng.integers(len(doc) - seq_len)
        rows.append(list(doc[start : start + seq_len + 1]))
    return torch.tensor(rows), torch.from_numpy(domains)


def _sample_table(heldout: bool):
    from pathlib import Path

    from tokensift.data.sample import build_sample, read_sample

    sample = Path(__file__).resolve().parents[1] / "sample_data"
    if not (sample / "manifest.json").is_file():
        build_sample(sample)
    return read_sample(sample, list(DOMAINS), heldout=heldout)


def load_texts(heldout: bool, seq_len: int = SEQ_LEN, encode=None) -> dict[str, list]:
    """Documents longer than one window, per domain, from the sample corpus (built if absent).

    Args:
        encode: ``list[str] -> list[list[int]]``; default UTF-8 bytes.
    """
    table = _sample_table(heldout)
    texts = table.column("text").to_pylist()
    encoded = encode(texts) if encode else [t.encode("utf-8") for t in texts]
    out: dict[str, list] = {d: [] for d in DOMAINS}
    for ids, domain in zip(encoded, table.column("domain").to_pylist(), strict=True):
        if len(ids) > seq_len + 1:
            out[domain].append(ids)
    return out


def smollm2_compact_encoder(vocab: int = VOCAB):
    """SmolLM2's BPE tokenizer with its ids remapped to the ``vocab - 1`` most frequent in the train split
    (the rest share one id), so the LM head of a tiny model stays small. Returns ``encode``."""
    from tokensift.models.assets import smollm2

    _, tok = smollm2()

    def ids(texts: list[str]) -> list[list[int]]:
        return tok(texts, add_special_tokens=False)["input_ids"]

    counts = np.bincount(np.concatenate([np.asarray(x) for x in ids(_sample_table(False).column("text").to_pylist())]))
    table = np.full(max(len(counts), len(tok)), vocab - 1, dtype=np.int64)
    table[np.argsort(-counts, kind="stable")[: vocab - 1]] = np.arange(vocab - 1)
    return lambda texts: [table[np.asarray(x, dtype=np.int64)].tolist() for x in ids(texts)]


def nmi(joint: np.ndarray) -> float:
    """Normalised mutual information of a contingency table: ``I(X;Y) / ((H(X) + H(Y)) / 2)``."""
    p = joint / joint.sum()
    px, py = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / (px @ py)[nz])).sum())
    hx, hy = (float(-(q[q > 0] * np.log(q[q > 0])).sum()) for q in (px, py))
    return mi / max((hx + hy) / 2, 1e-12)


def train(balance: str, steps: int, train_texts, seed: int = 0, grad_accum: int = 16):
    """Train the 2-block MoE GPT with one sequence per micro-batch; returns the model."""
    from tokensift.models.gpt import GPT
    from tokensift.models.gpt_config import GPTConfig, MoEConfig

    torch.manual_seed(seed)
    moe = MoEConfig(num_experts=8, top_k=2, capacity_factor=None, balance="micro" if balance == "none" else balance,
                    aux_coef=0.0 if balance == "none" else 0.1, bias_update_rate=1e-3)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=SEQ_LEN, n_layer=2, n_head=4, n_embd=64, moe=moe)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        tokens, _ = windows(train_texts, grad_accum, SEQ_LEN, rng)
        model.begin_global_batch()
        for m in range(grad_accum):
            x = tokens[m : m + 1]
            loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[0, 1:])
            ((loss + model.aux_loss()) / grad_accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.end_global_batch()
    return model


@torch.no_grad()
def evaluate(model, tokens: torch.Tensor, domains: torch.Tensor) -> dict[str, float]:
    """Heldout CE (nats/token), NMI(domain; expert) and max/mean load, averaged over MoE layers."""
    from tokensift.models.gpt import MoE

    model.eval()
    layers = model.routed_modules(MoE)
    joint = [np.zeros((len(DOMAINS), layer.cfg.num_experts)) for _, layer in layers]
    ce = []
    for lo in range(0, len(tokens), 16):
        x, d = tokens[lo : lo + 16], domains[lo : lo + 16]
        logits = model(x[:, :-1])
        ce.append(F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item())
        token_domain = d.repeat_interleave(x.shape[1] - 1)
        for table, (_, layer) in zip(joint, layers, strict=True):
            index = layer.last["expert_index"]
            np.add.at(table, (token_domain[:, None].expand_as(index).numpy(), index.numpy()), 1)
    load = [t.sum(0) / t.sum() * t.shape[1] for t in joint]
    return {
        "nmi": float(np.mean([nmi(t) for t in joint])),
        "max_load": float(np.mean([lo.max() for lo in load])),
        "ce": float(sum(ce) / (tokens.shape[0] * (tokens.shape[1] - 1))),
    }


def table(modes: tuple[str, ...], steps: int, heldout_windows: int = 64) -> dict[str, dict[str, float]]:
    """Train and evaluate every balancing mode on identical data, one thread; returns mode -> metrics."""
    with one_thread():
        return _table(modes, steps, heldout_windows)


def _table(modes: tuple[str, ...], steps: int, heldout_windows: int) -> dict[str, dict[str, float]]:
    encode = smollm2_compact_encoder()
    train_texts, heldout_texts = load_texts(False, encode=encode), load_texts(True, encode=encode)
    tokens, domains = windows(heldout_texts, heldout_windows * len(DOMAINS), SEQ_LEN, np.random.default_rng(123))
    out = {}
    for mode in modes:
        t0 = time.perf_counter()
        out[mode] = evaluate(train(mode, steps, train_texts), tokens, domains)
        out[mode]["seconds"] = time.perf_counter() - t0
    return out


def run(quick: bool = False) -> list[dict]:
    steps = 4 if quick else 300
    res = table(("micro", "global"), steps, heldout_windows=8 if quick else 64)
    g, m = res["global"], res["micro"]
    setup = f"{steps} steps x 16 one-sequence micro-batches, 2 MoE layers 8 experts top-2, SmolLM2 BPE (top-4096 ids) on the sample corpus"
    return [
        {"measure": "MoE expert specialisation NMI(domain; expert), global vs micro LBL", "ours": round(g["nmi"], 4),
         "anchor": round(m["nmi"], 4), "unit": "NMI", "ratio": round(g["nmi"] / max(m["nmi"], 1e-9), 2),
         "note": f"ratio = ours / anchor; ours = global-batch LBL, anchor = micro-batch LBL; {setup}"},
        {"measure": "MoE heldout max/mean expert load, global vs micro LBL", "ours": round(g["max_load"], 3),
         "anchor": round(m["max_load"], 3), "unit": "x mean", "ratio": round(g["max_load"] / m["max_load"], 3),
         "note": "ratio = ours / anchor; 1.0 = perfectly balanced over the heldout set"},
        {"measure": "MoE heldout CE, global vs micro LBL", "ours": round(g["ce"], 4), "anchor": round(m["ce"], 4),
         "unit": "nats/token", "ratio": round(g["ce"] / m["ce"], 4), "note": "ratio = ours / anchor (lower is better)"},
    ]


def main(argv: list[str]) -> int:
    """``python -m bench.moe_specialisation [STEPS [MODE ...]]`` prints a markdown table."""
    steps = int(argv[0]) if argv else 300
    res = table(tuple(argv[1:]) or ("none", "micro", "global", "aux_free"), steps)
    print(f"| balance ({steps} steps) | NMI(domain; expert) | max/mean load | heldout CE (nats/token) | seconds |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for mode, r in res.items():
        print(f"| {mode} | {r['nmi']:.4f} | {r['max_load']:.3f} | {r['ce']:.4f} | {r['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
