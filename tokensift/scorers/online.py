"""The online token-scorer protocol the trainer calls every micro-batch, and a factory by name.

Tensor layout (the trainer's, aligned with the loader's ``labels``): ``token_loss[b, t]`` is the fp32
unreduced CE of predicting ``labels[b, t]`` (detached), ``logits[b, t]`` the detached logits of that
prediction, ``weights[b, t]`` the loader's ``loss_weights`` (0 = not trained: padding, prompts, document
boundaries). A scorer returns new weights [B, T]; the trainer's weighted loss ``sum(w*ce)/sum(w)`` then
gives each method's loss (mean over kept tokens for ESLM / ssToken, the RFT mixture for ``rft``).

``batch`` is the loader's batch (``input_ids``, ``labels``, ``loss_weights``, and where the snapshot has
them ``loss_mask``, ``position_ids``, ``document_ids``). A scorer's ``state_dict()`` is what must survive a
resume (ESLM's alpha, ssToken's step counter and history weights), as a plain dict of tensors, numbers and
lists: the trainer stores it in the checkpoint's client state, loaded with ``weights_only=True``.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

import torch

# name -> "module:Class"
ONLINE_SCORERS = {
    "eslm": "tokensift.scorers.eslm:ESLMScorer",
    "sstoken": "tokensift.scorers.sstoken:SSTokenScorer",
    "rft": "tokensift.scorers.shad:RFTScorer",
}


@runtime_checkable
class OnlineTokenScorer(Protocol):
    """Called by the trainer each micro-batch; ``on_step_end`` after each optimizer step."""

    def __call__(
        self,
        token_loss: torch.Tensor,
        logits: torch.Tensor,
        weights: torch.Tensor,
        batch: dict[str, torch.Tensor],
        model: torch.nn.Module,
    ) -> torch.Tensor: ...

    def on_step_end(self, model: torch.nn.Module) -> None: ...

    def stats(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def get_online_scorer(name: str, params: dict[str, Any] | None = None) -> OnlineTokenScorer:
    """The online scorer ``name`` (``eslm``, ``sstoken``, ``rft``) built from ``params``.

    Unknown names and unknown or mistyped params raise ``ConfigError`` naming them.
    """
    from tokensift.config import ConfigError, validate_params

    if name not in ONLINE_SCORERS:
        raise ConfigError(f"unknown online token scorer {name!r}; known: {', '.join(sorted(ONLINE_SCORERS))}")
    module, cls_name = ONLINE_SCORERS[name].split(":")
    cls = getattr(importlib.import_module(module), cls_name)
    cfg = validate_params(cls.Params, dict(params or {}), f"online scorer {name}")
    return cls(cls.Params(**cfg))
