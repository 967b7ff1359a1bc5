"""Checkpoints through DeepSpeed: model, optimizer and LR schedule (ZeRO-partitioned as configured), plus
the trainer's own state (step, loader position, scorer state) as DeepSpeed ``client_state``.

Loading never executes code from the checkpoint directory. DeepSpeed unpickles with
``torch.load(weights_only=False)``, which runs whatever a planted ``.pt`` file asks; :func:`load` hands
DeepSpeed a checkpoint engine whose ``load`` is ``torch.load(weights_only=True)``: tensors, containers,
numbers and strings, plus the few plain-state classes a ZeRO 0-2 checkpoint holds (:func:`allowed_globals`).
Any other object in a file refuses the whole checkpoint with an error naming the file.
"""

from __future__ import annotations

import pickle
from pathlib import Path


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds something other than tensors and plain state; nothing of it was run."""


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The tag DeepSpeed's ``latest`` file points at, or ``None`` when there is no checkpoint."""
    latest = Path(ckpt_dir) / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def save(engine, ckpt_dir: str | Path, step: int, client_state: dict) -> str:
    """Save on every rank (ZeRO shards are per rank) under tag ``step_<step>``; returns the tag."""
    tag = f"step_{step:08d}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step, **client_state})
    return tag


def allowed_globals() -> list[type]:
    """The classes besides tensors and builtins that DeepSpeed pickles into a ZeRO 0-2 checkpoint: the loss
    scaler's state, the ZeRO stage enum and the parameter fragment addresses of the optimizer partitions."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | Path, map_location=None):
    """``torch.load`` that only rebuilds tensors, builtins and :func:`allowed_globals`; anything else raises
    :class:`UnsafeCheckpointError` naming ``path`` before any of it runs.

    Args:
        path: a ``.pt`` file.
        map_location: as for ``torch.load``.
    """
    import torch

    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpointError(
            f"{path}: refusing to load a checkpoint file holding more than tensors and plain state ({reason}); "
            "tokensift did not write it, or it was changed"
        ) from None


class _SafeCheckpointEngine:
    """DeepSpeed's checkpoint engine with :func:`safe_load` as its ``load``; everything else passes through."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def load(self, path: str, map_location=None):
        return safe_load(path, map_location)


def load(engine, ckpt_dir: str | Path) -> dict | None:
    """Restore the latest checkpoint into ``engine``; returns its client state (``None``: nothing saved).

    Every file DeepSpeed reads goes through :func:`safe_load`. Universal checkpoints are refused: DeepSpeed
    reads their files with its own ``torch.load(weights_only=False)``.
    """
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    if not tag or Path(tag).name != tag or tag in (".", ".."):
        raise UnsafeCheckpointError(f"{Path(ckpt_dir) / 'latest'}: {tag!r} is not a checkpoint tag in this directory")
    if engine.load_universal_checkpoint():
        raise UnsafeCheckpointError(f"{ckpt_dir}: resuming from a DeepSpeed universal checkpoint is not supported")
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = _SafeCheckpointEngine(inner)
    try:
        path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    finally:
        engine.checkpoint_engine = inner
    if path is None:
        raise FileNotFoundError(f"{ckpt_dir}: checkpoint {tag!r} named in 'latest' could not be loaded")
    return client_state


def load_model_state(ckpt_dir: str | Path, tag: str | None = None) -> dict:
    """The model weights of a saved checkpoint (latest when ``tag`` is None), read without unpickling code."""
    tag = tag or latest_tag(ckpt_dir)
    path = Path(ckpt_dir) / str(tag) / "mp_rank_00_model_states.pt"
    if tag is None or not path.is_file():
        raise FileNotFoundError(f"{ckpt_dir}: no model states for checkpoint {tag!r}")
    return safe_load(path, map_location="cpu")["module"]
