"""Ablation part 2: vote-k where its paper makes its claim: choosing which k unlabeled documents to annotate as
the in-context demonstrations of a frozen LM (Su et al., 2022, "Selective Annotation Makes Language Models
Better Few-Shot Learners"). ``python -m bench.ablate --parts votek [--quick]`` runs it alone.

Protocol:

- Data: ``pool`` BBC train documents (``sample_data/news.parquet``, a fixed draw, seed 0) are the unlabeled
  pool; ``test`` held-out BBC documents (``sample_data/heldout/news.parquet``), the same number per topic
  (seed 0), are classified. Every document is cut to its first 60 words. The topic (``source`` =
  ``bbc/<topic>``) is read only for the chosen demonstrations and for scoring.
- Prompt: ``"Article: <doc>\\nTopic: <label>\\n\\n"`` per demonstration (in the arm's order), then
  ``"Article: <doc>\\nTopic:"``. SmolLM2-135M-Instruct (fp32) predicts argmax_j log p(y_j | prompt) over the
  five single-token labels y = " business", " entertainment", " politics", " sport", " technology"
  (probabilities over the full vocabulary). The demonstrations are one prefix run once; every test document
  reuses its KV cache.
- Arms for each k: **vote-k** (``tokensift.selectors.votek.fast_votek`` on the pool's all-MiniLM-L6-v2
  embeddings: mean-centred cosine graph, each document votes for its ``graph_k`` nearest, greedy
  score(v) = sum over unselected voters u of v of rho^-c(u), rho = 10, c(u) = selected documents u voted
  for); **two-phase vote-k** (``two_phase_votek``: phase 1 = the first max(1, k // 10) greedy picks,
  annotated; phase 2 confidence of every pool document = max_j log p(y_j | phase-1 demonstrations + doc),
  the paper's "mean NLL of the predicted label" for single-token labels; buckets from least to most
  confident, one pick each); **random** (k pool documents per seed, in drawn order); **k-means** (faiss,
  k clusters over the same embeddings, one init per seed; the document nearest each centroid, in cluster
  order); and 0-shot once. The paper's graph has 150 neighbours in a 3,000-document pool; ``graph_k`` keeps
  that share (5 %) of this pool.
- vote-k is deterministic: its single accuracy is compared with a seeded baseline by
  z = (a - mean_b) / (std_b * sqrt(1 + 1/n_b)) (is it outside the baseline's spread?); two seeded arms by
  ``bench.ablate_report.verdict``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

TITLE = "2. vote-k in its setting: choosing k in-context demonstrations (BBC topics, SmolLM2-135M)"
TOPICS = {"business": "business", "entertainment": "entertainment", "politics": "politics", "sports": "sport",
          "tech": "technology"}  # source bbc/<key> -> label word
WORDS = 60
PAPER_GRAPH_K, PAPER_POOL = 150, 3000
FULL = {"pool": 200, "test": 20, "seeds": 5, "ks": [5, 10, 20]}  # 37 prompts x 20 docs: est. 7-10 min, 2 quiet cores
QUICK = {"pool": 100, "test": 20, "seeds": 2, "ks": [5]}
ARMS = {"votek": "vote-k", "two_phase": "two-phase vote-k", "random": "random", "kmeans": "k-means"}


def cut(text: str, words: int = WORDS) -> str:
    return " ".join(text.split()[:words])


def demo(text: str, label: int) -> str:
    return f"Article: {text}\nTopic: {list(TOPICS.values())[label]}\n\n"


def query(text: str) -> str:
    return f"Article: {text}\nTopic:"


def read_docs(heldout: bool, n: int, per_topic: bool) -> tuple[list[str], list[str], list[int]]:
    """``(ids, texts cut to WORDS, topic indices)`` of ``n`` BBC documents (seed 0); ``per_topic``: n / 5 each."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from bench.ablate_select import read_split, sample_rows

    t = read_split(heldout, ["news"])
    if per_topic:
        t = pa.concat_tables([sample_rows(t.filter(pc.equal(t.column("source"), f"bbc/{key}")), n // len(TOPICS), 0)
                              for key in TOPICS])
    else:
        t = sample_rows(t, n, 0)
    labels = [list(TOPICS).index(s.split("/", 1)[1]) for s in t.column("source").to_pylist()]
    return t.column("id").to_pylist(), [cut(x) for x in t.column("text").to_pylist()], labels


def label_logprobs(model, prefix: list[int], suffixes: list[list[int]], labels: list[int],
                   max_tokens: int = 2048, rows: int = 16) -> np.ndarray:
    """``(len(suffixes), len(labels))``: log p(label | prefix + suffix) at each suffix's end, over the full
    vocabulary. The prefix runs once (none when empty) and its KV cache serves every batch of right-padded
    suffixes (``scoring.prefix_cache`` / ``suffix_states``; batches of ``max_tokens`` positions, ``rows`` rows)."""
    import torch

    from tokensift.models import scoring
    from tokensift.models.packed import packed_linears

    out = np.zeros((len(suffixes), len(labels)))
    with torch.inference_mode(), packed_linears(model):
        kv = scoring.prefix_cache(model, prefix)[2] if prefix else None
        for idx in scoring.token_batches([len(s) for s in suffixes], max_tokens, rows):
            ids, mask = scoring.pad([suffixes[i] for i in idx], next(model.parameters()).device)
            if kv is None:
                states, head, _ = scoring.final_states(model, input_ids=ids, attention_mask=mask)
            else:
                states, head = scoring.suffix_states(model, kv, ids, mask)
            last = states[torch.arange(len(idx)), torch.tensor([len(suffixes[i]) - 1 for i in idx])]
            logits = (head(last) if head is not None else last).float()
            out[idx] = logits.log_softmax(-1)[:, labels].double().cpu().numpy()
    return out


class ICL:
    """SmolLM2 classifying by in-context demonstrations; every text is tokenized on its own, once."""

    def __init__(self):
        from tokensift.models.assets import smollm2

        self.model, self.tok = smollm2()
        self.labels = [self._encode(" " + word) for word in TOPICS.values()]
        if any(len(ids) != 1 for ids in self.labels):
            raise ValueError(f"labels must be single tokens, got {self.labels}")
        self.labels = [ids[0] for ids in self.labels]
        self._cache: dict[str, list[int]] = {}

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def encode(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self._encode(text)
        return self._cache[text]

    def logprobs(self, demos: list[tuple[str, int]], texts: list[str]) -> np.ndarray:
        """log p(label) of each text behind the demonstrations ``(text, label)``: ``(len(texts), 5)``."""
        prefix = [t for text, y in demos for t in self.encode(demo(text, y))]
        return label_logprobs(self.model, prefix, [self.encode(query(t)) for t in texts], self.labels)


def outcome(logprobs: np.ndarray, gold: list[int], demo_labels: list[int]) -> dict:
    """Accuracy of the arg-max label and how many topics the demonstrations cover."""
    return {"accuracy": float(np.mean(logprobs.argmax(1) == np.asarray(gold))), "coverage": len(set(demo_labels))}


def random_demos(n: int, k: int, seed: int) -> list[int]:
    return [int(i) for i in np.random.default_rng(seed).choice(n, k, replace=False)]


def kmeans_demos(x: np.ndarray, k: int, seed: int) -> list[int]:
    """k-means (faiss, init ``seed``) on ``x``; per cluster, in cluster order, the nearest row not yet picked."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    km = faiss.Kmeans(x.shape[1], k, niter=20, seed=seed, min_points_per_centroid=1)
    km.train(x)
    dist = ((x[:, None, :] - km.centroids[None]) ** 2).sum(-1)
    picks: list[int] = []
    for c in range(k):
        picks.append(int(next(i for i in np.argsort(dist[:, c], kind="stable") if i not in picks)))
    return picks


def run(quick: bool, work: Path, log) -> dict:
    """Every arm at every k (``QUICK`` or ``FULL`` sizes); ``work`` is not needed (nothing is cached)."""
    from tokensift.models.embed import Encoder
    from tokensift.selectors import votek

    cfg = QUICK if quick else FULL
    start = time.time()
    pool_ids, pool, pool_y = read_docs(False, cfg["pool"], per_topic=False)
    _, test, test_y = read_docs(True, cfg["test"], per_topic=True)
    x = Encoder().encode(pool)
    graph_k = max(1, round(PAPER_GRAPH_K * len(pool) / PAPER_POOL))
    graph = votek.build_graph(x, graph_k)
    icl = ICL()
    log(f"votek: pool {len(pool)}, test {len(test)}, graph k {graph_k}; model and embeddings {time.time() - start:.0f} s")

    def evaluate(picks: list[int]) -> dict:
        t0 = time.time()
        lp = icl.logprobs([(pool[i], pool_y[i]) for i in picks], test)
        return {**outcome(lp, test_y, [pool_y[i] for i in picks]), "demos": [pool_ids[i] for i in picks],
                "seconds": round(time.time() - t0, 1)}

    data = {"setting": {"pool": len(pool), "test": len(test), "per_topic": len(test) // len(TOPICS), "words": WORDS,
                        "graph_k": graph_k, "rho": votek.RHO, "seeds": list(range(cfg["seeds"])), "ks": cfg["ks"],
                        "phase1": {str(k): max(1, k // 10) for k in cfg["ks"]}},
            "zero_shot": evaluate([]), "k": {}}
    log(f"votek: 0-shot {data['zero_shot']['accuracy']:.3f}")
    confidence: dict[tuple, np.ndarray] = {}
    for k in cfg["ks"]:
        phase1 = votek.fast_votek(graph, max(1, k // 10))[0]
        if tuple(phase1) not in confidence:
            confidence[tuple(phase1)] = icl.logprobs([(pool[i], pool_y[i]) for i in phase1], pool).max(1)
        picks = {"votek": [votek.fast_votek(graph, k)[0]],
                 "two_phase": [votek.two_phase_votek(graph, k, confidence[tuple(phase1)], len(phase1))[0]],
                 "random": [random_demos(len(pool), k, s) for s in data["setting"]["seeds"]],
                 "kmeans": [kmeans_demos(x, k, s) for s in data["setting"]["seeds"]]}
        data["k"][str(k)] = {}
        for arm, sets in picks.items():
            data["k"][str(k)][arm] = [evaluate(p) for p in sets]
            acc = [r["accuracy"] for r in data["k"][str(k)][arm]]
            log(f"votek: k={k} {arm}: accuracy {' '.join(f'{a:.3f}' for a in acc)} ({time.time() - start:.0f} s)")
    data["seconds"] = round(time.time() - start)
    return data


def against(ours: list[float], base: list[float]) -> str:
    """Higher accuracy is better. A single (deterministic) value: z against the baseline's spread,
    z = d / (std_b * sqrt(1 + 1/n_b)), ``better``/``worse`` when |z| > 2; seeded arms: ``verdict``."""
    from bench.ablate_report import mean_std, verdict

    if len(ours) > 1:
        return verdict(ours, base, lower_is_better=False)
    m, s = mean_std(base)
    d = ours[0] - m
    if len(base) < 2 or s == 0:
        return f"{d:+.3f} (baseline has no spread)"
    z = d / (s * math.sqrt(1 + 1 / len(base)))
    return f"{'better' if z > 2 else 'worse' if z < -2 else 'no clear difference'} ({d:+.3f}, z = {z:+.1f})"


def cell(values: list[float], digits: int = 3) -> str:
    from bench.ablate_report import fmt

    return fmt(values, digits) if len(values) > 1 else f"{values[0]:.{digits}f} (one run)"


def section(data: dict) -> list[str]:
    from bench.ablate_report import table

    s = data["setting"]
    lines = [
        f"SmolLM2-135M-Instruct (fp32) classifies {s['test']} held-out BBC articles ({s['per_topic']} per topic, "
        f"chance 0.200) by in-context learning; each article is cut to its first {s['words']} words and "
        "demonstrations read `Article: <doc>\\nTopic: <label>`; the prediction is the most probable of the five "
        "single-token labels after `Topic:`. Each arm chooses k demonstrations from the same unlabeled pool of "
        f"{s['pool']} BBC train articles; only the chosen ones are labelled. vote-k: all-MiniLM-L6-v2 embeddings, "
        f"each article votes for its {s['graph_k']} nearest (the paper's 150 of 3,000, the same share of this "
        f"pool), rho = {s['rho']}. Two-phase vote-k: phase 1 = "
        f"{', '.join(f'{n} (k = {k})' for k, n in s['phase1'].items())} greedy picks, phase 2 buckets the pool "
        "by the LM's confidence (max label log-probability with the phase-1 demonstrations in context). Random "
        "and k-means (nearest article to each centroid) are repeated over seeds "
        f"{s['seeds']}; both vote-k arms are deterministic (one run; verdict: z of its accuracy against the "
        "baseline's runs, z = d / (std * sqrt(1 + 1/n)), |z| > 2 called better/worse; seeded arms: difference "
        f"of means against twice its standard error). Accuracy mean ± sample std over runs. 0-shot accuracy: "
        f"{data['zero_shot']['accuracy']:.3f}. Wall time {data['seconds'] / 60:.1f} min.", ""]
    for k, arms in data["k"].items():
        acc = {arm: [r["accuracy"] for r in runs] for arm, runs in arms.items()}
        rows = [[name, str(len(acc[arm])), cell(acc[arm]), cell([r["coverage"] for r in arms[arm]], 1),
                 *("—" if arm == b else against(acc[arm], acc[b]) for b in ("random", "kmeans"))]
                for arm, name in ARMS.items()]
        lines += [f"k = {k} demonstrations:", "",
                  *table(["arm", "runs", "accuracy", "topics covered (of 5)", "vs random", "vs k-means"], rows), ""]
    return lines[:-1]
