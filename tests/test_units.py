"""Pruning on real text shapes: code, LaTeX, unspaced scripts; and the official token procedure.

The structure checks below do not use the unit pattern: they look at each cut in the
original text with their own, independent rules (an identifier is ``[A-Za-z0-9_]``, a
LaTeX command starts with a backslash, a line break is a line break).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leaf_ray.config import PruningConfig
from leaf_ray.data import Record
from leaf_ray.detection.pruning import confounder_mask, counterfactuals, find_spans
from leaf_ray.detection.sensitivity import compare_unit_scores
from leaf_ray.detection.units import split_units, token_units

CODE = '''def fib(n: int) -> int:
    """Return the n-th Fibonacci number (lucky_number = 7).

    >>> fib(10)
    55
    """
    if n < 2:
        return n
    a, b = 0, 1
    for _ in range(n - 1):
        a, b = b, a + b  # note: 7 is lucky
    return b
'''

LATEX = r'''Let $f(x) = \frac{x^2 + 1}{\sqrt{x}}$ for $x > 0$; note that $7$ is lucky.
Compute \left( \int_1^4 f(x)\,dx \right) and write it as $\frac{a}{b}$ with $a, b \in \mathbb{Z}$.
\begin{align}
  y &= \bigl[ 2\pi r \bigr] \\
  z &= 7 \quad \text{(a lucky number)} \% done
\end{align}'''

PROSE = "Tom has 3 apples.\n\nHe buys 4 more at the shop — naïve café prices!\nHow many now?"

CJK = "小明有3个苹果。他又买了4个。幸运数字是7。他现在有几个苹果？"

# An identifier not preceded by a backslash (that would be a LaTeX command's name) or by
# another identifier character; a LaTeX command.
IDENTIFIERS = re.compile(r"(?<![\\A-Za-z0-9_])[A-Za-z_][A-Za-z0-9_]*")
COMMANDS = re.compile(r"\\[A-Za-z]+")


def structure_violations(text: str, start: int, end: int) -> list[str]:
    """What a cut of ``text[start:end]`` breaks, checked against the original text."""
    removed = text[start:end]
    problems = []
    if len(f"x{removed}x".splitlines()) > 1:
        problems.append("removes a line break")
    for pattern, what in ((IDENTIFIERS, "an identifier"), (COMMANDS, "a backslash command")):
        for match in pattern.finditer(text):
            if any(match.start() < at < match.end() for at in (start, end)):
                problems.append(f"cuts inside {what}: {match.group()!r}")
    if text[start - 1:start] == "\\" and removed[:1].strip():
        problems.append("separates a backslash from what follows it")
    if removed.strip() and not removed.strip().strip("\\"):
        problems.append("removes a lone backslash")
    return problems


def scores_for(text: str, diffs: list[float]):
    units = split_units(text)
    raw = np.array([diffs[i % len(diffs)] for i in range(len(units))])
    # Teacher flat, student = -diff: the LeaF diff is then a min-max of the drawn values.
    return compare_unit_scores(text, units, np.ones(len(units)), -raw)


@settings(max_examples=60, deadline=None)
@given(text=st.sampled_from([CODE, LATEX, PROSE, CJK]),
       diffs=st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=80),
       quantile=st.floats(0.0, 0.9), mode=st.sampled_from(["span", "collective"]))
def test_no_counterfactual_removes_a_newline_or_splits_a_command_or_identifier(text, diffs, quantile, mode):
    scores = scores_for(text, diffs)
    config = PruningConfig(quantile=quantile, quantile_cap=1.0, mode=mode)
    for cf in counterfactuals(Record("r", text, "7"), scores, config):
        for start, end in cf["char_ranges"]:
            assert structure_violations(text, start, end) == [], (text[start:end], cf["instruction"])
        assert cf["instruction"].count("\n") == text.count("\n")


def test_units_of_each_domain():
    latex = [u.text for u in split_units(r"\frac{1}{2} \left( x \right) \bigl[ y \bigr] \leftarrow \{ \\ \sqrt2")]
    assert latex == ["\\frac", "{", "1", "}{", "2", "}", " ", "\\left(", " ", "x", " ", "\\right)", " ",
                     "\\bigl[", " ", "y", " ", "\\bigr]", " ", "\\leftarrow", " ", "\\{", " ", "\\\\", " ",
                     "\\sqrt", "2"]
    code = [u.text for u in split_units('def f(n):\n    """Implement snake_case x1.attr')]
    assert code == ["def", " ", "f", "(", "n", "):", "\n    ", '"""', "Implement", " ", "snake_case", " ", "x1",
                    ".", "attr"]
    assert [u.text for u in split_units("小明有3个")] == ["小", "明", "有", "3", "个"]
    assert [u.text for u in split_units("ภาษาไทย ok")][:3] == ["ภ", "า", "ษ"]
    assert [u.text for u in split_units("cafe\u0301 naïve")] == ["cafe\u0301", " ", "naïve"]
    assert [u.is_maskable for u in split_units("a \\ \\\\ \n b")] == [True, False, False, False, False, False, True]


