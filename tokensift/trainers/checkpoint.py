"""Checkpoints through DeepSpeed: model, optimizer and LR schedule (ZeRO-partitioned as configured), plus
the trainer's own state (step, loader position, scorer state) as DeepSpeed ``client_state``."""

from __future__ import annotations

from pathlib import Path


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The tag DeepSpeed's ``latest`` file points at, or ``None`` when there is no checkpoint."""
    latest = Path(ckpt_dir) / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def save(engine, ckpt_dir: str | Path, step: int, client_state: dict) -> str:
    """Save on every rank (ZeRO shards are per rank) under tag ``step_<step>``; returns the tag."""
    tag = f"step_{step:08d}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step, **client_state})
    return tag


def load(engine, ckpt_dir: str | Path) -> dict | None:
    """Restore the latest checkpoint into ``engine``; returns its client state (``None``: nothing saved)."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise FileNotFoundError(f"{ckpt_dir}: checkpoint {tag!r} named in 'latest' could not be loaded")
    return client_state


def load_model_state(ckpt_dir: str | Path, tag: str | None = None) -> dict:
    """The model weights of a saved checkpoint (latest when ``tag`` is None), read without unpickling code."""
    import torch

    tag = tag or latest_tag(ckpt_dir)
    path = Path(ckpt_dir) / str(tag) / "mp_rank_00_model_states.pt"
    if tag is None or not path.is_file():
        raise FileNotFoundError(f"{ckpt_dir}: no model states for checkpoint {tag!r}")
    return torch.load(path, weights_only=True, map_location="cpu")["module"]
