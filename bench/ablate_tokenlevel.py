"""Part 5: token-level methods where their papers make claims: fine-tuning a pretrained model (ssToken, SHAD/RFT,
cDPO) and continued pretraining at equal training FLOPs (ESLM). ``python -m bench.ablate --parts tokenlevel [--quick]``.

Protocol (every number is in ``section()``):

- Model: SmolLM2-135M-Instruct (fp32), only its top ``TOP`` decoder layers and final norm trained, the same
  for every arm (``bench.ablate_sft``); the library trainer (DeepSpeed ZeRO-0, AdamW, constant LR, no weight
  decay), ``SEQ``-token rows.
- Fine-tuning data: GSM8K (math; rows whose prompt + response fit in ``SEQ`` tokens, so ``#### answer`` is
  kept) and ShareGPT (instruction; prompts of at most ``SEQ // 3`` tokens, cut to ``SEQ``) train rows, drawn
  alternately (seed 0) until one epoch of the steps; prompt ``<prompt>\\n\\n``, response, EOS; prompts masked.
- Arms, same rows, same steps, same seeds (data order): **plain** SFT; **ssToken** (online scorer: base model
  as history, rho 0.6, gamma 0.5, attention-only for the first 20 % of steps as the release); **RFT** on
  SHAD labels (``SHADStage``: a copy shuffle-tuned on shuffled pairs, LD = l_shuffled - l_original, tau 3);
  **cDPO** (``CriticalStage``: positive / negative copies tuned on the chosen / rejected responses,
  weights 1 - s_t on the rejected side; token-level DPO, sequence form, beta 0.1, reference = base). cDPO's
  rejected responses are synthetic (no rollouts): GSM8K, one calculator step's result (and the final answer)
  shifted by a nonzero integer (:func:`inject_error`); ShareGPT, the response of another drawn prompt.
- Held-out (``sample_data/heldout``): response loss on instruction and on math rows (pooled nats/token), the
  loss of the final-answer tokens after ``####`` (GSM8K), and pair accuracy: the share of held-out GSM8K
  rows whose correct solution is more likely than the same solution with one injected error. Greedy
  decoding accuracy is not measured (a 135M model is near 0 on GSM8K and decoding costs too much here).
- ESLM: continued pretraining on BBC news (plain text, packed). Plain, ESLM (loss score, alpha 0.5) and the
  ``risk_share`` controller (tokensift's stand-in for Ada-ESLM, whose rule is not public) for the same
  steps; plain is also evaluated at the step where its accounted FLOPs (``bench.ablate_sft``) reach each
  ESLM arm's (the same run, constant LR, resumed). Held-out: news loss (first ``SEQ`` tokens of heldout
  articles).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np

from bench.ablate_report import fmt, table, verdict
from bench.ablate_sft import (
    drop_checkpoints,
    flops_per_token,
    run_cost,
    span_losses,
    top_layers_copy,
    train_config,
    train_run,
)
from bench.ablate_tokendata import LR, ROWS, SEQ, SNAPSHOTS, TOP, build_sft_data, news_data

TITLE = "5. Token level on a pretrained model: ssToken, SHAD/RFT and cDPO fine-tuning SmolLM2; ESLM at equal FLOPs"
FULL = {"seeds": [0, 1, 2], "steps": 12, "cpt_steps": 12, "eval_rows": 12, "tune_steps": 8}
QUICK = {"seeds": [0], "steps": 2, "cpt_steps": 2, "eval_rows": 3, "tune_steps": 1}
PAIRS = 2  # cDPO: chosen / rejected pairs per micro-batch
COMMON = [f"data.seq_len={SEQ}", f"data.micro_batch_size={ROWS}", f"optim.lr={LR}", "optim.weight_decay=0",
          "optim.warmup_steps=0", "optim.schedule=constant"]
ARMS = ("plain", "sstoken", "rft", "cdpo")
CPT_ARMS = {"eslm": ["scorer.name=eslm", "scorer.params.alpha=0.5"],
            "risk_share": ["scorer.name=eslm", "scorer.params.alpha_rule=risk_share"]}


def equal_flops_step(target: float, flops_per_step: float, max_steps: int) -> int:
    """The step (1..max_steps) whose cumulative FLOPs ``step * flops_per_step`` is nearest ``target``."""
    return int(min(max_steps, max(1, round(target / flops_per_step))))


def evaluate(model, evals: dict) -> dict:
    """Held-out losses (pooled nats/token) and GSM8K pair accuracy of ``model``."""
    ins, m = evals["instruction"], evals["math"]
    (ins_loss,) = span_losses(model, ins["ids"], [(ins["starts"], None)])
    resp, ans = span_losses(model, m["ids"], [(m["starts"], None), (m["answer"], [len(s) - 1 for s in m["ids"]])])
    (wrong,) = span_losses(model, m["rejected"], [(m["starts"], None)])  # ans: answer tokens, not the EOS
    pooled = lambda a: float(a[:, 0].sum() / a[:, 1].sum())  # noqa: E731
    return {"instruction": pooled(ins_loss), "math": pooled(resp), "answer": pooled(ans),
            "pair_accuracy": float((resp[:, 0] < wrong[:, 0]).mean())}


def cached_json(path: Path, build) -> dict:
    """``path``'s JSON when it exists; otherwise ``build()``, written to ``path`` first."""
    if not path.is_file():
        path.write_text(json.dumps(build()))
    return json.loads(path.read_text())


