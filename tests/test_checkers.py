"""Answer checkers on tricky answers, against hand-written expectations."""

from __future__ import annotations

import pytest

from leaf_ray.checkers import check_boxed, check_gsm8k, check_number, last_boxed, resolve_checker
from leaf_ray.config import EvaluationConfig, VerificationConfig


@pytest.mark.parametrize("prediction, answer, expected", [
    ("She pays $1,234 in total.\n#### 1,234", "Step 1 ...\n#### 1234", True),   # thousands separator
    ("#### -7", "the loss is 7 dollars\n#### -7", True),                        # negative
    ("#### 7", "#### -7", False),
    ("#### 2.50", "#### 2.5", True),                                            # compared as numbers
    ("#### 0.5", "#### .5", True),
    ("first 3 then 4, so 12", "#### 12", True),                                 # no ####: the last number
    ("12 at first, then 3", "#### 12", False),
    ("#### 12 because 3*4", "#### 12", True),                                   # the number right after ####
    ("no number here", "#### 12", False),
    ("#### 12", "no number in the reference", False),
])
def test_gsm8k(prediction, answer, expected):
    assert check_gsm8k(prediction, answer) is expected


@pytest.mark.parametrize("text, content", [
    (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"\boxed{1} and finally \boxed{\{a, b\}^{2}}", r"\{a, b\}^{2}"),   # the last one, nested braces
    (r"\boxed{x_{1}+{y}}", r"x_{1}+{y}"),
    (r"\boxed {3}", "3"),
    (r"\boxed{never closed", None),
    ("no box", None),
])
def test_last_boxed_balances_braces(text, content):
    assert last_boxed(text) == content


@pytest.mark.parametrize("prediction, answer, expected", [
    (r"The answer is $\boxed{\dfrac{3}{4}}$.", r"... hence \boxed{\frac{3}{4}}", True),   # \dfrac vs \frac
    (r"\boxed{\left( 1, -2 \right)}", r"\boxed{(1,-2)}", True),                          # \left/\right, spaces
    (r"\boxed{5.0}", r"\boxed{5}", True),                                                # trailing .0
    (r"\boxed{-5}", r"\boxed{5}", False),                                                # negative
    (r"\boxed{\frac{3}{4}}", r"\boxed{\frac{4}{3}}", False),
    (r"\boxed{10}", "10", True),                                                         # a bare reference answer
    ("10", r"\boxed{10}", False),                                                        # a prediction must box it
    (r"\boxed{1,000}", r"\boxed{1,000}", True),
])
def test_boxed(prediction, answer, expected):
    assert check_boxed(prediction, answer) is expected


def test_number_is_the_first_integer():
    assert check_number("-3 apples", "-3") and not check_number("3", "-3") and check_number("x 12, then 4", "12")


def test_checkers_resolve_by_name_and_python_hook():
    assert resolve_checker("boxed") is check_boxed
    hook = resolve_checker("python:tests.test_checkers:always_right")
    assert hook("anything", "else") is True
    with pytest.raises(ValueError, match="unknown checker 'nope'; use one of number, exact, gsm8k, boxed"):
        resolve_checker("nope")
    with pytest.raises(ValueError, match="cannot be imported"):
        resolve_checker("python:tests.test_checkers:missing")


def test_an_unknown_checker_is_a_config_error_naming_the_field():
    with pytest.raises(ValueError, match="checker"):
        VerificationConfig(checker="boxd")
    assert EvaluationConfig(data=["x.jsonl"], checker="gsm8k").checker == "gsm8k"


def always_right(prediction: str, answer: str) -> bool:
    return True