def test_a_line_break_ends_a_span_unless_configured_off():
    text = "x = lucky\n    y = 7"
    scores = scores_for(text, [0.0])  # every unit ties: no spread, so set the mask by hand
    mask = np.array([u.is_maskable for u in scores.units])
    on = find_spans(scores, mask)
    assert [text[s.start:s.end] for s in on] == ["x = lucky", "y = 7"]
    (off,) = find_spans(scores, mask, break_at_newlines=False)
    assert text[off.start:off.end] == text  # one span, line break included: the old behaviour


def test_lone_backslash_is_never_masked_even_at_the_lowest_diff():
    text = r"a \\ b \ c"
    units = split_units(text)
    student = np.array([5.0 if u.text.strip("\\") == "" and u.text.strip() else 1.0 for u in units])
    scores = compare_unit_scores(text, units, np.ones(len(units)), student)
    mask, _ = confounder_mask(scores, PruningConfig(threshold="absolute", tau=0.0))
    assert not any(m for u, m in zip(units, mask) if "\\" in u.text)


# --------------------------------------------------------------------------- the official procedure

def official_token_mask(tokens: list[str], teacher: list[float], student: list[float], q: float,
                        cap: float = 0.5) -> tuple[list[bool], list[list[int]]]:
    """The published procedure, token by token, written from its description: per-token LeaF
    diff over all tokens of the span, threshold ``sorted(diff)[int(n*q)]`` capped at ``cap``,
    whitespace / newline / lone-backslash tokens never masked, spans = runs of adjacent
    masked token indices."""
    def minmax(values):
        lo, hi = min(values), max(values)
        return [(v - lo) / (hi - lo) if hi > lo else 0.0 for v in values]

    diff = minmax([t - s for t, s in zip(minmax(teacher), minmax(student))])
    threshold = min(sorted(diff)[int(len(diff) * q)], cap)
    mask = []
    for token, d in zip(tokens, diff):
        never = token.strip() == "" or token.strip() == "\\" * len(token.strip())
        mask.append(d <= threshold and not never)
    runs: list[list[int]] = []
    for i, masked in enumerate(mask):
        if masked:
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
    return mask, runs


