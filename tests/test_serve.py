"""The Serve application end to end: a real local Ray cluster, the real vLLM CPU engine and the
embedded student and teacher, called over HTTP (requests) and with the openai client."""

from __future__ import annotations

import http.client
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from leaf_ray.config import ServingConfig
from leaf_ray.models import load_model
from leaf_ray.evaluation import greedy_generate
from leaf_ray.serving.focus import FocusScorer
from tests.conftest import EMBEDDED, KV_CACHE_BYTES

pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(not (EMBEDDED / "student").exists(), reason="embedded models not built")]

REPO = Path(__file__).resolve().parents[1]
KEY_ENV, KEY = "LEAF_TEST_API_KEY", "test-key-7f3a"
MODEL_ID = "leaf-student"
MAX_MODEL_LEN = 256
URL = "http://127.0.0.1:8000"
APP, GCS_PORT, DASHBOARD_PORT = "attached", 6391, 8276
FOCUS_QUEUE = 1  # /v1/focus queue per ingress replica: small, so the back-pressure test can fill it
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["sue has 1 . sue gets 7 more . there are 5 birds outside . how many does sue have ?",
           "ann has 3 . ann gets 4 more . note : 9 is lucky . how many does ann have ?"]


def chat_body(prompt: str = PROMPTS[0], **extra) -> dict:
    return {"model": MODEL_ID, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8,
            "temperature": 0, **extra}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app as a user starts it after `make cluster`: `leaf-ray serve` with RAY_ADDRESS set
    joins that cluster instead of starting its own (it once failed at start, passing num_cpus to
    ray.init of a running cluster). The tests that look inside the cluster do so from drivers of
    their own (:func:`on_the_cluster`). Own ports, so that it never meets a cluster `make demo`
    left running."""
    import subprocess
    import sys
    import time

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           KEY_ENV: KEY}  # in the cluster's environment: the replicas read the key from it
    env.pop("RAY_ADDRESS", None)
    # More logical CPUs than this 2-core box has: engine, ingress and focus each reserve some.
    args = f"--port {GCS_PORT} --dashboard-port {DASHBOARD_PORT} --num-cpus 8 --disable-usage-stats"
    started = subprocess.run(["make", "--no-print-directory", "cluster", f"RAY_HEAD_ARGS={args}"], cwd=REPO, env=env,
                             capture_output=True, text=True)
    assert started.returncode == 0, started.stdout + started.stderr
    config = tmp_path_factory.mktemp("serve") / "serve.yaml"
    config.write_text(yaml.safe_dump({"applications": [{"name": APP, "args": {
        "model_id": MODEL_ID, "dtype": "float32", "max_model_len": MAX_MODEL_LEN, "api_key_env": KEY_ENV,
        "teacher": str(EMBEDDED / "teacher"), "focus_max_queued_requests": FOCUS_QUEUE,
        "kv_cache_memory_bytes": KV_CACHE_BYTES,
        "enforce_eager": True}}]}))  # no kernel compilation at start: answers are tested
    log = config.with_name("serve.log")
    attached = {**env, "RAY_ADDRESS": f"127.0.0.1:{GCS_PORT}"}
    with log.open("w") as out:
        process = subprocess.Popen([bin_dir / "leaf-ray", "serve", "--model", str(EMBEDDED / "student"),
                                    "--config", str(config), "--port", "8000"], cwd=REPO, stdout=out,
                                   stderr=subprocess.STDOUT, env=attached)
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if requests.get(f"{URL}/health", timeout=15).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or /health waiting on a starting engine
                pass
            time.sleep(3)
        assert process.poll() is None, log.read_text()[-3000:]
        yield {"url": URL, "log": log, "env": attached}
    finally:
        # No graceful Serve shutdown (20-30 s here): the cluster goes as a whole. `make stop` also
        # ends the engine process that an engine replica restarted after the last test killed one
        # leaves behind.
        process.kill()
        process.wait(timeout=60)
        subprocess.run(["make", "--no-print-directory", "stop"], cwd=REPO, env=env, capture_output=True)


@pytest.fixture(scope="module")
def url(server) -> str:
    return server["url"]


def on_the_cluster(server: dict, code: str) -> str:
    """The last line ``code`` prints, run in a driver of the app's cluster: a process of its own,
    so that this one never joins a cluster that its teardown stops."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import ray\nray.init()\n" + code], env=server["env"],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def assert_still_serving() -> None:
    reply = requests.post(f"{URL}/v1/chat/completions", json=chat_body(), headers=AUTH, timeout=60)
    assert reply.status_code == 200, reply.text


