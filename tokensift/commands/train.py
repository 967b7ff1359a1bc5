"""``tokensift train CONFIG [key=value ...]``: DeepSpeed training on a snapshot's weighted tokens.

One process: ``tokensift train examples/train_gpt.yaml``. Several: ``torchrun --standalone
--nproc_per_node 2 -m tokensift.cli train CONFIG`` or ``deepspeed --num_gpus 2 -m tokensift.cli train
CONFIG``; each process reads its rank from the launcher's environment.
"""

from __future__ import annotations

import argparse
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="training config (YAML, see examples/train_gpt.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. max_steps=100 data.snapshot=/tmp/s")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")


def main(args: argparse.Namespace) -> int:
    from tokensift.config import load, to_yaml
    from tokensift.trainers.config import TrainConfig, check

    cfg = load(TrainConfig, args.config, args.overrides)
    check(cfg)
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    import torch.distributed as dist

    from tokensift.trainers.train import train

    try:
        record = train(cfg)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if record and os.environ.get("RANK", "0") == "0":
        print(f"step {record['step']}: loss {record['loss']:.4f} -> {cfg.out_dir}")
    return 0