class Jobs:
    """Finished runs in ``work/runs.jsonl``, so an interrupted part resumes where it stopped."""

    def __init__(self, path: Path):
        self.path = path
        self.done = {r["job"]: r for r in map(json.loads, path.read_text().splitlines())} if path.is_file() else {}

    def get(self, job: str, fn, log) -> dict:
        if job not in self.done:
            record = {"job": job, **fn()}
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            self.done[job] = record
            log(f"tokenlevel {job}: {json.dumps(record)[:400]}")
        return self.done[job]


def sft_arm(base, data: dict, arm: str, seed: int, cfg: dict, work: Path, fwd: float) -> dict:
    """Train one fine-tuning arm for one seed and evaluate it."""
    out = work / "train" / f"{arm}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    extra = {"plain": [], "rft": ["scorer.name=rft", "scorer.params.tau=3.0"],
             "sstoken": ["scorer.name=sstoken", f"scorer.params.rel_warmup_steps={math.ceil(0.2 * cfg['steps'])}"],
             "cdpo": ["objective=token_dpo", f"data.micro_batch_size={PAIRS}", "dpo.beta=0.1", "dpo.form=sequence"]}[arm]
    model = top_layers_copy(base, TOP)
    tc = train_config(work / SNAPSHOTS[arm], out, seed, [*COMMON, f"max_steps={cfg['steps']}", *extra])
    run = train_run(model, tc)
    drop_checkpoints(out)
    rows = 2 * PAIRS if arm == "cdpo" else ROWS
    cost = run_cost(run["records"], rows * SEQ, fwd, data["bwd"], extra_forwards=int(arm in ("sstoken", "cdpo")))
    return {**cost, "seconds": run["seconds"], "loss": evaluate(model, data["evals"])}


def run_sft(base, work: Path, cfg: dict, jobs: Jobs, log) -> dict:
    data = cached_json(work / "sft_data.json", lambda: build_sft_data(work, cfg, log))
    fwd, bwd = flops_per_token(base.config, TOP, SEQ)
    data["bwd"] = bwd
    baseline = jobs.get("base", lambda: {"loss": evaluate(base, data["evals"])}, log)
    runs = {arm: [jobs.get(f"{arm}-s{s}", lambda a=arm, s=s: sft_arm(base, data, a, s, cfg, work, fwd), log)
                  for s in cfg["seeds"]] for arm in ARMS}
    return {"train": data["train"], "offline_seconds": data["offline_seconds"], "base": baseline["loss"],
            "eval_rows": {k: len(v["ids"]) for k, v in data["evals"].items()}, "runs": runs}


def cpt_arm(base, news: dict, name: str, seed: int, phases: list[int], overrides: list[str], work: Path,
            fwd: float, bwd: float) -> dict:
    """One continued-pretraining run, evaluated (held-out news loss) after each step count in ``phases``."""
    out = work / "cpt" / f"{name}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    model = top_layers_copy(base, TOP)
    points, seconds = [], 0.0
    for steps in phases:
        run = train_run(model, train_config(work / "snap_news", out, seed, [*COMMON, f"max_steps={steps}", *overrides]))
        seconds += run["seconds"]
        (loss,) = span_losses(model, news["heldout"], [([1] * len(news["heldout"]), None)])
        points.append({**run_cost(run["records"], ROWS * SEQ, fwd, bwd), "seconds": seconds,
                       "loss": float(loss[:, 0].sum() / loss[:, 1].sum())})
        model.train()
    drop_checkpoints(out)
    return {"points": points}