def assert_openai_error(reply: requests.Response, status: int, message: str) -> None:
    """OpenAI's error shape (what the openai client parses), the message, and no internal text."""
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert message in error["message"], error
    assert "Traceback" not in reply.text and "ray::" not in reply.text and "pid=" not in reply.text


def test_leaf_ray_serve_attached_to_the_running_cluster(server):
    """The application runs on the cluster `make cluster` started: the cluster's own Serve reports
    it, and `leaf-ray serve` did not start a Ray of its own."""
    import subprocess
    import sys

    status = subprocess.run([Path(sys.executable).with_name("serve"), "status", "--address", f"http://127.0.0.1:{DASHBOARD_PORT}"],
                            env=server["env"], capture_output=True, text=True, timeout=60)
    assert APP in status.stdout and "RUNNING" in status.stdout, status.stdout + status.stderr
    assert "Started a local Ray instance" not in server["log"].read_text()


def test_health_answers_without_a_key(url):
    reply = requests.get(f"{url}/health", timeout=30)
    assert reply.status_code == 200
    assert reply.json() == {"status": "ok", "models": [MODEL_ID]}


@pytest.mark.parametrize("method, path", [("get", "/v1/models"), ("post", "/v1/chat/completions"),
                                          ("post", "/v1/completions"), ("post", "/v1/focus")])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}],
                         ids=["no-key", "wrong-key", "no-bearer"])
def test_requests_without_the_key_get_401(url, method, path, headers):
    # A malformed body still gets 401, not 400: the check runs before anything parses the request.
    reply = requests.request(method, url + path, headers={**headers, "Content-Type": "application/json"},
                             data="{not json", timeout=30)
    assert_openai_error(reply, 401, "API key")
    assert reply.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("header", [f"bearer {KEY}", f"BEARER {KEY}", f"Bearer  {KEY}"],
                         ids=["lower", "upper", "two-spaces"])
def test_the_bearer_scheme_is_case_insensitive(url, header):
    # RFC 7235: the auth-scheme is a case-insensitive token, followed by one or more spaces.
    reply = requests.get(f"{url}/v1/models", headers={"Authorization": header}, timeout=30)
    assert reply.status_code == 200, reply.text
    wrong = requests.get(f"{url}/v1/models", headers={"Authorization": "basic " + KEY}, timeout=30)
    assert_openai_error(wrong, 401, "API key")


@pytest.mark.parametrize("keys", [[f"Bearer {KEY}", f"Bearer {KEY}"], ["Bearer wrong", f"Bearer {KEY}"],
                                  [f"Bearer {KEY}", "Bearer wrong"]], ids=["same-twice", "wrong-first", "wrong-last"])
def test_two_authorization_headers_are_refused(url, keys):
    # requests merges headers in a dict; http.client sends each one as given.
    connection = http.client.HTTPConnection("127.0.0.1", 8000, timeout=30)
    connection.putrequest("GET", "/v1/models")
    for key in keys:
        connection.putheader("Authorization", key)
    connection.endheaders()
    reply = connection.getresponse()
    body = json.loads(reply.read())
    assert reply.status == 401 and body["error"]["message"] == "send exactly one Authorization header"


def test_models_lists_the_configured_model(url):
    reply = requests.get(f"{url}/v1/models", headers=AUTH, timeout=30)
    assert reply.status_code == 200
    (card,) = reply.json()["data"]
    assert card["id"] == MODEL_ID and card["metadata"]["max_request_context_length"] == MAX_MODEL_LEN


def test_chat_and_completions_over_http_give_the_greedy_answer(url):
    model, tokenizer = load_model(EMBEDDED / "student")
    expected = greedy_generate(model, tokenizer, PROMPTS, max_new_tokens=8)
    for prompt, answer in zip(PROMPTS, expected):
        reply = requests.post(f"{url}/v1/chat/completions", json=chat_body(prompt), headers=AUTH, timeout=60)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["model"] == MODEL_ID
        assert body["choices"][0]["message"]["content"] == answer  # vLLM and transformers agree
        assert 0 < body["usage"]["completion_tokens"] <= 8

    reply = requests.post(f"{url}/v1/completions", headers=AUTH, timeout=60,
                          json={"model": MODEL_ID, "prompt": "sue has 1 .", "max_tokens": 5, "temperature": 0})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert isinstance(body["choices"][0]["text"], str) and 0 < body["usage"]["completion_tokens"] <= 5


