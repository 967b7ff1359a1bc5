"""Part 3 of the ablations: SIFT in its setting, examples chosen per held-out prompt (``python -m bench.ablate --parts sift``).

SIFT (Hübotter et al., 2024) chooses, for one prompt, the N pool examples that minimise the posterior variance
of the prompt's embedding under a linear kernel (``tokensift.selectors.sift``, lambda = 0.01); nearest
neighbours take the N most cosine-similar ones (``tokensift.selectors.knn.cosine_knn``); random takes N
uniformly. Protocol:

- Pool: the sample corpus' train split of GSM8K (``math``) and ShareGPT (``instruction``); texts and prompts
  embedded with MiniLM (``tokensift.models.embed``, unit norm), cached in ``work``.
- Prompts: the first ``per_domain`` held-out rows of each domain by id hash; query = the prompt's embedding,
  reference answer = its response (cut to ``answer_tokens``), prompt cut to its last ``prompt_tokens``.
- Arms: none, SIFT (N distinct documents), kNN, random (seeds 0..S-1). Each example is its ``text`` cut to
  ``example_tokens`` SmolLM2 tokens.
- In context: SmolLM2-135M scores ``ex_1 SEP ... ex_N SEP prompt SEP answer`` (SEP = a blank line);
  loss = mean NLL in nats per answer token (``token_losses``, answer positions only).
- Test-time fine-tuning (the paper's protocol, on the first ``ttft_per_domain`` prompts of each domain):
  from the base weights, one Adam step (lr 5e-5, eps 1e-8, batch of one, LM loss on all tokens) per
  selected example in selection order (SIFT: the paper's N greedy picks, repeats allowed; kNN; random seed
  0), then the answer loss given the prompt alone; the weights are restored between runs.
- Comparison: per prompt, random = the mean over its seeds; paired difference of per-prompt losses, with
  the verdict from its mean against twice its standard error.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

TITLE = "3. SIFT in its setting: examples chosen per held-out prompt, in context and by test-time fine-tuning"
DOMAINS = ("math", "instruction")
LAM, LR, EPS = 0.01, 5e-5, 1e-8  # the paper's lambda; Adam as in its test-time fine-tuning
QUICK = {"per_domain": 3, "pool_per_domain": 250, "n": 3, "example_tokens": 128, "prompt_tokens": 128,
         "answer_tokens": 96, "seeds": 3, "ttft_per_domain": 1}
FULL = {"per_domain": 15, "pool_per_domain": None, "n": 3, "example_tokens": 128, "prompt_tokens": 128,
        "answer_tokens": 96, "seeds": 3, "ttft_per_domain": 3}  # about 9 min on 2 idle cores (estimated)
SEP = "\n\n"


def pick_prompts(rows: list[dict], n: int) -> list[dict]:
    """The ``n`` rows with the smallest id hash (a fixed, order-free choice)."""
    from bench.ablate_select import id_hash

    return sorted(rows, key=lambda r: id_hash(r["id"]))[:n]


def nearest(pool: np.ndarray, queries: np.ndarray, n: int) -> list[list[int]]:
    """The ``n`` pool rows most cosine-similar to each query (queries never pick each other)."""
    from tokensift.selectors.knn import cosine_knn

    _, ids = cosine_knn(np.vstack([pool, queries]), n + len(queries))
    return [[int(i) for i in row if i < len(pool)][:n] for row in ids[len(pool):]]


def random_picks(n_pool: int, n: int, seed: int, prompt: int) -> list[int]:
    """``n`` distinct pool rows drawn uniformly, seeded by (seed, prompt)."""
    return np.random.default_rng([seed, prompt]).choice(n_pool, n, replace=False).tolist()


def in_context(examples: list[list[int]], prompt: list[int], answer: list[int], sep: list[int]) -> list[int]:
    """``ex_1 sep ... ex_N sep prompt answer`` as one token sequence."""
    return [t for ex in examples for t in ex + sep] + prompt + answer


def answer_loss(losses: np.ndarray, n_answer: int) -> float:
    """Mean NLL of the last ``n_answer`` tokens from ``token_losses`` output (entry t predicts token t+1)."""
    return float(np.mean(losses[-n_answer:]))


def paired(ours: list[float], base: list[float]) -> str:
    """Verdict on the per-prompt differences ``ours - base``: their mean against twice its standard error."""
    d = np.asarray(ours, np.float64) - np.asarray(base, np.float64)
    m = float(d.mean())
    if len(d) < 2:
        return f"{'lower' if m < 0 else 'higher'} by {abs(m):.3f} (1 prompt: no spread)"
    from bench.ablate_report import judge

    return judge(m, float(d.std(ddof=1)) / math.sqrt(len(d)))


def diagnostics(emb: np.ndarray, query: np.ndarray, picks: list[int], knn: list[int], same: np.ndarray) -> dict:
    """Mean cosine to the query, mean pairwise cosine of the distinct picks, share in the prompt's domain,
    share also picked by kNN, distinct documents."""
    u = sorted(set(picks))
    gram = emb[u] @ emb[u].T
    pairs = (gram.sum() - np.trace(gram)) / (len(u) * (len(u) - 1)) if len(u) > 1 else 1.0
    return {"query_cos": float(np.mean(emb[picks] @ query)), "pair_cos": float(pairs),
            "same_domain": float(np.mean(same[picks])), "knn_overlap": len(set(picks) & set(knn)) / len(knn),
            "distinct": len(u)}


def embed_cached(texts: list[str], ids: list[str], cache: Path, log) -> np.ndarray:
    """MiniLM embeddings of ``texts`` (keyed by ``ids``); those already in ``cache`` are reused, new ones added."""
    known = {}
    if cache.is_file():
        got = np.load(cache, allow_pickle=False)
        known = dict(zip(got["ids"].tolist(), got["vectors"], strict=True))
    todo = [k for k, i in enumerate(ids) if i not in known]
    if todo:
        from tokensift.models.embed import Encoder

        log(f"sift: embedding {len(todo)} texts with MiniLM")
        known |= dict(zip([ids[k] for k in todo], Encoder().encode([texts[k] for k in todo]), strict=True))
        np.savez(cache, ids=np.array(list(known)), vectors=np.stack(list(known.values())))
    return np.stack([known[i] for i in ids])


def finetune_loss(model, steps: list[list[int]], eval_ids: list[int], n_answer: int, base: dict) -> float:
    """One Adam step per sequence of ``steps``, the answer loss of ``eval_ids``, then the ``base`` weights back."""
    import torch

    from tokensift.models.scoring import token_losses

    opt = torch.optim.Adam(model.parameters(), lr=LR, eps=EPS)
    for ids in steps:
        x = torch.tensor([ids])
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    loss = answer_loss(token_losses(model, [eval_ids])[0], n_answer)
    model.load_state_dict(base)
    return loss


def select(x: np.ndarray, q: np.ndarray, n: int, seeds: int) -> dict[str, list[list[int]]]:
    """Pool indices per arm and prompt; ``sift_ttft`` is SIFT's N greedy picks with repeats (the paper's)."""
    from tokensift.selectors.sift import select_per_query

    picks = {"sift": select_per_query(x, q, n, LAM, distinct=True, use_ray=False), "knn": nearest(x, q, n)}
    picks |= {f"random/{s}": [random_picks(len(x), n, s, j) for j in range(len(q))] for s in range(seeds)}
    return picks | {"sift_ttft": select_per_query(x, q, n, LAM, use_ray=False)}


class Texts:
    """SmolLM2 token ids: pool examples (cut), prompts (their tail, with the blank line) and answers (cut)."""

    def __init__(self, tok, pool: list[dict], prompts: list[dict], p: dict):
        def ids(text: str) -> list[int]:
            return tok(text, add_special_tokens=False)["input_ids"]

        self.sep = ids(SEP)
        self.examples = [ids(r["text"])[: p["example_tokens"]] for r in pool]
        self.prompts = [ids(r["text"][: len(r["text"]) - len(r["response"])])[-p["prompt_tokens"]:] for r in prompts]
        self.answers = [ids(r["response"])[: p["answer_tokens"]] for r in prompts]


def run(quick: bool, work: Path, log) -> dict:
    from bench.ablate_select import read_split, sample_rows
    from tokensift.models.assets import smollm2
    from tokensift.models.scoring import token_losses

    p = QUICK if quick else FULL
    t_start = time.perf_counter()
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    pool = [r for i, d in enumerate(DOMAINS) for r in sample_rows(read_split(False, [d]), p["pool_per_domain"], i).to_pylist()]
    prompts = [r for d in DOMAINS for r in pick_prompts(read_split(True, [d]).to_pylist(), p["per_domain"])]
    texts = [r["text"] for r in pool] + [r["prompt"] for r in prompts]
    emb = embed_cached(texts, [r["id"] for r in pool] + ["query:" + r["id"] for r in prompts], work / "embeddings.npz", log)
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    x, q = emb[: len(pool)], emb[len(pool):]
    t_embed = time.perf_counter() - t_start
    t0 = time.perf_counter()
    picks = select(x, q, p["n"], p["seeds"])
    t_select = time.perf_counter() - t0
    domain = np.array([r["domain"] for r in pool])
    diag = {arm: [diagnostics(x, q[j], pk[j], picks["knn"][j], domain == prompts[j]["domain"]) for j in range(len(prompts))]
            for arm, pk in picks.items()}

    model, tok = smollm2()
    t = Texts(tok, pool, prompts, p)
    log(f"sift: pool {len(pool)}, {len(prompts)} prompts, N={p['n']}; in-context scoring")
    arms = ["none", *(a for a in picks if a != "sift_ttft")]
    loss = {arm: [] for arm in arms}
    t0 = time.perf_counter()
    for j in range(len(prompts)):
        shown = {arm: [] if arm == "none" else [t.examples[i] for i in picks[arm][j]] for arm in arms}
        seqs = [in_context(shown[arm], t.prompts[j], t.answers[j], t.sep) for arm in arms]
        for arm, lo in zip(arms, token_losses(model, seqs), strict=True):
            loss[arm].append(answer_loss(lo, len(t.answers[j])))
        log(f"sift: prompt {j + 1}/{len(prompts)} in context: " + ", ".join(f"{a} {loss[a][-1]:.3f}" for a in arms))
    t_icl = time.perf_counter() - t0

    sub = [j for d in DOMAINS for j in [k for k, r in enumerate(prompts) if r["domain"] == d][: p["ttft_per_domain"]]]
    ttft_arms = {"sift": "sift_ttft", "knn": "knn", "random/0": "random/0"}
    ttft, ttft_seconds = {arm: [] for arm in ttft_arms}, []
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for j in sub:
        for arm, source in ttft_arms.items():
            t0 = time.perf_counter()
            steps = [t.examples[i] for i in picks[source][j]]
            ttft[arm].append(finetune_loss(model, steps, t.prompts[j] + t.answers[j], len(t.answers[j]), base))
            ttft_seconds.append(time.perf_counter() - t0)
        log(f"sift: prompt {j + 1} fine-tuned: " + ", ".join(f"{a} {ttft[a][-1]:.3f}" for a in ttft))
    return {
        "setting": {**p, "lam": LAM, "lr": LR, "eps": EPS, "pool_docs": {d: int((domain == d).sum()) for d in DOMAINS},
                    "model": "SmolLM2-135M-Instruct (fp32)", "encoder": "all-MiniLM-L6-v2"},
        "prompts": [{"id": r["id"], "domain": r["domain"], "answer_tokens": len(a)} for r, a in zip(prompts, t.answers, strict=True)],
        "picks": {arm: [[pool[i]["id"] for i in pk] for pk in v] for arm, v in picks.items()},
        "diagnostics": diag,
        "in_context": loss,
        "ttft": {"prompts": sub, **ttft},
        "seconds": {"embed": t_embed, "select": t_select, "in_context": t_icl, "ttft_runs": ttft_seconds,
                    "total": time.perf_counter() - t_start},
    }


def fold_seeds(losses: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per arm, its per-prompt losses, with ``random/<seed>`` arms folded into ``random`` (the mean over seeds)."""
    out = {a: v for a, v in losses.items() if not a.startswith("random/")}
    seeds = [v for a, v in losses.items() if a.startswith("random/")]
    if seeds:
        out["random"] = np.mean(seeds, axis=0).tolist()
    return out


