"""Training metrics: one JSON object per logged step in ``<out_dir>/metrics.jsonl`` (rank 0 only)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist


class MetricsWriter:
    """Appends metric lines; a resumed run continues the same file.

    Args:
        path: the JSONL file.
        enabled: False on ranks other than 0.
    """

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def all_reduce_sums(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Sum a few scalars over the ranks (identity in a single process); ``device`` is the comm device."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()
