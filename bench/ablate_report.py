"""Markdown for ``bench/ablations.md``: mean +- spread over seeds, and a verdict against the baseline."""

from __future__ import annotations

import math

import numpy as np


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def fmt(values: list[float], digits: int = 3) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def verdict(ours: list[float], base: list[float], lower_is_better: bool = True) -> str:
    """``better`` / ``worse`` when the difference of means exceeds twice its standard error, else ``no clear
    difference``; with one seed each there is no spread, so only the sign is reported (``lower`` / ``higher``)."""
    (mo, so), (mb, sb) = mean_std(ours), mean_std(base)
    d = mo - mb
    if len(ours) < 2 or len(base) < 2:
        return f"{'lower' if d < 0 else 'higher'} by {abs(d):.3f} (1 seed: no spread)"
    return judge(d, math.sqrt(so**2 / len(ours) + sb**2 / len(base)), lower_is_better)


def judge(d: float, se: float, lower_is_better: bool = True) -> str:
    """A difference ``d`` with standard error ``se``: ``better`` / ``worse`` beyond ``2 se``, else ``no clear
    difference``; the difference and ``2 SE`` in brackets."""
    if abs(d) <= 2 * se:
        return f"no clear difference ({d:+.3f}, 2 SE = {2 * se:.3f})"
    good = d < 0 if lower_is_better else d > 0
    return f"{'better' if good else 'worse'} ({d:+.3f}, 2 SE = {2 * se:.3f})"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |",
            *["| " + " | ".join(r) + " |" for r in rows]]



def budget_rows(arms: dict[str, list[dict]], domains, verdict_keys) -> list[list[str]]:
    """Rows of an equal-budget table: per arm its mean token share per domain, held-out bits per byte
    (``domains`` and their ``mean``), and verdicts on ``verdict_keys`` against the ``random`` arm."""
    rows = []
    for arm, runs in arms.items():
        share = {d: np.mean([x["snapshot"]["domain_share"][d] for x in runs]) for d in domains}
        cells = [arm, " / ".join(f"{100 * share[d]:.0f}" for d in domains)]
        cells += [fmt([x["bits"][k] for x in runs]) for k in [*domains, "mean"]]
        cells += ["—"] * len(verdict_keys) if arm == "random" else [
            verdict([x["bits"][k] for x in runs], [x["bits"][k] for x in arms["random"]]) for k in verdict_keys]
        rows.append(cells)
    return rows
