"""Map stage ``rejected_answer``: incorrect responses for preference pairs when no sampler is at hand.

cDPO (``tokensift.scorers.critical``) contrasts correct and incorrect trajectories; the paper samples 64
rollouts per question and keeps the incorrect ones. Without a sampler the usual stand-in is to corrupt a
correct worked answer (GSM8K style: ``<<48/2=24>>24`` calculator annotations, a final ``#### n`` line):

- ``final_number``: the final answer ``#### n`` becomes a wrong number (the error is the last token);
- ``step``: one calculation's result (its ``=c>>`` annotation and the ``c`` written after it) becomes a wrong
  number, and so does the final answer: a reasoning error that the rest of the trajectory carries on from.

The wrong number is ``n + d`` with ``d`` drawn from ``{-10, -2, -1, 1, 2, 10}``, seeded by the row's ``id``
and ``seed``, so the same rows always get the same pairs.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field

import pyarrow as pa

from tokensift.pipeline import schema
from tokensift.pipeline.registry import register

_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
_STEP = re.compile(r"=\s*(-?[\d,]*\.?\d+)>>(-?[\d,]*\.?\d+)")
MODES = ("final_number", "step")


def wrong_number(text: str, rng: random.Random) -> str:
    """A number different from ``text`` (integers stay integers)."""
    value = float(text.replace(",", ""))
    wrong = value + rng.choice((-10, -2, -1, 1, 2, 10))
    return str(int(wrong)) if wrong == int(wrong) and "." not in text else f"{wrong:g}"


def corrupt(answer: str, mode: str, rng: random.Random) -> str | None:
    """``answer`` with one error of kind ``mode``; ``None`` when it has no final ``#### n`` to corrupt."""
    final = _FINAL.search(answer)
    if final is None:
        return None
    if mode == "step":
        steps = list(_STEP.finditer(answer))
        if steps:
            m = rng.choice(steps)
            bad = wrong_number(m.group(1), rng)
            answer = answer[: m.start()] + f"={bad}>>{bad}" + answer[m.end():]
            final = _FINAL.search(answer)
    return answer[: final.start(1)] + wrong_number(final.group(1), rng) + answer[final.end(1):]


@dataclass
class RejectedAnswerParams:
    """Args:
    response_column: the correct response.
    rejected_column: the column written.
    mode: ``final_number`` or ``step`` (see the module docstring).
    seed: mixed with each row's id to draw the error.
    """

    response_column: str = "response"
    rejected_column: str = "rejected"
    mode: str = field(default="final_number", metadata={"choices": MODES})
    seed: int = 0


@register("rejected_answer", kind="map", params=RejectedAnswerParams)
class RejectedAnswer:
    """Adds ``rejected_column``: each row's response with one seeded error (rows must end in ``#### n``)."""

    default_resources = {"compute": "tasks"}

    def __init__(self, params: RejectedAnswerParams):
        if params.mode not in MODES:
            raise ValueError(f"rejected_answer: mode must be one of {', '.join(MODES)}, got {params.mode!r}")
        self.p = params

    @classmethod
    def needs(cls, p: RejectedAnswerParams) -> list[str]:
        return [schema.ID, p.response_column]

    @classmethod
    def adds(cls, p: RejectedAnswerParams) -> list[str]:
        return [p.rejected_column]

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for r, (doc_id, answer) in enumerate(zip(batch.column(schema.ID).to_pylist(),
                                                 batch.column(self.p.response_column).to_pylist(), strict=True)):
            seed = int.from_bytes(hashlib.sha256(f"{self.p.seed}:{doc_id}".encode()).digest()[:8], "little")
            bad = corrupt(answer or "", self.p.mode, random.Random(seed))
            if bad is None:
                raise ValueError(f"rejected_answer: row {r} (id {doc_id!r}): column {self.p.response_column!r} "
                                 "has no final '#### n' answer to corrupt")
            out.append(bad)
        return batch.append_column(self.p.rejected_column, pa.array(out, pa.string()))
