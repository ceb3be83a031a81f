"""AUTOMATIC1111's prompt syntax: attention weights and BREAK.

    a (red:1.3) circle      "red" × 1.3            ((red))  × 1.1²        [red]  ÷ 1.1
    \\(not weighted\\)       literal brackets       BREAK    starts a new 75-token chunk

`parse` turns a prompt into (text, weight) fragments, with the same semantics as A1111's parse_prompt_attention:
an unclosed bracket applies to the rest of the prompt, a stray closing one is literal text, and neighbouring
fragments of equal weight are merged (so `(word:1.0)` is the plain prompt `word`).
"""
from __future__ import annotations

import re

ROUND, SQUARE = 1.1, 1 / 1.1
BREAK = "BREAK"

# one token of the syntax: an escape, a bracket, ":weight)", a run of plain text, or a lone colon
_TOKEN = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse(prompt: str) -> list[tuple[str, float]]:
    """[(text, weight), …]; a BREAK is the fragment ("BREAK", -1)."""
    fragments: list[list] = []
    round_open, square_open = [], []

    def scale_from(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= factor

    for m in _TOKEN.finditer(prompt):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):  # an escaped bracket is literal; a lone backslash is dropped (as A1111)
            fragments.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(fragments))
        elif token == "[":
            square_open.append(len(fragments))
        elif weight is not None and round_open:
            scale_from(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale_from(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            scale_from(square_open.pop(), SQUARE)
        else:
            for k, part in enumerate(_BREAK.split(token)):
                if k:
                    fragments.append([BREAK, -1.0])
                fragments.append([part, 1.0])
    for start in round_open:  # unclosed brackets reach to the end
        scale_from(start, ROUND)
    for start in square_open:
        scale_from(start, SQUARE)

    merged: list[list] = []
    for text, weight in fragments:
        if merged and merged[-1][1] == weight and weight != -1:
            merged[-1][0] += text
        elif text or weight == -1:
            merged.append([text, weight])
    return [(t, w) for t, w in merged] or [("", 1.0)]


def is_plain(fragments: list[tuple[str, float]]) -> bool:
    """No weight other than 1 and no BREAK: the prompt encodes exactly as its plain text."""
    return all(w == 1.0 for _, w in fragments)
