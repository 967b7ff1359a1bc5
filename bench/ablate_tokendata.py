"""Data of the token-level part (``bench.ablate_tokenlevel``): GSM8K / ShareGPT fine-tuning rows with prompts
masked, their SHAD and critical-token snapshots, synthetic rejected responses for cDPO, the held-out sets, and
the BBC news snapshot for ESLM's continued pretraining."""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench.ablate_select import read_split
from bench.ablate_train import write_snapshot

SEQ, TOP, ROWS, LR, SEP = 128, 2, 4, 1e-4, "\n\n"
EVAL_MATH_MAX = 160  # held-out GSM8K rows of at most this many tokens (forward only: longer than SEQ is fine)
SNAPSHOTS = {"plain": "snap_plain", "sstoken": "snap_plain", "rft": "snap_shad", "cdpo": "snap_pairs"}  # in work
CALC = re.compile(r"<<([^<>=]*)=(-?\d+)>>(-?\d+)")
ANSWER = re.compile(r"####\s*(-?[\d,]+)")


def inject_error(response: str, rng: random.Random) -> str | None:
    """``response`` with one calculator step's result ``<<e=v>>v`` (chosen by ``rng``) and the ``#### answer``
    shifted by the same nonzero integer; only the answer when there is no integer step; None without an answer."""
    answer = ANSWER.search(response)
    if answer is None:
        return None
    delta = rng.choice([-3, -2, -1, 1, 2, 3])
    steps = list(CALC.finditer(response))
    out = response
    if steps:
        m = rng.choice(steps)
        v = int(m.group(2)) + delta
        out = out[: m.start()] + f"<<{m.group(1)}={v}>>{v}" + out[m.end():]
    answer = ANSWER.search(out)
    wrong = int(answer.group(1).replace(",", "")) + delta
    return out[: answer.start(1)] + str(wrong) + out[answer.end(1):]