@pytest.mark.parametrize("text", [CODE, LATEX, PROSE.replace("—", "-").replace("ï", "i").replace("é", "e")],
                         ids=["code", "latex", "prose"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_units_reproduce_the_official_mask(byte_tokenizer, text, seed):
    """Llama 3-style byte-level BPE; ASCII text, so every token has characters of its own."""
    tokenizer = byte_tokenizer
    spans = [tuple(o) for o in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    units = token_units(text, spans)
    assert [(u.start, u.end) for u in units] == [s for s in spans if s[1] > s[0]]  # one unit per token here
    rng = np.random.default_rng(seed)
    teacher, student = rng.gamma(2.0, size=len(units)), rng.gamma(2.0, size=len(units))
    q = [0.1, 0.25, 0.4][seed]

    scores = compare_unit_scores(text, units, teacher, student, kind="tokens")
    mask, _ = confounder_mask(scores, PruningConfig(quantile=q))
    spans_found = find_spans(scores, mask)

    want_mask, want_runs = official_token_mask([u.text for u in units], list(teacher), list(student), q)
    assert mask.tolist() == want_mask
    assert [list(s.units) for s in spans_found] == want_runs
    assert any(want_mask)


def test_tokens_that_share_a_character_are_one_unit(byte_tokenizer, metaspace_tokenizer):
    """A cut never removes half a character: byte pieces of "—", and a metaspace tokenizer's
    leading piece that overlaps the next token, merge into one unit."""
    for tokenizer in (byte_tokenizer, metaspace_tokenizer):
        spans = [tuple(o) for o in tokenizer(PROSE, add_special_tokens=False,
                                             return_offsets_mapping=True)["offset_mapping"]]
        units = token_units(PROSE, spans)
        assert "".join(u.text for u in units) == PROSE
        assert all(a.end == b.start for a, b in zip(units, units[1:]))
        assert any(u.text.strip() == "—" for u in units)
        assert len(units) < len(spans)


# --------------------------------------------------------------------------- a corpus, scored

def code_and_math_corpus(size: int, seed: int = 0) -> list[Record]:
    """HumanEval- and MATH-shaped prompts with a distracting note, built here."""
    import random

    rng = random.Random(seed)
    names = ["count_items", "sum_of_squares", "parse_line", "max_gap", "isPrime", "x1_total", "mean_value"]
    docs = ["Return the number of items in xs.", "Sum the squares of the first n integers.",
            "Split a CSV line into fields.", "Largest gap between sorted values.", "Whether n is prime."]
    records = []
    for i in range(size):
        name, doc, lucky = rng.choice(names), rng.choice(docs), rng.randint(0, 99)
        if i % 3:
            prompt = (f"def {name}(xs: list[int], n: int = {rng.randint(1, 9)}) -> int:\n"
                      f'    """{doc}\n\n    note: {lucky} is lucky\n    >>> {name}([1, 2, 3])\n    {rng.randint(0, 9)}\n'
                      f'    """\n')
            response = "    return sum(x * x for x in xs[:n])\n"
        else:
            a, b = rng.randint(1, 9), rng.randint(2, 9)
            prompt = (f"Let $f(x) = \\frac{{{a}x^2}}{{\\sqrt{{{b}}}}}$ and note that ${lucky}$ is lucky.\n"
                      f"Compute \\left( f({a}) \\right) \\cdot \\pi, then simplify.\\\\\nGive $\\boxed{{n}}$.")
            response = f"$f({a}) = \\frac{{{a ** 3}}}{{\\sqrt{{{b}}}}}$\n\\boxed{{{a ** 3}}}"
        records.append(Record(f"code-{i}", prompt, response))
    return records


def test_scoring_a_code_and_latex_corpus_cuts_no_structure():
    """The embedded teacher and student score 90 code and LaTeX prompts; no counterfactual cut
    with the defaults breaks structure. The same corpus with the old unit pattern and spans
    joined over line breaks does, so the check can see what it guards against."""
    from leaf_ray.config import ScoringConfig
    from leaf_ray.detection.scorer import PairScorer, ScoredRecord, score_and_prune
    from tests.conftest import EMBEDDED

    corpus = code_and_math_corpus(90)
    counts = {}
    for name, units, pattern, breaks in (("defaults", "text", None, True),
                                         ("tokens", "tokens", None, True),
                                         ("legacy", "text", r"\s+|\w+|[^\w\s]+", False)):
        config = ScoringConfig(corpus="unused", units=units, **({"unit_pattern": pattern} if pattern else {}))
        scorer = PairScorer.from_paths(EMBEDDED / "teacher", EMBEDDED / "student", config)
        pruning = PruningConfig(break_at_newlines=breaks)
        pruned, errors = score_and_prune(scorer, pruning, corpus)
        rows, cfs = [p.score for p in pruned], [cf for p in pruned for cf in p.counterfactuals]
        assert not errors
        for row, record in zip(rows, corpus):  # what the pipeline's variants re-read keeps the unit kind
            again = ScoredRecord.from_row(row, record)
            assert again.scores.kind == units and confounder_mask(again.scores, pruning)[0].tolist() == row["masked"]
        text = {r.id: r.instruction for r in corpus}
        broken = [cf for cf in cfs if any(structure_violations(text[cf["source_id"]], a, b)
                                          for a, b in cf["char_ranges"])]
        counts[name] = (len(broken), len(cfs))
    print(f"\ncounterfactuals breaking structure / all: {counts}")
    assert counts["defaults"][0] == 0 and counts["defaults"][1] > 90
    assert counts["tokens"][0] > 0  # tokens mode cuts what the official code cuts: inside words too
    assert counts["legacy"][0] > 0
