"""Answer checkers: does a generated text give a record's answer? Pluggable by name.

A checker is ``check(prediction, answer) -> bool``. Verification (which samples teach
something) and evaluation (accuracy) look them up with :func:`resolve_checker`:

- ``number``: the first integer of each (the embedded benchmark's answers);
- ``exact``: equal after stripping surrounding whitespace;
- ``gsm8k``: the number after the last ``####`` (else the last number), thousands
  separators and a ``$`` ignored, compared as numbers, so ``1,000`` is ``1000.0``;
- ``boxed``: the last ``\\boxed{...}`` (balanced braces), else the whole text, compared
  after light normalisation (spaces, ``\\left``/``\\right``, ``\\dfrac``/``\\tfrac`` to
  ``\\frac``, a trailing ``.0``, surrounding ``$``);
- ``python:module:function``: any importable function with that signature.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

Checker = Callable[[str, str], bool]

_FIRST_INTEGER = re.compile(r"-?\d+")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_number(text: str) -> str | None:
    """The first integer in ``text`` (the benchmark's answers are integers)."""
    match = _FIRST_INTEGER.search(text)
    return match.group() if match else None


def check_number(prediction: str, answer: str) -> bool:
    got = extract_number(prediction)
    return got is not None and got == extract_number(answer)


def check_exact(prediction: str, answer: str) -> bool:
    return prediction.strip() == answer.strip()


def gsm8k_number(text: str) -> Decimal | None:
    """The number after the last ``####``, else the last number in ``text``."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    numbers = _NUMBER.findall(tail.replace("$", ""))
    if not numbers:
        return None
    chosen = numbers[0] if "####" in text else numbers[-1]
    try:
        return Decimal(chosen.replace(",", ""))
    except InvalidOperation:
        return None


def check_gsm8k(prediction: str, answer: str) -> bool:
    got = gsm8k_number(prediction)
    return got is not None and got == gsm8k_number(answer)


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}``, braces balanced; None when there is none
    or it is never closed."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    opening = text.find("{", start)
    if opening < 0:
        return None
    depth = 0
    for index in range(opening, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[opening + 1:index]
    return None


def normalize_math(text: str) -> str:
    text = text.strip().strip("$").strip()
    text = re.sub(r"\\left|\\right", "", text)
    text = re.sub(r"\\[dt]frac", r"\\frac", text)
    text = re.sub(r"\s+", "", text).rstrip(".")
    return re.sub(r"(\d)\.0+$", r"\1", text)


def check_boxed(prediction: str, answer: str) -> bool:
    got = last_boxed(prediction)
    expected = last_boxed(answer)
    expected = answer if expected is None else expected
    return got is not None and normalize_math(got) == normalize_math(expected)


CHECKERS: dict[str, Checker] = {"number": check_number, "exact": check_exact, "gsm8k": check_gsm8k,
                                "boxed": check_boxed}


def resolve_checker(name: str) -> Checker:
    """A checker by name, or ``python:module:function``; ValueError says what is accepted."""
    if name in CHECKERS:
        return CHECKERS[name]
    if name.startswith("python:"):
        module, _, function = name.removeprefix("python:").partition(":")
        try:
            found = getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ValueError(f"checker {name!r} cannot be imported: {exc}") from exc
        if not callable(found):
            raise ValueError(f"checker {name!r} is not callable")
        return found
    raise ValueError(f"unknown checker {name!r}; use one of {', '.join(CHECKERS)} or 'python:module:function'")