def run_cpt(base, work: Path, cfg: dict, jobs: Jobs, log) -> dict:
    news = cached_json(work / "news_data.json", lambda: news_data(work, cfg))
    fwd, bwd = flops_per_token(base.config, TOP, SEQ)
    steps = cfg["cpt_steps"]
    runs = {name: [jobs.get(f"cpt-{name}-s{s}", lambda n=name, s=s, o=o: cpt_arm(base, news, n, s, [steps], o, work, fwd, bwd),
                            log)["points"][-1] for s in cfg["seeds"]] for name, o in CPT_ARMS.items()}
    per_step = ROWS * SEQ * (fwd + bwd)  # plain back-propagates every position but document starts
    equal = {name: equal_flops_step(float(np.mean([r["flops"] for r in rs])), per_step, steps) for name, rs in runs.items()}
    phases = sorted({*equal.values(), steps})
    plain = [jobs.get(f"cpt-plain-s{s}", lambda s=s: cpt_arm(base, news, "plain", s, phases, [], work, fwd, bwd), log)
             for s in cfg["seeds"]]
    at = lambda k: [next(p for p in r["points"] if p["steps"] == k) for r in plain]  # noqa: E731
    return {"steps": steps, "docs": news["docs"], "heldout": len(news["heldout"]), "equal_flops_steps": equal,
            "plain": at(steps), "plain_equal_flops": {name: at(k) for name, k in equal.items()}, "runs": runs}


def run(quick: bool, work: Path, log) -> dict:
    """Both halves of the part; ``work`` caches data and finished runs."""
    from tokensift.models.assets import smollm2

    cfg = QUICK if quick else FULL
    work = Path(work) / ("quick" if quick else "full")  # cached runs never cross modes
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base, _ = smollm2()
    base.requires_grad_(False)
    jobs = Jobs(work / "runs.jsonl")
    sft = run_sft(base, work, cfg, jobs, log)
    cpt = run_cpt(base, work, cfg, jobs, log)
    fwd, bwd = flops_per_token(base.config, TOP, SEQ)
    return {"config": {**cfg, "seq": SEQ, "top_layers": TOP, "layers": base.config.num_hidden_layers, "rows": ROWS,
                       "pairs": PAIRS, "lr": LR, "fwd_flops": fwd, "bwd_flops": bwd},
            "sft": sft, "cpt": cpt, "seconds": time.perf_counter() - t0}


SFT_METRICS = {"instruction": ("instruction response loss", True), "math": ("GSM8K response loss", True),
               "answer": ("GSM8K final-answer loss", True), "pair_accuracy": ("GSM8K pair accuracy", False)}
ARM_NAMES = {"plain": "plain SFT", "sstoken": "ssToken", "rft": "SHAD + RFT", "cdpo": "cDPO"}


def _cells(runs: list[dict]) -> list[str]:
    return [str(len(runs)), fmt([r["backprop_tokens"] for r in runs], 0), fmt([r["flops"] / 1e12 for r in runs], 1),
            fmt([r["seconds"] for r in runs], 0)]


