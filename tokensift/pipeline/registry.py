"""Stages by name. ``@register("votek", kind="select", params=VoteKParams)`` on the stage class.

Built-in stages are imported lazily from ``BUILTIN`` so that ``tokensift --help`` does not import torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from tokensift.config import ConfigError, validate_params
from tokensift.pipeline.stage import Resources

# stage name -> module that registers it
BUILTIN: dict[str, str] = {
    "tokenize": "tokensift.pipeline.tokenize",
    "score_threshold": "tokensift.selectors.threshold",
    "embed": "tokensift.models.embed",
    "votek": "tokensift.selectors.votek",
    "sift": "tokensift.selectors.sift",
    "preselect": "tokensift.selectors.preselect",
    "lm_nll": "tokensift.models.lm_nll",
    "icon_score": "tokensift.selectors.icon_stage",
    "icon": "tokensift.selectors.icon",
    "icon_classify": "tokensift.selectors.icon_classifier",
    "sstoken": "tokensift.scorers.sstoken",
    "eslm": "tokensift.scorers.eslm",
    "shad": "tokensift.scorers.shad",
    "critical": "tokensift.scorers.critical",
    "rejected_answer": "tokensift.scorers.rejected",
    "votek_confidence": "tokensift.selectors.votek_confidence",
}

_REGISTRY: dict[str, StageSpec] = {}


@dataclass(frozen=True)
class StageSpec:
    """A registered stage: its name, kind (``map`` or ``select``), class and params dataclass."""

    name: str
    kind: str
    cls: type
    params: type

    def needs(self, params: Any) -> list[str]:
        return list(self.cls.needs(params))

    def adds(self, params: Any) -> list[str]:
        return list(self.cls.adds(params)) if hasattr(self.cls, "adds") else []


def register(name: str, kind: str, params: type):
    """Class decorator registering a stage under ``name``."""
    if kind not in ("map", "select"):
        raise ValueError(f"stage kind must be 'map' or 'select', got {kind!r}")

    def deco(cls: type) -> type:
        _REGISTRY[name] = StageSpec(name, kind, cls, params)
        return cls

    return deco


def get(name: str) -> StageSpec:
    """The stage registered as ``name``; imports built-ins on first use."""
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in _REGISTRY:
        known = ", ".join(sorted(set(BUILTIN) | set(_REGISTRY)))
        raise ConfigError(f"unknown stage {name!r}; known stages: {known}")
    return _REGISTRY[name]


@dataclass(frozen=True)
class StageEntry:
    """One configured stage of a run: spec, validated params, resources, position."""

    index: int
    spec: StageSpec
    params: Any
    resources: Resources

    @property
    def label(self) -> str:
        return f"stages[{self.index}] ({self.spec.name})"


def resolve(stages: list[Any]) -> list[StageEntry]:
    """Validate every ``{stage: name, resources: {...}, **params}`` entry of a run config."""
    out = []
    for i, raw in enumerate(stages):
        raw = dict(raw)
        where = f"stages[{i}]"
        if "stage" not in raw:
            raise ConfigError(f"{where}: missing 'stage: <name>'")
        spec = get(raw.pop("stage"))
        given = {**getattr(spec.cls, "default_resources", {}), **dict(raw.pop("resources", {}) or {})}
        res = validate_params(Resources, given, f"{where}.resources")
        params = validate_params(spec.params, raw, f"{where} ({spec.name})")
        out.append(StageEntry(i, spec, params, Resources(**res)))
    return out