def _loss_table(data: dict, losses: dict, prompts: list[int]) -> list[str]:
    """Loss per arm (all prompts and per domain) and paired verdicts; ``losses[arm][i]`` is prompt ``prompts[i]``."""
    from bench.ablate_report import fmt, table

    dom = {d: [i for i, k in enumerate(prompts) if data["prompts"][k]["domain"] == d] for d in DOMAINS}
    arms = fold_seeds(losses)
    rows = []
    for arm, v in arms.items():
        cells = [arm, fmt(v)] + [fmt([v[i] for i in dom[d]]) for d in DOMAINS]
        cells += [paired(v, arms[b]) if b != arm and b in arms else "—" for b in ("knn", "random", "none")]
        rows.append(cells)
    head = ["arm", f"all ({len(prompts)} prompts)"] + [f"{d} ({len(dom[d])})" for d in DOMAINS]
    return table(head + ["paired vs knn", "paired vs random", "paired vs none"], rows)


def section(data: dict) -> list[str]:
    from bench.ablate_report import fmt, table

    s, pr = data["setting"], data["prompts"]
    sec = data["seconds"]
    ttft = data["ttft"]
    n_sub = len(ttft["prompts"])
    n_seeds = sum(a.startswith("random/") for a in data["in_context"])
    ttft_losses = {"none": [data["in_context"]["none"][k] for k in ttft["prompts"]],
                   **{a: v for a, v in ttft.items() if a != "prompts"}}
    seed_means = [float(np.mean(v)) for a, v in data["in_context"].items() if a.startswith("random/")]
    lines = [
        f"Setting: {s['model']} scores a held-out prompt's reference answer after N = {s['n']} examples from a pool "
        f"of {s['pool_docs']['math']} GSM8K and {s['pool_docs']['instruction']} ShareGPT training documents "
        f"(sample corpus, train split). {len(pr)} held-out prompts ({s['per_domain']} GSM8K, {s['per_domain']} "
        f"ShareGPT, fixed by id hash); the query is the prompt's {s['encoder']} embedding. Arms: SIFT (lambda "
        f"{s['lam']}, whole pool, {s['n']} distinct documents), nearest neighbours (cosine), random ({n_seeds} seeds; per "
        f"prompt the mean over seeds), none. Each example is its text cut to {s['example_tokens']} tokens, the "
        f"prompt to its last {s['prompt_tokens']}, the answer to its first {s['answer_tokens']}. Loss: nats per "
        f"answer token, mean ± sample std over prompts; paired = per-prompt difference (row minus column arm), "
        f"its mean against twice its standard error. Test-time fine-tuning, for time on a subset of {n_sub} "
        f"prompts (the first {s['ttft_per_domain']} of each domain): from the base weights, one Adam step (lr {s['lr']}, "
        f"eps {s['eps']}, batch 1, LM loss on every token) per selected example in selection order (SIFT: its "
        f"{s['n']} greedy picks with repeats allowed, as in the paper; random: seed 0), then the answer loss "
        f"with the prompt alone in context; weights restored after each run. Wall time "
        f"{sec['total'] / 60:.1f} min (embedding {sec['embed']:.0f} s, selection {sec['select']:.1f} s, in "
        f"context {sec['in_context']:.0f} s = {sec['in_context'] / len(pr):.1f} s per prompt for "
        f"{len(data['in_context'])} sequences, test-time fine-tuning {fmt(sec['ttft_runs'], 1)} s per run).", "",
        "In context (examples, then the prompt):", "",
        *_loss_table(data, data["in_context"], list(range(len(pr)))), "",
        f"Random's spread over seeds (mean over all prompts, per seed): {fmt(seed_means)} nats/token.", "",
        f"Test-time fine-tuning ({n_sub} prompts; none = the base model, prompt alone):", "",
        *_loss_table(data, ttft_losses, ttft["prompts"]), "",
        "What each arm picked (per prompt, mean ± std over prompts): cosine of the picks to the query, mean "
        "pairwise cosine between distinct picks (redundancy), share from the prompt's domain, share also picked "
        "by kNN, distinct documents among the N picks (sift_ttft: SIFT's picks for fine-tuning, repeats allowed):", "",
    ]
    keys = ["query_cos", "pair_cos", "same_domain", "knn_overlap", "distinct"]
    rows = [[arm] + [fmt([r[k] for r in v], 2) for k in keys] for arm, v in data["diagnostics"].items()]
    return lines + table(["arm", *keys], rows)
