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
    se = math.sqrt(so**2 / len(ours) + sb**2 / len(base))
    if abs(d) <= 2 * se:
        return f"no clear difference ({d:+.3f}, 2 SE = {2 * se:.3f})"
    good = d < 0 if lower_is_better else d > 0
    return f"{'better' if good else 'worse'} ({d:+.3f}, 2 SE = {2 * se:.3f})"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |",
            *["| " + " | ".join(r) + " |" for r in rows]]


def moe_section(moe: dict) -> list[str]:
    """One row per balancing mode, one column per metric of ``bench.moe_specialisation.evaluate``."""
    if "unavailable" in moe:
        return [f"MoE balancing unavailable: {moe['unavailable']}"]
    keys = list(next(iter(moe.values()))[0])
    rows = [[mode] + [fmt([r[k] for r in runs], 4) for k in keys] for mode, runs in moe.items()]
    lines = table(["LBL counted over", *keys], rows)
    g, m = moe.get("global"), moe.get("micro")
    if g and m:
        higher_better = {"nmi"}
        lines += ["", "Global vs micro: " + "; ".join(
            f"{k} {verdict([r[k] for r in g], [r[k] for r in m], k not in higher_better)}" for k in keys if k != "seconds") + "."]
    return lines


def mod_section(mod: dict) -> list[str]:
    if "unavailable" in mod:
        return [f"MoD vs dense unavailable: {mod['unavailable']}"]
    rows = [[arm, str(runs[0]["steps"]), f"{runs[0]['train_flops']:.3g}", fmt([r["bits_per_byte"] for r in runs]),
             fmt([r["seconds"] for r in runs], 0)] for arm, runs in mod.items()]
    lines = table(["arm", "steps", "training FLOPs", "heldout bits/byte", "wall s"], rows)
    dense = [r["bits_per_byte"] for r in mod["dense"]]
    for arm in ("mod_equal_steps", "mod_equal_flops"):
        lines.append(f"\n{arm} vs dense: {verdict([r['bits_per_byte'] for r in mod[arm]], dense)}.")
    return lines
