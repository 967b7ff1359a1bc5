"""Build the shipped multi-domain sample corpus (news, math, code, instruction) from installed packages.

Layout of ``out_dir``::

    news.parquet  math.parquet  code.parquet  instruction.parquet      train rows
    heldout/<domain>.parquet                                             ~10 % per domain, disjoint ids
    manifest.json                                                        rows, sha256, package versions
    README.md                                                            provenance and licences

Deterministic: the same package and Python versions give the same bytes. Written to a temporary
sibling directory and renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tokensift import __version__
from tokensift.data.provenance import package_versions, readme
from tokensift.data.readers import Record, bbc_news, gsm8k_test, humaneval, python_stdlib
from tokensift.data.sharegpt import sharegpt

# domain -> readers, in output order
DOMAINS: dict[str, tuple[Callable[[], list[Record]], ...]] = {
    "news": (bbc_news,),
    "math": (gsm8k_test,),
    "code": (humaneval, python_stdlib),
    "instruction": (sharegpt,),
}
HELDOUT_FRACTION = 0.1
SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("domain", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("prompt", pa.string()),
        pa.field("response", pa.string()),
    ]
)
STEPS = [*DOMAINS, "manifest"]  # one progress step each


def heldout_ids(ids: list[str], fraction: float = HELDOUT_FRACTION) -> set[str]:
    """The ``round(fraction * len(ids))`` ids with the smallest sha256: stable, and independent of order."""
    ranked = sorted(ids, key=lambda i: hashlib.sha256(i.encode()).hexdigest())
    return set(ranked[: round(fraction * len(ids))])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write(path: Path, domain: str, records: list[Record]) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{**r, "domain": domain} for r in records]
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path, compression="zstd")
    return {"rows": len(rows), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _build_domain(tmp: Path, domain: str) -> tuple[dict, dict]:
    """Write one domain's train and heldout files; return their manifest entries and per-source counts."""
    records = [r for read in DOMAINS[domain] for r in read()]
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i, n in Counter(ids).items() if n > 1)
        raise ValueError(f"domain {domain}: duplicate id {dup!r}")
    held = heldout_ids(ids)
    files = {}
    for rel, part in ((f"{domain}.parquet", [r for r in records if r["id"] not in held]),
                      (f"heldout/{domain}.parquet", [r for r in records if r["id"] in held])):
        files[rel] = {"split": "heldout" if rel.startswith("heldout/") else "train", "domain": domain,
                      **_write(tmp / rel, domain, part)}
    train = Counter(r["source"] for r in records if r["id"] not in held)
    heldout = Counter(r["source"] for r in records if r["id"] in held)
    sources = {s: {"train": train[s], "heldout": heldout[s]} for s in dict.fromkeys(r["source"] for r in records)}
    return files, {"rows": len(records), "heldout_rows": len(held), "sources": sources}


def build_sample(out_dir: Path, progress: Callable[[str], None] | None = None) -> Path:
    """Build the sample corpus into ``out_dir`` (replacing an older build) and return ``out_dir``.

    Args:
        out_dir: target directory; built in a temporary sibling and renamed into place.
        progress: called with each finished step's name (``STEPS``), e.g. to advance a progress bar.
    """
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        manifest = {"name": "tokensift-sample", "builder": f"tokensift {__version__}",
                    "heldout_fraction": HELDOUT_FRACTION, "packages": package_versions(),
                    "files": {}, "domains": {}}
        for domain in DOMAINS:
            files, info = _build_domain(tmp, domain)
            manifest["files"].update(files)
            manifest["domains"][domain] = info
            if progress:
                progress(domain)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / "README.md").write_text(readme(manifest))
        _publish(tmp, out_dir)
        if progress:
            progress("manifest")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``. An identical build already there (a concurrent builder) is kept."""
    try:
        os.rename(tmp, out_dir)
        return
    except OSError:
        if not out_dir.is_dir():
            raise
    existing = out_dir / "manifest.json"
    if existing.is_file() and existing.read_bytes() == (tmp / "manifest.json").read_bytes():
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.replace(out_dir, old / "data")
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def read_sample(sample_dir: Path, domains: list[str] | None = None, heldout: bool = False) -> pa.Table:
    """The train (or heldout) rows of ``domains`` (default: all) of a built sample corpus, in domain order."""
    names = domains or list(DOMAINS)
    unknown = [d for d in names if d not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown sample domain(s) {unknown}; known: {list(DOMAINS)}")
    sub = Path(sample_dir) / "heldout" if heldout else Path(sample_dir)
    paths = [sub / f"{d}.parquet" for d in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"sample corpus file(s) missing: {missing}; run `tokensift sample-data DIR`")
    return pa.concat_tables([pq.read_table(p, schema=SCHEMA) for p in paths])
