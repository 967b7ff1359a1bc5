"""Map stage ``icon_score``: ICon statistics of a subset of candidates, on causal-LM Ray actors.

Each actor loads the target LM and the assessment set once, computes PPL(S) for every assessment sample,
then scores the candidates of its batches (see ``icon_scorer.py`` for the token layout and the prefix KV
reuse). Only rows in the scored subset (``subset_fraction``, chosen by a seeded hash of the id, so the
subset does not depend on sharding or batching) get values; the others get nulls. The classifier of the
``icon`` select stage learns from the scored rows and scores every row.

Written columns (float32 unless noted): ``icon_significance``, ``icon_consistency``, ``icon_stability``,
``icon_coverage``, ``icon_mean_influence``, ``icon_forward_passes`` (int32: forward passes spent on the row).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from tokensift.models.causal_lm import DTYPES, load_causal_lm
from tokensift.models.scoring import DEFAULT_MAX_TOKENS, use_assigned_cpus
from tokensift.pipeline import schema, sources
from tokensift.pipeline.registry import register
from tokensift.selectors.icon import score_candidate
from tokensift.selectors.icon_scorer import CONTROLS, TEMPLATE, IConScorer, candidate_text

SIGNIFICANCE = "icon_significance"
STAT_COLUMNS = ("significance", "consistency", "stability", "coverage", "mean_influence")
FORWARD_PASSES = "icon_forward_passes"


@dataclass
class AssessmentParams:
    """Args:
    paths: Parquet / JSONL files (or dirs, globs) of assessment samples, disjoint from the pool.
    prompt_column: column with the assessment instruction (formatted with ``template``).
    response_column: column with the response whose perplexity is measured.
    template: format of the instruction, ``{prompt}`` is replaced (``"{prompt}"`` for pre-formatted inputs).
    max_samples: cap on the assessment set (a seeded sample; ``None``: all rows, the paper used 1,020).
    seed: seed of that sample.
    """

    paths: list[str] = field(default_factory=list)
    prompt_column: str = "prompt"
    response_column: str = "response"
    template: str = TEMPLATE
    max_samples: int | None = field(default=None, metadata={"ge": 1})
    seed: int = 0


@dataclass
class IConScoreParams:
    """Args:
    model: target LM: local directory, hub name, or ``smollm2`` (the shipped SmolLM2-135M-Instruct).
    gguf_file: GGUF file inside ``model`` (dequantized once and cached).
    dtype: ``auto`` (float32 on CPUs, bfloat16 on GPUs), ``float32``, ``bfloat16`` or ``float16``.
    device: ``cpu``, ``cuda``... (give the actors ``resources.num_gpus`` accordingly).
    assessment: the assessment set.
    prompt_column: candidate instruction column (rows where it is null use ``text_column`` as is).
    response_column: candidate response column.
    text_column: candidate plain text.
    template: format of a candidate's instruction; the response follows it directly (reference layout).
    subset_fraction: share of rows scored (the paper scored 5,000 of 52,002 Alpaca samples).
    control: ``per_candidate``, ``per_pair`` (reference) or ``none`` (no random-context control).
    kv_reuse: run each context once and score the assessment samples behind its KV cache.
    batch_size: at most this many assessment samples per forward pass (``None``: only ``max_batch_tokens``).
    max_batch_tokens: padded token positions per forward pass (suffix positions behind a cached context).
    max_context_tokens: candidate truncation (reference 2040).
    max_segment_tokens: truncation of assessment input and response (reference 1024).
    seed: seeds the subset and the random controls.
    """

    model: str = "smollm2"
    gguf_file: str | None = None
    dtype: str = field(default="auto", metadata={"choices": DTYPES})
    device: str = "cpu"
    assessment: AssessmentParams = field(default_factory=AssessmentParams)
    prompt_column: str | None = "prompt"
    response_column: str | None = "response"
    text_column: str = schema.TEXT
    template: str = TEMPLATE
    subset_fraction: float = field(default=1.0, metadata={"gt": 0, "le": 1})
    control: str = field(default="per_candidate", metadata={"choices": CONTROLS})
    kv_reuse: bool = True
    batch_size: int | None = field(default=None, metadata={"ge": 1})
    max_batch_tokens: int = field(default=DEFAULT_MAX_TOKENS, metadata={"ge": 1})
    max_context_tokens: int = field(default=2040, metadata={"ge": 0})
    max_segment_tokens: int = field(default=1024, metadata={"ge": 1})
    seed: int = 0


def in_subset(ids: list[str], fraction: float, seed: int) -> np.ndarray:
    """Seeded, shard-independent membership: sha256(seed:id) as a number in [0, 1) below ``fraction``."""
    u = [int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big") / 2**64 for i in ids]
    return np.asarray(u) < fraction


def load_assessment(a: AssessmentParams) -> list[tuple[str, str]]:
    """``(formatted input, response)`` pairs from the assessment files, capped by a seeded sample."""
    if not a.paths:
        raise ValueError("icon_score: assessment.paths is empty; give the assessment set's files")
    pairs = []
    for shard in sources.expand(list(a.paths)):
        table = sources.read(shard, a.prompt_column, schema.ID)  # the prompt arrives as column ``text``
        if a.response_column not in table.column_names:
            raise sources.SourceError(f"{shard.path}: no column {a.response_column!r} (icon assessment.response_column)")
        for row, (x, y) in enumerate(
            zip(table.column(schema.TEXT).to_pylist(), table.column(a.response_column).to_pylist(), strict=True)
        ):
            if x is None or y is None:
                raise sources.SourceError(f"{shard.path}: row {row}: assessment prompt or response is null")
            pairs.append((a.template.format(prompt=x), y))
    if a.max_samples is not None and len(pairs) > a.max_samples:
        keep = np.sort(np.random.default_rng(a.seed).choice(len(pairs), a.max_samples, replace=False))
        pairs = [pairs[i] for i in keep]
    return pairs


@register("icon_score", kind="map", params=IConScoreParams)
class IConScore:
    """ICon significance (+ consistency, stability, coverage) of the rows in the scored subset."""

    def __init__(self, params: IConScoreParams):
        if not 0 < params.subset_fraction <= 1:
            raise ValueError(f"icon_score.subset_fraction must be in (0, 1], got {params.subset_fraction}")
        if params.control not in CONTROLS:
            raise ValueError(f"icon_score.control must be one of {CONTROLS}, got {params.control!r}")
        self.p = params
        use_assigned_cpus()
        model, tok = load_causal_lm(params.model, params.gguf_file, params.dtype, params.device)
        self.scorer = IConScorer(
            model,
            tok,
            load_assessment(params.assessment),
            max_context_tokens=params.max_context_tokens,
            max_segment_tokens=params.max_segment_tokens,
            batch_size=params.batch_size,
            max_batch_tokens=params.max_batch_tokens,
            kv_reuse=params.kv_reuse,
            control=params.control,
            seed=params.seed,
        )

    @classmethod
    def needs(cls, p: IConScoreParams) -> list[str]:
        return [c for c in (p.text_column, p.prompt_column, p.response_column) if c]

    @classmethod
    def adds(cls, p: IConScoreParams) -> list[str]:
        return [f"icon_{s}" for s in STAT_COLUMNS] + [FORWARD_PASSES]

    def __call__(self, batch: pa.Table) -> pa.Table:
        p = self.p
        ids = batch.column(schema.ID).to_pylist()
        texts = batch.column(p.text_column).to_pylist()
        n = len(ids)
        prompts = batch.column(p.prompt_column).to_pylist() if p.prompt_column else [None] * n
        responses = batch.column(p.response_column).to_pylist() if p.response_column else [None] * n
        chosen = in_subset(ids, p.subset_fraction, p.seed)
        values = {s: [None] * n for s in STAT_COLUMNS}
        passes = [None] * n
        for r in np.flatnonzero(chosen):
            text = candidate_text(prompts[r], responses[r], texts[r], p.template)
            stats = score_candidate(self.scorer, text, ids[r])
            for s in STAT_COLUMNS:
                values[s][r] = stats[s]
            passes[r] = stats["forward_passes"]
        for s in STAT_COLUMNS:
            batch = batch.append_column(f"icon_{s}", pa.array(values[s], pa.float32()))
        return batch.append_column(FORWARD_PASSES, pa.array(passes, pa.int32()))
