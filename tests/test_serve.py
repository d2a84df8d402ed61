"""The Serve application end to end: a real local Ray cluster, the real vLLM CPU engine and the
embedded student and teacher, called over HTTP (requests) and with the openai client."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from leaf_ray.config import ServingConfig
from leaf_ray.models import load_model
from leaf_ray.evaluation import greedy_generate
from leaf_ray.serving.focus import FocusScorer
from tests.conftest import EMBEDDED

pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(not (EMBEDDED / "student").exists(), reason="embedded models not built")]

REPO = Path(__file__).resolve().parents[1]
KEY_ENV, KEY = "LEAF_TEST_API_KEY", "test-key-7f3a"
MODEL_ID = "leaf-student"
MAX_MODEL_LEN = 256
URL = "http://127.0.0.1:8000"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["sue has 1 . sue gets 7 more . there are 5 birds outside . how many does sue have ?",
           "ann has 3 . ann gets 4 more . note : 9 is lucky . how many does ann have ?"]


def chat_body(prompt: str = PROMPTS[0], **extra) -> dict:
    return {"model": MODEL_ID, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8,
            "temperature": 0, **extra}


@pytest.fixture(scope="module")
def server():
    import ray
    from ray import serve

    from leaf_ray.serving.app import build_app

    os.environ[KEY_ENV] = KEY  # before ray.init: the replicas inherit the environment
    # More logical CPUs than this 2-core box has: engine, ingress and focus each reserve some.
    ray.init(num_cpus=8)
    try:
        serve.run(build_app({"model": str(EMBEDDED / "student"), "model_id": MODEL_ID, "dtype": "float32",
                             "max_model_len": MAX_MODEL_LEN, "api_key_env": KEY_ENV,
                             "teacher": str(EMBEDDED / "teacher")}))
        yield URL
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop(KEY_ENV, None)


def assert_still_serving() -> None:
    reply = requests.post(f"{URL}/v1/chat/completions", json=chat_body(), headers=AUTH, timeout=60)
    assert reply.status_code == 200, reply.text


def test_health_answers_without_a_key(server):
    reply = requests.get(f"{server}/health", timeout=30)
    assert reply.status_code == 200
    assert reply.json() == {"status": "ok", "models": [MODEL_ID]}


@pytest.mark.parametrize("method, path", [("get", "/v1/models"), ("post", "/v1/chat/completions"),
                                          ("post", "/v1/completions"), ("post", "/v1/focus")])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}],
                         ids=["no-key", "wrong-key", "no-bearer"])
def test_requests_without_the_key_get_401(server, method, path, headers):
    # A malformed body still gets 401, not 400: the check runs before anything parses the request.
    reply = requests.request(method, server + path, headers={**headers, "Content-Type": "application/json"},
                             data="{not json", timeout=30)
    assert reply.status_code == 401, reply.text
    assert "API key" in reply.json()["error"]["message"]
    assert reply.headers["www-authenticate"] == "Bearer"


def test_models_lists_the_configured_model(server):
    reply = requests.get(f"{server}/v1/models", headers=AUTH, timeout=30)
    assert reply.status_code == 200
    (card,) = reply.json()["data"]
    assert card["id"] == MODEL_ID and card["metadata"]["max_request_context_length"] == MAX_MODEL_LEN


def test_chat_and_completions_over_http_give_the_greedy_answer(server):
    model, tokenizer = load_model(EMBEDDED / "student")
    expected = greedy_generate(model, tokenizer, PROMPTS, max_new_tokens=8)
    for prompt, answer in zip(PROMPTS, expected):
        reply = requests.post(f"{server}/v1/chat/completions", json=chat_body(prompt), headers=AUTH, timeout=60)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["model"] == MODEL_ID
        assert body["choices"][0]["message"]["content"] == answer  # vLLM and transformers agree
        assert 0 < body["usage"]["completion_tokens"] <= 8

    reply = requests.post(f"{server}/v1/completions", headers=AUTH, timeout=60,
                          json={"model": MODEL_ID, "prompt": "sue has 1 .", "max_tokens": 5, "temperature": 0})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert isinstance(body["choices"][0]["text"], str) and 0 < body["usage"]["completion_tokens"] <= 5


def test_openai_client_chat_streaming_completions_and_models(server):
    from openai import AuthenticationError, OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key=KEY, timeout=60, max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL_ID]

    messages = [{"role": "user", "content": PROMPTS[1]}]
    whole = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=8, temperature=0)
    answer = whole.choices[0].message.content
    assert answer and whole.choices[0].finish_reason in ("stop", "length")

    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=8,
                                                 temperature=0, stream=True))
    assert len(chunks) > 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer

    text = client.completions.create(model=MODEL_ID, prompt="ann has 3 .", max_tokens=4, temperature=0)
    assert text.usage.completion_tokens <= 4

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()


LONG_PROMPT = "ann has 3 . " * 200  # far more than MAX_MODEL_LEN tokens

BAD_REQUESTS = {
    "prompt longer than max_model_len": ("/v1/chat/completions", chat_body(LONG_PROMPT), 400, "maximum context length"),
    "completion prompt too long": ("/v1/completions", {"model": MODEL_ID, "prompt": LONG_PROMPT, "max_tokens": 4},
                                   400, "maximum context length"),
    "max_tokens zero": ("/v1/chat/completions", chat_body(max_tokens=0), 400, "max_tokens must be at least 1"),
    "max_tokens negative": ("/v1/completions", {"model": MODEL_ID, "prompt": "a", "max_tokens": -5},
                            400, "max_tokens must be at least 1"),
    "max_tokens beyond max_model_len": ("/v1/chat/completions", chat_body(max_tokens=100_000), 400,
                                        "cannot be greater than max_model_len"),
    "malformed JSON": ("/v1/chat/completions", "{\"model\": ", 400, "JSON decode error"),
    "messages not a list": ("/v1/chat/completions", {**chat_body(), "messages": "hi"}, 400, "valid list"),
    "max_tokens not an integer": ("/v1/chat/completions", chat_body(max_tokens="lots"), 400, "valid integer"),
    "temperature not a number": ("/v1/chat/completions", chat_body(temperature="hot"), 400, "valid number"),
    "unknown model": ("/v1/chat/completions", {**chat_body(), "model": "gpt-9"}, 404, "gpt-9"),
    "focus: unknown model": ("/v1/focus", {"model": "gpt-9", "prompt": "a"}, 404, "gpt-9"),
    "focus: empty prompt": ("/v1/focus", {"prompt": ""}, 400, "at least 1 character"),
    "focus: prompt not a string": ("/v1/focus", {"prompt": 7}, 400, "valid string"),
    "focus: unknown field": ("/v1/focus", {"prompt": "a", "temperature": 1}, 400, "Extra inputs"),
    "focus: too long": ("/v1/focus", {"prompt": LONG_PROMPT, "response": "3"}, 400, "more than the 256 allowed"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_answering(server, name):
    path, body, status, message = BAD_REQUESTS[name]
    data = body if isinstance(body, str) else json.dumps(body)
    reply = requests.post(server + path, data=data, headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
    assert reply.status_code == status, reply.text
    assert message in reply.text
    assert "Traceback" not in reply.text and "ray::" not in reply.text  # a message, not a stack dump
    assert_still_serving()


def test_focus_over_http_equals_the_in_process_scorer(server):
    scorer = FocusScorer.from_paths(str(EMBEDDED / "student"), str(EMBEDDED / "teacher"), max_length=MAX_MODEL_LEN)
    for prompt in PROMPTS:
        reply = requests.post(f"{server}/v1/focus", json={"prompt": prompt, "response": "8"}, headers=AUTH, timeout=60)
        assert reply.status_code == 200, reply.text
        got, expected = reply.json(), scorer.explain(prompt, "8")
        assert got["model"] == MODEL_ID and got["teacher"] is True
        assert [(u["text"], u["start"], u["end"], u["confounder"]) for u in got["units"]] == \
            [(u["text"], u["start"], u["end"], u["confounder"]) for u in expected["units"]]
        for key in ("student", "teacher", "diff"):
            np.testing.assert_allclose([np.nan if u[key] is None else u[key] for u in got["units"]],
                                       [np.nan if u[key] is None else u[key] for u in expected["units"]],
                                       rtol=1e-5, atol=1e-7, equal_nan=True)
        assert [(s["start"], s["end"], s["text"]) for s in got["spans"]] == \
            [(s["start"], s["end"], s["text"]) for s in expected["spans"]]

    # Without a response, the student's own answer is explained: the one the chat endpoint gives.
    reply = requests.post(f"{server}/v1/focus", json={"prompt": PROMPTS[0]}, headers=AUTH, timeout=60)
    chat = requests.post(f"{server}/v1/chat/completions", json=chat_body(max_tokens=16), headers=AUTH, timeout=60)
    assert reply.json()["response_source"] == "student"
    assert reply.json()["response"] == chat.json()["choices"][0]["message"]["content"]


def test_serve_config_file_is_a_valid_serve_config_of_serving_args():
    from ray.serve.schema import ServeDeploySchema

    deploy = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "serve" / "config.yaml").read_text()))
    (application,) = deploy.applications
    assert application.import_path == "leaf_ray.serving.app:build_app"
    config = ServingConfig.model_validate(application.args)
    assert (REPO / config.model).is_dir() and (REPO / config.teacher).is_dir()


def test_the_import_path_resolves_from_the_installed_package_alone(tmp_path):
    """What `serve run` does with the config's import_path, in a process started in another folder
    with the repository nowhere on sys.path (-I: no cwd, no PYTHONPATH): the package is enough."""
    import subprocess
    import sys

    code = ("import sys, importlib.util; from ray._common.utils import import_attr\n"
            f"assert not [p for p in sys.path if p and {str(REPO)!r} == p.rstrip('/')], sys.path\n"
            "build_app = import_attr('leaf_ray.serving.app:build_app')\n"
            "assert importlib.util.find_spec('serve') is None  # no top-level serve/ package any more\n"
            "print(build_app.__module__)")
    done = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("leaf_ray.serving.app")


def test_build_app_names_the_bad_field():
    from pydantic import ValidationError

    from leaf_ray.serving.app import build_app

    with pytest.raises(ValidationError, match="max_model_len"):
        build_app({"model": "m", "max_model_len": 0})
    with pytest.raises(ValidationError, match="api_key_env or api_key_file"):
        build_app({"model": "m", "api_key_env": "A", "api_key_file": "f"})
    with pytest.raises(ValueError, match="model: set the model directory"):
        build_app({})