def test_openai_client_chat_streaming_completions_and_models(url):
    from openai import AuthenticationError, OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=KEY, timeout=60, max_retries=0)
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
        OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()


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
    "malformed JSON": ("/v1/chat/completions", "{\"model\": ", 400, "not valid JSON"),
    "invalid UTF-8": ("/v1/chat/completions", b'{"model": "\xff"}', 400, "not valid UTF-8"),
    "body not an object": ("/v1/chat/completions", [chat_body()], 400, "must be a JSON object"),
    "max_tokens NaN": ("/v1/chat/completions", json.dumps(chat_body()).replace('"max_tokens": 8', '"max_tokens": NaN'),
                       400, "NaN is not a JSON number"),
    "temperature Infinity": ("/v1/chat/completions", json.dumps(chat_body()).replace('"temperature": 0',
                                                                                     '"temperature": -Infinity'),
                             400, "-Infinity is not a JSON number"),
    "top_p overflowing to infinity": ("/v1/chat/completions", json.dumps(chat_body()) [:-1] + ', "top_p": 1e999}',
                                      400, "top_p: not a finite number"),
    "lone surrogate in a message": ("/v1/chat/completions", json.dumps(chat_body("ann \ud800 has 3")), 400,
                                    "messages[0].content: invalid Unicode"),
    "unknown role": ("/v1/chat/completions", {**chat_body(), "messages": [{"role": "wizard", "content": "hi"}]},
                     400, "messages[0].role: 'wizard' is not one of"),
    "n far too large": ("/v1/chat/completions", chat_body(n=16384), 400, "n must be between 1 and 8"),
    "too many stop strings": ("/v1/chat/completions", chat_body(stop=["a", "b", "c", "d", "e"]), 400,
                              "at most 4 stop strings"),
    "LoRA-style model id": ("/v1/chat/completions", {**chat_body(), "model": f"{MODEL_ID}:x"}, 404,
                            "does not exist"),
    "body over max_body_bytes": ("/v1/chat/completions", chat_body("ann " * 300_000), 413, "larger than 1048576"),
    "unmounted: embeddings": ("/v1/embeddings", {"model": MODEL_ID, "input": "a"}, 404, "Not Found"),
    "unmounted: score": ("/v1/score", {"model": MODEL_ID, "text_1": "a", "text_2": "b"}, 404, "Not Found"),
    "unmounted: tokenize": ("/tokenize", {"model": MODEL_ID, "prompt": "a"}, 404, "Not Found"),
    "messages not a list": ("/v1/chat/completions", {**chat_body(), "messages": "hi"}, 400, "valid list"),
    "max_tokens not an integer": ("/v1/chat/completions", chat_body(max_tokens="lots"), 400, "valid integer"),
    "temperature not a number": ("/v1/chat/completions", chat_body(temperature="hot"), 400, "valid number"),
    "unknown model": ("/v1/chat/completions", {**chat_body(), "model": "gpt-9"}, 404, "gpt-9"),
    "focus: unknown model": ("/v1/focus", {"model": "gpt-9", "prompt": "a"}, 404, "gpt-9"),
    "focus: empty prompt": ("/v1/focus", {"prompt": ""}, 400, "at least 1 character"),
    "focus: prompt not a string": ("/v1/focus", {"prompt": 7}, 400, "valid string"),
    "focus: unknown field": ("/v1/focus", {"prompt": "a", "temperature": 1}, 400, "Extra inputs"),
    # Under the character bound (256 tokens x the longest token's 9 characters), over 256 tokens.
    "focus: too long": ("/v1/focus", {"prompt": "7 " * 300, "response": "3"}, 400, "more than the 256 allowed"),
    # Far past what 256 tokens can hold: refused by its length in characters, before tokenizing.
    "focus: cannot fit": ("/v1/focus", {"prompt": "ann has 3 . " * 40_000}, 400, "480000 characters"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_answering(url, name):
    path, body, status, message = BAD_REQUESTS[name]
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    reply = requests.post(url + path, data=data, headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
    assert_openai_error(reply, status, message)
    assert_still_serving()


def test_load_with_a_third_malformed_gives_no_5xx(url):
    """200 requests at concurrency 16, every third one malformed: each bad one a 4xx, each good
    one answered, none a 5xx."""
    bad = [name for name in BAD_REQUESTS if not name.startswith(("focus", "body over"))]

    def send(i: int) -> tuple[bool, int]:
        if i % 3:
            reply = requests.post(f"{url}/v1/chat/completions", json=chat_body(PROMPTS[i % 2], max_tokens=4),
                                  headers=AUTH, timeout=120)
            return True, reply.status_code
        path, body, _, _ = BAD_REQUESTS[bad[i // 3 % len(bad)]]
        data = body if isinstance(body, (str, bytes)) else json.dumps(body)
        reply = requests.post(url + path, data=data, timeout=120,
                              headers={**AUTH, "Content-Type": "application/json"})
        return False, reply.status_code

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, range(200)))
    good = [code for ok, code in results if ok]
    malformed = [code for ok, code in results if not ok]
    assert len(malformed) == 67 and good.count(200) == len(good) == 133
    assert all(400 <= code < 500 for code in malformed), sorted(set(malformed))


def test_focus_past_its_queue_answers_503_with_retry_after(url):
    body = {"prompt": PROMPTS[1]}  # no response: each request also generates an answer, so they overlap
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda _: requests.post(f"{url}/v1/focus", json=body, headers=AUTH, timeout=120),
                                range(16)))
    codes = [r.status_code for r in replies]
    assert set(codes) == {200, 503}, codes  # some served, the rest refused at once, nothing else
    busy = next(r for r in replies if r.status_code == 503)
    assert_openai_error(busy, 503, "busy")
    assert busy.headers["retry-after"] == "5"
    assert requests.post(f"{url}/v1/focus", json=body, headers=AUTH, timeout=60).status_code == 200


