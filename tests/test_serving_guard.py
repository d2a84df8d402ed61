"""The request guard's checks on their own (no server): each refusal, its status and the field
it names, and that well-formed bodies pass. tests/test_serve.py sends the same cases over HTTP."""

from __future__ import annotations

import pytest

from leaf_ray.serving.guard import OpenAIError, RequestLimits, check_request, parse_body

LIMITS = RequestLimits(max_body_bytes=1024, max_n=8, max_stop=4)
CHAT = "/v1/chat/completions"


def refusal(path: str, raw: bytes) -> OpenAIError:
    with pytest.raises(OpenAIError) as caught:
        check_request(path, parse_body(raw), ["m"], LIMITS)
    return caught.value


@pytest.mark.parametrize("raw, status, param, message", [
    (b'{"model": "m", "max_tokens": NaN}', 400, None, "NaN is not a JSON number"),
    (b'{"model": "m", "temperature": Infinity}', 400, None, "Infinity is not a JSON number"),
    (b'{"model": "m", "top_p": 1e999}', 400, "top_p", "not a finite number"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "a \\ud800"}]}', 400, "messages[0].content",
     "invalid Unicode"),
    (b'{"model": "m", "\\udfff": 1}', 400, None, "invalid Unicode"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}]}',
     400, "messages[1].role", "'wizard' is not one of"),
    (b'{"model": "m", "messages": [{"role": ["user"], "content": "x"}]}', 400, "messages[0].role", "is not one of"),
    (b'{"model": "m", "n": 16384}', 400, "n", "between 1 and 8"),
    (b'{"model": "m", "n": 0}', 400, "n", "between 1 and 8"),
    (b'{"model": "m", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop", "at most 4"),
    (b'{"model": "m:lora"}', 404, "model", "does not exist"),
    (b'{"model": "other"}', 404, "model", "does not exist"),
    (b'[1, 2]', 400, None, "must be a JSON object"),
    (b'{"model": ', 400, None, "not valid JSON"),
    (b'{"model": "\xff"}', 400, None, "not valid UTF-8"),
])
def test_each_bad_body_is_refused_naming_the_field(raw, status, param, message):
    error = refusal(CHAT, raw)
    assert (error.status, error.param) == (status, param) and message in error.message
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("body", [
    {"model": "m", "messages": [{"role": r, "content": "ünïcödé ∑ \\frac{1}{2}\n\tcode"} for r in
                                ("system", "developer", "user", "assistant", "tool")], "n": 8,
     "stop": ["a", "b", "c", "d"], "temperature": 0.0, "max_tokens": 8},
    {"messages": [{"role": "user", "content": "no model field: the only model"}]},
    {"model": "m", "prompt": "🙂 emoji are not surrogates", "n": 1},
])
def test_well_formed_bodies_pass(body):
    import json

    check_request(CHAT, parse_body(json.dumps(body, ensure_ascii=False).encode()), ["m"], LIMITS)
    check_request(CHAT, parse_body(json.dumps(body).encode()), ["m"], LIMITS)  # \\u escapes, surrogate pairs


def test_roles_are_only_checked_on_chat():
    body = parse_body(b'{"model": "m", "messages": [{"role": "wizard"}]}')
    check_request("/v1/completions", body, ["m"], LIMITS)
    with pytest.raises(OpenAIError):
        check_request(CHAT, body, ["m"], LIMITS)