def section(data: dict) -> list[str]:
    from tokensift.scorers.eslm import ESLMParams

    c, sft, cpt = data["config"], data["sft"], data["cpt"]
    tr = sft["train"]
    lines = [
        f"SmolLM2-135M-Instruct (fp32), only the top {c['top_layers']} of its {c['layers']} decoder layers and the "
        "final norm trained (embedding / LM head frozen; the same for every arm), by the library's DeepSpeed "
        f"trainer: AdamW, constant LR {c['lr']:g}, no weight decay, {c['steps']} steps of {c['rows']} packed "
        f"{c['seq']}-token rows, seeds {c['seeds']} (the data order). Training rows: {tr['rows']['math']} GSM8K + "
        f"{tr['rows']['instruction']} ShareGPT ({tr['tokens']:,} tokens, one epoch; GSM8K rows that fit in "
        f"{c['seq']} tokens, ShareGPT prompts of at most {c['seq'] // 3} tokens cut to {c['seq']}), prompt "
        "`<prompt>\\n\\n`, prompts masked. ssToken: base model as history, rho 0.6, gamma 0.5, attention only for "
        f"the first {math.ceil(0.2 * c['steps'])} steps. SHAD: a copy shuffle-tuned {c['tune_steps']} steps "
        f"(top {c['top_layers']} layers, LR {c['lr']:g}, 4 rows per step) on shuffled training pairs labels "
        f"{100 * tr['boilerplate_share']:.1f} % of the response tokens boilerplate (LD <= 0); RFT tau 3. cDPO: "
        f"positive / negative copies tuned {c['tune_steps']} steps each on the chosen / rejected responses; "
        "rejected = GSM8K solution with one calculator result and the final answer shifted by a nonzero integer, "
        "or the ShareGPT response of another prompt; on GSM8K pairs the critical weight 1 - s_t of the injected "
        f"token ranks above the pair's other response tokens with probability {fmt(tr['critical_auroc'])} "
        f"(AUROC over {len(tr['critical_auroc'])} pairs; 0.5 = chance); token-level DPO (sequence form, beta 0.1, "
        f"reference = base), {c['pairs']} pairs ({2 * c['pairs']} sequences) per step. Offline stages: SHAD "
        f"{sft['offline_seconds']['shad']:.0f} s, cDPO contrastive models and weights "
        f"{sft['offline_seconds']['critical']:.0f} s (once, seed 0, not in the arms' wall time). Held-out: "
        f"{sft['eval_rows']['instruction']} ShareGPT and {sft['eval_rows']['math']} GSM8K rows (response "
        "tokens, pooled nats/token); final-answer loss = the tokens after `####`; pair accuracy = share of GSM8K "
        "rows whose solution is more likely than its injected-error twin. Greedy-decoding accuracy is not "
        "measured. FLOPs (matmul count): forward "
        f"{c['fwd_flops'] / 1e6:.0f} MFLOPs per position, backward {c['bwd_flops'] / 1e6:.0f} MFLOPs per "
        "back-propagated token (non-zero loss weight); frozen models' forwards (ssToken history, DPO reference) "
        f"included. Wall s: the trainer call (DeepSpeed setup, steps, final checkpoint), not the evaluation. "
        "Mean ± sample std over seeds; verdict vs plain SFT: difference of means against twice its "
        f"standard error. Wall time of the part {data['seconds'] / 60:.1f} min.", ""]
    base = sft["base"]
    rows = [["SmolLM2 before fine-tuning", "1", *(f"{base[k]:.3f}" for k in SFT_METRICS), "—", "—", "—",
             *("—" for _ in SFT_METRICS)]]
    plain = sft["runs"]["plain"]
    for arm, runs in sft["runs"].items():
        vals = {k: [r["loss"][k] for r in runs] for k in SFT_METRICS}
        verdicts = ["—"] * len(SFT_METRICS) if arm == "plain" else [
            verdict(vals[k], [r["loss"][k] for r in plain], low) for k, (_, low) in SFT_METRICS.items()]
        cells = _cells(runs)
        rows.append([ARM_NAMES[arm], cells[0], *(fmt(vals[k]) for k in SFT_METRICS), *cells[1:], *verdicts])
    lines += table(["arm", "runs", *(label for label, _ in SFT_METRICS.values()), "tokens back-propagated",
                    "training TFLOPs", "wall s", *(f"{label} vs plain" for label, _ in SFT_METRICS.values())], rows)
    eq = cpt["equal_flops_steps"]
    lines += ["", f"ESLM: continued pretraining of the same model (top {c['top_layers']} layers) on {cpt['docs']} BBC "
              f"news articles (packed, {c['rows']} x {c['seq']} tokens per step), {cpt['steps']} steps; ESLM keeps "
              "the tokens whose loss is at or above the batch's alpha = 0.5 quantile (the mean of those is the "
              "loss); `risk_share` is tokensift's own alpha controller (alpha moves toward keeping "
              f"{100 * ESLMParams().risk_share:.0f} % of the batch's total loss), a stand-in for Ada-ESLM, whose update rule is not public. Plain continued "
              f"pretraining is evaluated at {cpt['steps']} steps and, in the same run, at the step nearest each "
              f"ESLM arm's accounted FLOPs ({', '.join(f'{k}: {v}' for k, v in eq.items())}). Held-out: first "
              f"{c['seq']} tokens of {cpt['heldout']} held-out articles, nats/token.", ""]
    news = lambda runs: [r["loss"] for r in runs]  # noqa: E731
    rows = [[f"plain, {cpt['steps']} steps", *_cells(cpt["plain"]), fmt(news(cpt["plain"])), "—", "—"]]
    rows += [[f"plain at {name}'s FLOPs ({eq[name]} steps)", *_cells(runs), fmt(news(runs)), "—", "—"]
             for name, runs in cpt["plain_equal_flops"].items()]
    rows += [[name, *_cells(runs), fmt(news(runs)), verdict(news(runs), news(cpt["plain"])),
              verdict(news(runs), news(cpt["plain_equal_flops"][name]))] for name, runs in cpt["runs"].items()]
    lines += table(["arm", "runs", "tokens back-propagated", "training TFLOPs", "wall s", "held-out news loss",
                    "vs plain, equal steps", "vs plain, equal FLOPs"], rows)
    return lines