def test_focus_over_http_equals_the_in_process_scorer(url):
    scorer = FocusScorer.from_paths(str(EMBEDDED / "student"), str(EMBEDDED / "teacher"), max_length=MAX_MODEL_LEN)
    for prompt in PROMPTS:
        reply = requests.post(f"{url}/v1/focus", json={"prompt": prompt, "response": "8"}, headers=AUTH, timeout=60)
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
    reply = requests.post(f"{url}/v1/focus", json={"prompt": PROMPTS[0]}, headers=AUTH, timeout=60)
    chat = requests.post(f"{url}/v1/chat/completions", json=chat_body(max_tokens=16), headers=AUTH, timeout=60)
    assert reply.json()["response_source"] == "student"
    assert reply.json()["response"] == chat.json()["choices"][0]["message"]["content"]


def test_the_engine_started_without_a_model_download_task(server):
    """Ray Serve LLM's per-node download task does nothing for a local model but costs a worker
    process; our callback skips it. None ran on this cluster, and a cloud-storage model keeps it."""
    import asyncio

    from leaf_ray.serving.app import llm_config_for

    assert on_the_cluster(server, "from ray.util.state import list_tasks\n"
                                  "print(len(list_tasks(filters=[('func_or_class_name', '=', "
                                  "'initialize_remote_node')])))") == "0"
    for model, runs in (("assets/embedded/student", False), ("s3://bucket/student", True)):
        llm_config = llm_config_for(ServingConfig(model=model))
        callback = llm_config.callback_config.callback_class(llm_config=llm_config)
        asyncio.run(callback.on_before_node_init())
        assert callback.ctx.run_init_node is runs, model


def test_health_is_503_with_a_fixed_message_while_the_engine_is_down(server, url):
    """Kills the engine replica (a real fault, last of the server tests): /health answers 503 with
    a fixed message, not the engine's exception text. (Serve restarts the replica; waiting for
    that would test Ray, and cost a minute.)"""
    killed = on_the_cluster(server, """from ray.util.state import list_actors
(engine,) = [a for a in list_actors(filters=[("state", "=", "ALIVE")])
             if a.class_name.startswith("ServeReplica:") and "LLM" in a.class_name]
ray.kill(ray.get_actor(engine.name, namespace=engine.ray_namespace), no_restart=True)
print(engine.class_name)""")
    assert killed.startswith("ServeReplica:")
    reply = requests.get(f"{url}/health", timeout=60)
    assert_openai_error(reply, 503, "the engine is not ready")
    assert reply.json()["error"]["message"] == "the engine is not ready"


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
