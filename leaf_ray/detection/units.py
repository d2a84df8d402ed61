"""The pieces of text that scores are compared on and that pruning keeps or cuts whole.

Text units follow the structure of what users bring: words and identifiers stay whole, a
LaTeX command (``\\frac``, ``\\left(``) is one unit, a script written without spaces gets a
unit per character, and whitespace and lone backslashes are units that are never cut.
Token units are a tokenizer's tokens, for the official code's procedure. Plain Python.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

# Scripts written without spaces between words (Thai, Lao, Myanmar, Khmer, kana, Han): there
# a \w+ run is a whole clause, so each character is a unit.
UNSPACED_SCRIPTS = "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"

# The pieces both tokenizers' scores are projected onto, and that pruning keeps or cuts
# whole; the first alternative that matches at a position wins.
DEFAULT_UNIT_PATTERN = (
    r"\s+"                                                    # whitespace runs: never cut
    r"|\\(?:left|right|[bB]igg?[lr]?)(?:\\[A-Za-z]+|\\[^A-Za-z\s]|[^\w\s\\])"  # \left( \bigl\{
    r"|\\[A-Za-z]+"                                           # LaTeX commands: \frac, \sqrt
    r"|\\[^A-Za-z\s\\]"                                      # LaTeX control symbols: \{ \, \%
    r"|\\+"                                                   # lone backslashes: never cut
    rf"|[{UNSPACED_SCRIPTS}]"                                 # one character of an unspaced script
    rf"|(?:[^\W{UNSPACED_SCRIPTS}]|[\u0300-\u036f])+"         # words and identifiers (with accents)
    r"|[^\w\s\\]+"                                            # punctuation runs
)


class Unit(NamedTuple):
    """A piece of the scored text: ``text[start:end]`` (a tuple: records have hundreds)."""

    start: int
    end: int
    text: str

    @property
    def is_space(self) -> bool:
        return not self.text.strip()

    @property
    def has_line_break(self) -> bool:
        return len(f"x{self.text}x".splitlines()) > 1

    @property
    def is_maskable(self) -> bool:
        """Whitespace (newlines included) and lone backslashes are never cut: they carry the
        layout of code and the syntax of LaTeX, and the official code never masks them."""
        return bool(self.text.strip()) and bool(self.text.strip("\\"))


def split_units(text: str, pattern: str = DEFAULT_UNIT_PATTERN) -> list[Unit]:
    """Cover ``text`` with units; any character the pattern misses becomes its own unit."""
    units: list[Unit] = []
    pos = 0
    for match in re.finditer(pattern, text):
        if match.start() > pos:
            units.append(Unit(pos, match.start(), text[pos:match.start()]))
        if match.end() > match.start():
            units.append(Unit(match.start(), match.end(), match.group()))
        pos = max(pos, match.end())
    if pos < len(text):
        units.append(Unit(pos, len(text), text[pos:]))
    return units


def token_units(text: str, token_spans: Sequence[tuple[int, int]]) -> list[Unit]:
    """Units that are the tokens at ``token_spans`` (character spans in ``text``).

    Tokens that share characters (the byte pieces of one character) become one unit, and
    characters no token covers (a template's trimmed space) become units of their own.
    """
    units: list[Unit] = []
    pos = 0
    for a, b in sorted((max(a, 0), min(b, len(text))) for a, b in token_spans):
        if b <= a:
            continue
        if a < pos:  # shares characters with the previous token: merge
            a = units.pop().start
        elif a > pos:
            units.append(Unit(pos, a, text[pos:a]))
        pos = max(pos, b)
        units.append(Unit(a, pos, text[a:pos]))
    if pos < len(text):
        units.append(Unit(pos, len(text), text[pos:]))
    return units
