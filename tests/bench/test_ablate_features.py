"""Bookkeeping of part 6 (bench/ablate_features.py) on toy records: the resumable run log, the smallest length
beyond 2 SE, and the section's rows. No training."""

from __future__ import annotations

import torch  # noqa: F401  (imported once here: the forked workers of ``runs`` inherit it)

from bench.ablate_features import first_clear, runs, section


def records(arms: dict[str, dict[int, list[float]]], metric: str) -> list[dict]:
    return [{"arm": arm, "length": n, "seed": s, "heldout": 8, metric: v, "seconds": 1.0}
            for arm, by_length in arms.items() for n, vs in by_length.items() for s, v in enumerate(vs)]


def test_runs_trains_only_what_is_not_recorded(tmp_path):
    jobs = [{"arm": "a", "length": n, "seed": 0, "heldout": 8} for n in (1, 2, 3)]
    first = runs(tmp_path / "p.jsonl", jobs[:2], lambda job: {"x": 10 * job["length"]}, lambda s: None)
    again = runs(tmp_path / "p.jsonl", jobs, lambda job: {"x": -1}, lambda s: None)
    assert [r["x"] for r in first] == [10, 20] and [r["x"] for r in again] == [10, 20, -1]
    assert again[:2] == first  # read back, "seconds" included, not trained again
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 3


def test_first_clear_is_the_smallest_length_beyond_two_se():
    recs = records({"micro": {10: [0.1, 0.2, 0.3], 20: [0.1, 0.2, 0.3], 40: [0.1, 0.2, 0.3]},
                    "global": {10: [0.15, 0.25, 0.35], 20: [0.5, 0.6, 0.7], 40: [0.6, 0.7, 0.8]}}, "nmi")
    assert first_clear(recs, "global", "micro", "nmi", False) == "**20 steps**: better (+0.400, 2 SE = 0.163)"
    assert first_clear(recs, "global", "micro", "nmi", True) == "**20 steps**: worse (+0.400, 2 SE = 0.163)"
    near = [r for r in recs if r["length"] == 10]
    assert first_clear(near, "global", "micro", "nmi", False) == "**none** of the swept lengths (up to 10 steps)"


def test_section_rows_come_from_the_records():
    moe = [{**r, "max_load": 2.0 + r["seed"], "ce": 5.0} for r in
           records({"micro": {3: [0.1, 0.3]}, "global": {3: [0.2, 0.4]}}, "nmi")]
    mod = [{**r, "steps": 3, "train_flops": 1e9, "routed_share": 0.125} for r in
           records({"dense": {3: [2.0, 2.2]}, "mod_equal_steps": {3: [2.1, 2.3]}, "mod_equal_flops": {3: [1.0, 1.1]}},
                   "bits_per_byte")]
    lines = section({"moe": moe, "mod": mod, "mod_flops_per_token": {"dense": 100.0, "mod": 50.0},
                     "seconds": {"moe": 60.0, "mod": 120.0}})
    assert "| 3 | 6,144 | NMI(domain; expert) | 0.2000 ± 0.1414 | 0.3000 ± 0.1414 | no clear difference (+0.100, 2 SE = 0.283) |" in lines
    assert "| 3 | mod_equal_flops | 3 | 1e+09 | 1.0500 ± 0.0707 | better (-1.050, 2 SE = 0.224) | 0.125 ± 0.000 | 1.0 ± 0.0 |" in lines
    assert "- Smallest swept length with mod_equal_flops vs dense bits/byte beyond 2 SE: **3 steps**: better (-1.050, 2 SE = 0.224)." in lines
    assert sum(line.startswith("| 3 |") for line in lines) == 4 + 3
