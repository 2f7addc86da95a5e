"""Fan-out prompt and parser: a broad query -> K sub-queries, one per line (SPEC §2 format term, §3)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from r4t_pipeline.paths import assets_dir

PROMPT_FILE = "prompts/fanout.txt"
SYSTEM_FILE = "prompts/fanout_system.txt"


@lru_cache(maxsize=8)
def _read_asset(relative: str, root: str) -> str:
    path = Path(root) / relative
    if not path.is_file():
        raise ValueError(f"prompt file not found: {path}")
    return path.read_text(encoding="utf-8").strip()


def _check_k(k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def build_messages(query: str, k: int) -> list[dict[str, str]]:
    """Chat messages (system + user) asking for `k` sub-queries of `query`."""
    _check_k(k)
    if not query or not query.strip():
        raise ValueError("query must be a non-empty string")
    root = str(assets_dir())
    user = _read_asset(PROMPT_FILE, root).format(query=query.strip(), k=k)
    return [{"role": "system", "content": _read_asset(SYSTEM_FILE, root)}, {"role": "user", "content": user}]


def build_prompt_text(query: str, k: int) -> str:
    """Plain-text prompt for models without a chat template; the completion starts on a new line."""
    system, user = (m["content"] for m in build_messages(query, k))
    return f"{system}\n\n{user}\n\nQueries:\n"


# Chat special tokens: <|...|> (ChatML, Llama 3), </s> <s>, Gemma's <eos>/<end_of_turn>/<start_of_turn>.
_SPECIAL = re.compile(r"<\|[^<>|]{1,40}\|>|</?s>|<(?:eos|bos|pad|unk|end_of_turn|start_of_turn)>")
# Tokens that end the model's turn: text after them belongs to a hallucinated next turn.
_END_OF_TURN = re.compile(r"<\|(?:im_end|endoftext|eot_id|end)\|>|</s>|<eos>|<end_of_turn>")
# A role name right after a start-of-turn token ("<|im_start|>assistant").
_ROLE_AFTER_START = re.compile(
    r"(?:<\|im_start\|>|<\|start_header_id\|>|<start_of_turn>)\s*(?:assistant|user|system|model)\b"
    r"(?:<\|end_header_id\|>)?",
    re.IGNORECASE,
)
# Leading list markers: "1.", "1)", "(1)", "1:", "#1", "Q1:", "Query 1 -", bullets, markdown bold.
_NUMBERING = re.compile(
    r"^(?:[-*•·–—+>]+\s*|\(?\d{1,3}[.):](?:\s+|$|(?=[^\d\s]))|\(\d{1,3}\)\s*|\d{1,3}\s+[-–—]\s+|#\d{1,3}[.):]?\s+"
    r"|(?:sub-?)?(?:query|q)\s*\d{1,3}\s*[.):-]\s*)+",
    re.IGNORECASE,
)
_QUOTE_PAIRS = {'"': '"', "'": "'", "“": "”", "‘": "’", "`": "`", "«": "»"}


@dataclass(frozen=True)
class ParsedFanout:
    """Sub-queries parsed from one completion.

    `n_parsed` counts distinct usable lines BEFORE truncation to k, so extra lines are penalised.
    `is_empty`: nothing usable at all (the reward module gives it the minimum reward).
    `unparseable`: the completion had text but no usable line (a subset of `is_empty`).
    """

    subqueries: tuple[str, ...]
    n_parsed: int
    unparseable: bool

    @property
    def is_empty(self) -> bool:
        return self.n_parsed == 0


def _strip_quotes(line: str) -> str:
    while len(line) >= 2 and _QUOTE_PAIRS.get(line[0]) == line[-1]:
        line = line[1:-1].strip()
    return line


def _clean_line(line: str) -> str:
    line = line.strip().replace("**", "").replace("__", "")
    line = _NUMBERING.sub("", line).strip()
    line = line.rstrip(",;").strip()  # items of a JSON-like or comma-terminated list
    line = _strip_quotes(line)
    line = _NUMBERING.sub("", line).strip()  # numbering inside quotes: '"1. red dress"'
    if line.endswith(":"):  # a header such as "Here are 10 queries:" is not a sub-query
        return ""
    return " ".join(line.split())


def _answer_text(text: str) -> str:
    """Text of the assistant's turn: role headers and special tokens removed, later turns dropped."""
    text = _ROLE_AFTER_START.sub("\n", text)
    segments = [s for s in _END_OF_TURN.split(text) if s.strip() and _SPECIAL.sub("", s).strip()]
    return _SPECIAL.sub("\n", segments[0]) if segments else ""


def distinct_lines(lines: Iterable[str]) -> list[str]:
    """Non-empty lines, whitespace collapsed, the first of each that compares equal case- and
    whitespace-insensitively (SPEC §2's duplicates), order kept."""
    seen: set[str] = set()
    kept: list[str] = []
    for line in (" ".join(line.split()) for line in lines):
        if line and line.casefold() not in seen:
            seen.add(line.casefold())
            kept.append(line)
    return kept


def parse_fanout(text: str, k: int) -> ParsedFanout:
    """Split a completion into at most `k` sub-queries (one per line; markers, quotes, duplicates dropped)."""
    _check_k(k)
    cleaned = (_clean_line(raw) for raw in _answer_text(text).splitlines())
    lines = distinct_lines(line for line in cleaned if any(ch.isalnum() for ch in line))
    return ParsedFanout(subqueries=tuple(lines[:k]), n_parsed=len(lines), unparseable=not lines and bool(text.strip()))


def with_query(query: str, lines: Iterable[str]) -> list[str]:
    """Each line as a sub-query that carries its query in front ("winter essentials" + "marni gold top" -> "winter
    essentials marni gold top"); a line that already starts with the query is kept as it is, so applying this twice
    changes nothing. A fan-out LM warm-started on item names writes lines that name items whatever the intent, so
    their embeddings do not depend on the query; the prefix keeps the intent in every direction."""
    prefix = " ".join(query.split())
    folded = prefix.casefold()

    def carries_query(line: str) -> bool:
        words = " ".join(line.split()).casefold()
        return words == folded or words.startswith(folded + " ")

    return [line if carries_query(line) else f"{prefix} {line}" for line in lines]


def fanout_subqueries(query: str, lines: Iterable[str], prefix_query: bool) -> list[str]:
    """The sub-queries a fan-out's lines stand for: with the query in front (`with_query`) or the lines alone."""
    return with_query(query, lines) if prefix_query else list(lines)


def format_penalty(parsed: ParsedFanout, k: int, coef: float = 0.5) -> float:
    """SPEC §2: `-coef * |k - n_parsed| / k` (0 when exactly k distinct sub-queries were parsed)."""
    _check_k(k)
    return -coef * abs(k - parsed.n_parsed) / k
