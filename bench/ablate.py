"""``python -m bench.ablate [--quick] [--seeds N] [--out bench/ablations.md]``: does selection work here?

1. Document selection: from the shipped multi-domain pool (``sample_data``, train split), equal-token-budget
   snapshots by random selection, PreSelect, vote-k, SIFT and ICon (SIFT and ICon steered by one half of the
   target domain's heldout documents; the other half evaluates). The same small GPT (byte tokens) is trained
   with the DeepSpeed trainer on each for the same number of tokens, for every seed; held-out bits per byte
   per domain and on the target domain, mean ± sample standard deviation over seeds.
2. Token level: plain vs ESLM vs ssToken vs RFT (SHAD classes) on one snapshot and token budget: held-out
   loss, share of tokens back-propagated, wall time.
3. Trainer features: micro- vs global-batch MoE balancing (``bench.moe_specialisation``) and MoD vs dense
   at equal steps and at equal FLOPs (``bench.mod``).

Everything is written to ``--out`` (markdown, with the command and the machine) and ``.json`` beside it,
after every arm, so an interrupted run still leaves what it measured. An arm whose piece fails says
``unavailable: <reason>`` instead of stopping the run. Defaults fit about an hour on 2 CPU cores; on a GPU
raise ``--steps``, ``--budget-share`` and the model in ``examples/ablate/train.yaml``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
SELECTORS = ("random", "preselect", "votek", "sift", "icon")
PARTS = ("select", "tokens", "features")

QUICK = {"pool_docs": 600, "steps": 20, "token_rows": 48, "token_steps": 15, "shad_steps": 4, "preselect_docs": 24,
         "icon_fraction": 0.01, "eval_batches": 6, "moe_steps": 10, "mod_steps": 5}
FULL = {"pool_docs": None, "steps": 150, "token_rows": 160, "token_steps": 40, "shad_steps": 20, "preselect_docs": 80,
        "icon_fraction": 0.006, "eval_batches": 40, "moe_steps": 60, "mod_steps": 60}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.ablate", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small pool and few steps (a few minutes)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per arm (default 3)")
    p.add_argument("--out", type=Path, default=HERE / "ablations.md", help="markdown report (.json beside it)")
    p.add_argument("--work", type=Path, default=Path("runs/ablate"), help="snapshots, models, checkpoints")
    p.add_argument("--target", default="math", help="target domain for SIFT / ICon (default math)")
    p.add_argument("--budget-share", type=float, default=0.15, help="token budget as a share of the pool")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--arms", nargs="+", choices=SELECTORS, default=list(SELECTORS))
    p.add_argument("--refresh", action="store_true", help="recompute selection snapshots even if unchanged")
    for key, value in FULL.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value) if value is not None else int, default=None,
                       help=f"(full {value}, quick {QUICK[key]})")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    return args


class Report:
    """Results so far, rewritten to markdown + JSON after every arm."""

    def __init__(self, args: argparse.Namespace, argv: list[str]):
        from bench.__main__ import machine

        self.args, self.start = args, time.time()
        self.command = " ".join(["python -m bench.ablate", *argv])
        self.machine = machine()
        self.data: dict = {"select": {}, "tokens": {}, "moe": None, "mod": None, "snapshot_info": {}, "seconds": {}}

    def write(self) -> None:
        from bench import ablate_report as r
        from bench.ablate_tokens import DECODER_LAYERS, DECODER_WIDTH
        from bench.ablate_train import TRAIN_CONFIG
        from tokensift.config import load
        from tokensift.trainers.config import TrainConfig

        a, d = self.args, self.data
        domains = ["news", "math", "code", "instruction"]
        info = d["snapshot_info"]
        t = load(TrainConfig, TRAIN_CONFIG)
        model = f"GPT {t.model.gpt.n_layer}x{t.model.gpt.n_embd}, seq {t.data.seq_len}, batch {t.data.micro_batch_size}"
        lines = [
            "# Ablations: does selection beat random at this scale?", "",
            f"Command: `{self.command}` (from the repository root). Machine: {self.machine}.",
            f"Mode: {'quick' if a.quick else 'full'}; seeds {list(range(a.seeds))}; wall time so far "
            f"{(time.time() - self.start) / 60:.1f} min; parts: {d['seconds']}.", "",
            "## 1. Document selection at an equal token budget", "",
            f"Pool: {info.get('pool_docs', '?')} documents, {info.get('pool_tokens', 0):,} byte tokens (sample corpus, "
            f"train split). Budget: {a.budget_share:.0%} of the pool's tokens = {info.get('budget', 0):,} tokens per "
            f"snapshot (the shortest prefix of each method's order reaching it). Each arm trains "
            f"`examples/ablate/train.yaml` ({model}, byte tokens) for {a.steps} steps with the "
            f"DeepSpeed trainer; random draws a new snapshot per seed, the other selectors are deterministic and "
            f"only the training seed varies. Target domain: **{a.target}** (SIFT queries and ICon assessment: the "
            f"odd-hash half of heldout/{a.target}; evaluation: the other half). Held-out bits per byte: at most "
            f"{a.eval_batches} batches of 16x128 per domain, mean ± sample std over seeds; verdict = difference of "
            "means against twice its standard error.", "",
            *r.selection_section(d["select"], domains, a.target), "",
            "## 2. Token level: one snapshot, one token budget", "",
            f"Snapshot: {d.get('tokens_info', {})}. Every arm trains the same randomly initialised {DECODER_LAYERS}x{DECODER_WIDTH} Llama decoder (HF transformers, SmolLM2 vocabulary), {a.token_steps} steps of 8x{t.data.seq_len} tokens; loss on "
            "response tokens (prompt masked) of heldout rows, nats per token.", "",
            *r.token_section(d["tokens"]), "",
            "## 3. Trainer features", "",
            f"### MoE: micro- vs global-batch load balancing (bench.moe_specialisation, {a.moe_steps} steps)", "",
            *(r.moe_section(d["moe"]) if d["moe"] else ["not run"]), "",
            f"### MoD vs dense (bench.mod's models and loop, {a.mod_steps} dense steps)", "",
            *(r.mod_section(d["mod"]) if d["mod"] else ["not run"]), "",
        ]
        notes = HERE / "ablate_notes.md"  # hand-written reading of the last full run
        if notes.is_file():
            lines += [notes.read_text()]
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        self.args.out.write_text("\n".join(lines) + "\n")
        self.args.out.with_suffix(".json").write_text(json.dumps({"command": self.command, "machine": self.machine,
                                                                  **self.data}, indent=1, default=str))


def unavailable(e: BaseException) -> dict:
    traceback.print_exc()
    return {"unavailable": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


def run_selection(args, report: Report) -> None:
    from bench.ablate_select import DOMAINS, Selectors, read_split, target_split
    from bench.ablate_train import bits, heldout_loss, train_arm, write_eval_snapshot
    from tokensift.pipeline.tokenize import TokenizeParams

    work = args.work.resolve()
    sel = Selectors(work, args.pool_docs, args.target, args.budget_share, args.preselect_docs, args.icon_fraction,
                    args.refresh)
    report.data["snapshot_info"] = {"pool_docs": len(sel.ids), "pool_tokens": sum(sel.tokens.values()), "budget": sel.budget}
    evals = {}
    for d in DOMAINS:
        table = read_split(True, [d])
        table = target_split(table)[1] if d == args.target else table
        evals[d] = write_eval_snapshot(table, work / "eval_bytes" / d, TokenizeParams(tokenizer="byte", max_length=4096))
    for arm in args.arms:
        t0 = time.time()
        try:
            order = None if arm == "random" else getattr(sel, arm)()
            snap_stats, runs = None, []
            for seed in range(args.seeds):
                snap = work / "snap" / (f"random-s{seed}" if arm == "random" else arm)
                if arm == "random" or seed == 0:
                    snap_stats = sel.snapshot(sel.random(seed) if arm == "random" else order, snap)
                model, stats = train_arm(snap, work / "train" / f"{arm}-s{seed}", seed, [f"max_steps={args.steps}"])
                stats["bits"] = {d: bits(heldout_loss(model, e, model.config.block_size, max_batches=args.eval_batches))
                                 for d, e in evals.items()}
                stats["bits"]["mean"] = sum(stats["bits"][d] for d in DOMAINS) / len(DOMAINS)
                runs.append(stats)
            report.data["select"][arm] = {"snapshot": snap_stats, "runs": runs, "seconds": time.time() - t0}
        except Exception as e:  # one missing or broken method must not stop the others
            report.data["select"][arm] = unavailable(e)
        report.write()
        print(f"ablate select {arm}: {time.time() - t0:.0f} s", flush=True)


def run_tokens(args, report: Report, pool_ids: set[str]) -> None:
    from bench.ablate_tokens import ARMS, TokenArms

    try:
        arms = TokenArms(args.work.resolve(), pool_ids, args.token_rows, args.target, args.shad_steps, args.refresh)
    except Exception as e:
        report.data["tokens"] = {arm: unavailable(e) for arm in ARMS}
        return
    report.data["tokens_info"] = arms.shad_stats
    for arm in ARMS:
        t0 = time.time()
        try:
            report.data["tokens"][arm] = {"runs": [arms.run(arm, s, args.token_steps, args.eval_batches) for s in range(args.seeds)]}
        except Exception as e:
            report.data["tokens"][arm] = unavailable(e)
        report.write()
        print(f"ablate tokens {arm}: {time.time() - t0:.0f} s", flush=True)


def run_features(args, report: Report) -> None:
    from bench import ablate_features

    try:
        report.data["moe"] = ablate_features.moe(list(range(args.seeds)), args.moe_steps, 16 if args.quick else 48)
    except Exception as e:
        report.data["moe"] = unavailable(e)
    report.write()
    try:
        report.data["mod"] = ablate_features.mod(list(range(args.seeds)), args.mod_steps, 32 if args.quick else 128)
    except Exception as e:
        report.data["mod"] = unavailable(e)
    report.write()


def pool_ids(pool_docs: int | None) -> set[str]:
    """Ids of the ablation pool (the same draw as ``Selectors``)."""
    from bench.ablate_select import read_split, sample_rows

    return set(sample_rows(read_split(False), pool_docs, seed=0).column("id").to_pylist())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("RAY_AUTH_MODE", "disabled"),
                       ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"), ("DS_ACCELERATOR", "cpu"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)
    args.work.mkdir(parents=True, exist_ok=True)
    report = Report(args, argv)
    for part in args.parts:
        t0 = time.time()
        if part == "select":
            run_selection(args, report)
        elif part == "tokens":
            run_tokens(args, report, pool_ids(args.pool_docs))
        else:
            run_features(args, report)
        report.data["seconds"][part] = round(time.time() - t0)
        report.write()
    port = os.environ.get("MASTER_PORT")  # DeepSpeed's shared-memory buffers of this process
    for f in Path("/dev/shm").glob(f"deepspeed_*_{port}_*") if port else []:
        f.unlink(missing_ok=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
