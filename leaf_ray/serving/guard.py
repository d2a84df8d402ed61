"""Checks an HTTP request body before Ray's ingress or the engine sees it.

Ray's OpenAI ingress and vLLM validate most fields, but some inputs get through them and
fail deep inside with a 500 and internal text (``"max_tokens": NaN``, a lone surrogate, a
LoRA-style model id), and some are accepted that should not be (an unknown role, ``n`` in
the thousands). :func:`check_request` refuses those with an :class:`OpenAIError`: a 4xx in
OpenAI's error shape, whose message names the field. Plain Python; the ASGI middleware in
:mod:`leaf_ray.serving.app` only calls it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

# The roles OpenAI's chat API defines; anything else would be rendered by the chat template
# as if it meant something.
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


class OpenAIError(Exception):
    """An error response in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 type: str = "invalid_request_error", code: str | int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type
        self.code = status if code is None else code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class RequestLimits:
    max_body_bytes: int
    max_n: int
    max_stop: int


def _reject_constant(name: str) -> None:
    raise OpenAIError(400, f"{name} is not a JSON number: send a finite number")


def parse_body(raw: bytes) -> Any:
    """The JSON body; 400 for invalid UTF-8, invalid JSON, NaN or Infinity."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OpenAIError(400, f"the body is not valid UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise OpenAIError(400, f"the body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") \
            from None


def _check_values(value: Any, where: str) -> None:
    """Every string valid Unicode (no lone surrogates, which JSON's \\ud800 escapes allow) and
    every number finite (1e999 parses to infinity)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise OpenAIError(400, f"{where or 'body'}: invalid Unicode (a lone surrogate)", param=where or None) \
                from None
    elif isinstance(value, float) and not math.isfinite(value):
        raise OpenAIError(400, f"{where}: not a finite number", param=where or None)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_values(key, where)
            _check_values(item, f"{where}.{key}" if where else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_values(item, f"{where}[{index}]")


def check_request(path: str, body: Any, models: Collection[str], limits: RequestLimits) -> None:
    """Raise :class:`OpenAIError` for a body no endpoint should see; return for the rest, which
    Ray's ingress and vLLM validate further."""
    _check_values(body, "")
    if not isinstance(body, dict):
        raise OpenAIError(400, "the body must be a JSON object")
    model = body.get("model")
    if model is not None and model not in models:
        raise OpenAIError(404, f"the model {model!r} does not exist; served: {sorted(models)}",
                          param="model", code="model_not_found")
    n = body.get("n")
    if n is not None and isinstance(n, int) and not isinstance(n, bool) and not 1 <= n <= limits.max_n:
        raise OpenAIError(400, f"n must be between 1 and {limits.max_n} (max_n in the serving config)", param="n")
    stop = body.get("stop")
    if isinstance(stop, list) and len(stop) > limits.max_stop:
        raise OpenAIError(400, f"stop: at most {limits.max_stop} stop strings", param="stop")
    if path.endswith("/chat/completions") and isinstance(body.get("messages"), list):
        for index, message in enumerate(body["messages"]):
            role = message.get("role") if isinstance(message, dict) else None
            if role is not None and (not isinstance(role, str) or role not in ROLES):
                raise OpenAIError(400, f"messages[{index}].role: {role!r} is not one of {sorted(ROLES)}",
                                  param=f"messages[{index}].role")