def first_difference(a: np.ndarray, b: np.ndarray) -> int:
    """First index where two token sequences differ (the shorter length if one is a prefix of the other)."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


def critical_auroc(weights: np.ndarray, start: int, critical: int) -> float:
    """P(weight of token ``critical`` > weight of another response token ``i >= start``), ties count 1/2."""
    others = np.delete(np.asarray(weights[start:], np.float64), critical - start)
    if not len(others):
        return float("nan")
    w = float(weights[critical])
    return float(((others < w).sum() + 0.5 * (others == w).sum()) / len(others))


def answer_start(tok, response: str, prompt_length: int) -> int:
    """Index (in prompt + response ids) of the first token of the final answer after ``####``."""
    cut = response.rindex("####") + 4
    offsets = tok(response, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return prompt_length + next(t for t, (a, _) in enumerate(offsets) if a >= cut)


def _tokenizer():
    from tokensift.models.causal_lm import SMOLLM2, resolve
    from tokensift.pipeline.tokenize import Tokenize, TokenizeParams

    return Tokenize(TokenizeParams(tokenizer=resolve(SMOLLM2), prompt_column="prompt", response_column="response",
                                   rejected_column="rejected"))


def _pairs_table(domain: str, heldout: bool, n: int, seed: int) -> pa.Table:
    """``n`` drawn rows of ``domain`` (train or heldout) with ``prompt`` (+ separator), ``response``, ``rejected``."""
    t = read_split(heldout, [domain])
    t = t.filter(pc.and_(pc.is_valid(t.column("prompt")), pc.is_valid(t.column("response"))))
    pick = np.random.default_rng(seed).permutation(t.num_rows)[: min(n, t.num_rows)]
    t = t.take(pa.array(pick))
    rng = random.Random(seed)
    responses = t.column("response").to_pylist()
    if domain == "math":
        rejected = [inject_error(r, rng) for r in responses]
    else:
        shift = [(i + 1 + rng.randrange(len(responses) - 1)) % len(responses) for i in range(len(responses))]
        rejected = [responses[j] for j in shift]
    ok = pa.array([r is not None for r in rejected])
    prompts = [p + SEP for p in t.column("prompt").to_pylist()]
    t = pa.table({"id": t.column("id"), "domain": pa.array([domain] * t.num_rows), "prompt": prompts,
                  "response": responses, "rejected": rejected})
    return t.filter(ok)


def _tokenized(tok, t: pa.Table, domain: str, max_tokens: int) -> pa.Table:
    """Tokenize ``t``; math keeps rows that fit in ``max_tokens``, instruction short prompts, cut to ``max_tokens``."""
    t = tok(t)
    n = np.maximum(t.column("n_tokens").to_numpy(), pc.list_value_length(t.column("rejected_input_ids")).to_numpy())
    if domain == "math":
        return t.filter(pa.array(n <= max_tokens))
    t = t.filter(pa.array(t.column("prompt_length").to_numpy() <= SEQ // 3))
    for c in ("input_ids", "loss_mask", "rejected_input_ids", "rejected_loss_mask"):
        t = t.set_column(t.column_names.index(c), c, pc.list_slice(t.column(c), 0, max_tokens))
    return t


def _draw(parts: list[pa.Table], tokens: int) -> pa.Table:
    """Rows taken alternately from ``parts`` until their tokens reach ``tokens``."""
    taken, total = [[] for _ in parts], 0
    for i in range(max(p.num_rows for p in parts)):
        for k, p in enumerate(parts):
            if total < tokens and i < p.num_rows:
                taken[k].append(i)
                total += len(p.column("input_ids")[i])
    return pa.concat_tables([p.take(pa.array(idx, pa.int64())) for p, idx in zip(parts, taken, strict=True) if idx])


def build_sft_data(work: Path, cfg: dict, log) -> dict:
    """Training rows, the plain / SHAD / pair snapshots (SHAD and cDPO offline stages), the evaluation sets."""
    from tokensift.scorers.critical import CriticalParams, CriticalStage
    from tokensift.scorers.shad import SHADParams, SHADStage

    tok = _tokenizer()
    need = cfg["steps"] * ROWS * SEQ + SEQ
    train = _draw([_tokenized(tok, _pairs_table(d, False, 400, 0), d, SEQ) for d in ("math", "instruction")], need)
    structure = ["id", "domain", "input_ids", "loss_mask", "prompt_length"]
    pq_source = work / "train_rows.parquet"
    pq.write_table(train.select(["prompt", "response", "rejected"]), pq_source)
    t0 = time.perf_counter()
    shad = SHADStage(SHADParams(tune_paths=[str(pq_source)], tune_steps=cfg["tune_steps"], tune_lr=LR, tune_batch_size=4,
                                tune_last_layers=TOP, max_length=SEQ, seed=0))
    shad_table = shad(train.select(structure))
    del shad
    shad_seconds = time.perf_counter() - t0
    log(f"tokenlevel: SHAD labels in {shad_seconds:.0f} s")
    t0 = time.perf_counter()
    critical = CriticalStage(CriticalParams(tune_paths=[str(pq_source)], tune_steps=cfg["tune_steps"], tune_lr=LR,
                                            tune_batch_size=4, tune_last_layers=TOP, pairs=True, max_length=SEQ, seed=0))
    pairs = critical(train.select([*structure, "rejected_input_ids", "rejected_loss_mask"]))
    del critical
    critical_seconds = time.perf_counter() - t0
    log(f"tokenlevel: critical-token weights in {critical_seconds:.0f} s")
    for arm, snap_rows in (("plain", train.select(structure)), ("rft", shad_table), ("cdpo", pairs)):
        write_snapshot(snap_rows, work / SNAPSHOTS[arm])
    return {"train": _train_stats(train, shad_table, pairs),
            "offline_seconds": {"shad": shad_seconds, "critical": critical_seconds},
            "evals": _eval_sets(tok, cfg["eval_rows"])}


def _train_stats(train: pa.Table, shad: pa.Table, pairs: pa.Table) -> dict:
    w = np.concatenate([np.asarray(x, np.float32) for x in shad.column("token_weights").to_pylist()])
    domains = train.column("domain").to_pylist()
    aurocs = []
    for r, dom in enumerate(domains):
        if dom != "math":
            continue
        chosen, rejected = (np.asarray(pairs.column(c)[r].as_py()) for c in ("input_ids", "rejected_input_ids"))
        p = int(pairs.column("prompt_length")[r].as_py())
        j = first_difference(chosen, rejected)
        if p <= j < len(rejected):
            aurocs.append(critical_auroc(np.asarray(pairs.column("rejected_token_weights")[r].as_py()), p, j))
    return {"rows": {d: domains.count(d) for d in ("math", "instruction")},
            "tokens": int(pc.sum(pc.list_value_length(train.column("input_ids"))).as_py()),
            "boilerplate_share": float(((w > 0) & (w < 1)).sum() / max((w > 0).sum(), 1)),
            "critical_auroc": aurocs}


def _eval_sets(tok, n: int) -> dict:
    """Held-out instruction and GSM8K rows (ids, prompt lengths; GSM8K: answer starts, injected-error twins)."""
    instr = _tokenized(tok, _pairs_table("instruction", True, 4 * n, 1), "instruction", SEQ).slice(0, n)
    math_rows = _tokenized(tok, _pairs_table("math", True, 4 * n, 1), "math", EVAL_MATH_MAX).slice(0, n)
    plens = math_rows.column("prompt_length").to_pylist()
    starts = [answer_start(tok.tok, r, p) for r, p in zip(math_rows.column("response").to_pylist(), plens, strict=True)]
    return {"instruction": {"ids": instr.column("input_ids").to_pylist(), "starts": instr.column("prompt_length").to_pylist()},
            "math": {"ids": math_rows.column("input_ids").to_pylist(), "starts": plens, "answer": starts,
                     "rejected": math_rows.column("rejected_input_ids").to_pylist()}}


def news_data(work: Path, cfg: dict) -> dict:
    """A packed news snapshot with one epoch of the steps, and held-out articles cut to ``SEQ`` tokens."""
    from tokensift.models.causal_lm import SMOLLM2, resolve
    from tokensift.pipeline.tokenize import Tokenize, TokenizeParams

    def drawn(heldout: bool, n: int) -> pa.Table:
        t = read_split(heldout, ["news"]).select(["id", "text"])
        return t.take(pa.array(np.random.default_rng(0).permutation(t.num_rows)[:n]))

    train = Tokenize(TokenizeParams(tokenizer=resolve(SMOLLM2)))(drawn(False, 200))
    n = np.cumsum(train.column("n_tokens").to_numpy())
    rows = int(np.searchsorted(n, cfg["cpt_steps"] * ROWS * SEQ + SEQ)) + 1
    write_snapshot(train.slice(0, rows).select(["id", "input_ids"]), work / "snap_news")
    held = Tokenize(TokenizeParams(tokenizer=resolve(SMOLLM2), add_eos=False, max_length=SEQ))(
        drawn(True, cfg["eval_rows"]))
    return {"docs": rows, "heldout": held.column("input_ids").to_pylist()}
