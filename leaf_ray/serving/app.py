"""The Serve application: the focused student over an OpenAI-compatible API.

Built on Ray's own LLM serving (``ray.serve.llm``): an ``LLMServer`` deployment runs the
vLLM engine (the CPU build here, CUDA vLLM on a GPU node), and the HTTP ingress is Ray's
``OpenAiIngress`` (``/v1/chat/completions`` with streaming, ``/v1/completions``,
``/v1/models``, ...), composed the way ``build_openai_app`` composes it, with three
additions:

- ``GET /health``: pings the engine (with a timeout); 503 with a fixed message when it is
  down. Needs no API key (probes).
- ``POST /v1/focus``: the student's gradient sensitivity over a prompt (and, with a
  teacher, the LeaF diff and the spans pruning would cut), from a separate small
  deployment with a bounded queue, so that it never competes with generation for the engine.
- an API-key check in front of everything else: with ``api_key_env`` or ``api_key_file``
  set, a request without exactly one ``Authorization: Bearer <key>`` gets 401 before its
  body is read.
- a request guard behind it (:mod:`leaf_ray.serving.guard`): a body-size limit, then the
  checks Ray's ingress and vLLM leave out (finite numbers, valid Unicode, known roles and
  model ids, ``n`` and ``stop`` caps).

Every error, Ray's and ours, is a 4xx or 503 in OpenAI's shape (``{"error": {...}}``), and
only the endpoints this model serves are mounted (chat, completions, models).

``serve run serve/config.yaml`` (import path ``leaf_ray.serving.app:build_app``) calls
:func:`build_app` with the config's ``args``: the fields of :class:`leaf_ray.config.ServingConfig`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, HTTPException, status
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from ray.serve.llm import LLMConfig, build_llm_deployment
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from leaf_ray.config import ServingConfig
from leaf_ray.serving.focus import FocusError
from leaf_ray.serving.focus_deployment import FocusDeployment
from leaf_ray.serving.guard import OpenAIError, RequestLimits, check_request, parse_body
from leaf_ray.serving.ray_private import DEFAULT_ENDPOINTS, CallbackBase, init, to_model_metadata

logger = logging.getLogger(__name__)

# Routes that answer without an API key: liveness / readiness probes.
OPEN_PATHS = frozenset({"/health"})
HEALTH_TIMEOUT_S = 10.0
FOCUS_RETRY_AFTER_S = 5


def error_response(error: OpenAIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


@dataclass(frozen=True)
class ApiKeySource:
    """Where the bearer token lives. Only the names travel with the app; each replica reads
    the secret itself, so it never enters the pickled application or Serve's checkpoints."""

    env: str | None = None
    file: str | None = None

    def read(self) -> str | None:
        """The key, or None when no auth is configured. A configured but missing key is an
        error: a server that silently runs open is worse than one that does not start."""
        if self.env:
            key = os.environ.get(self.env, "").strip()
            if not key:
                raise RuntimeError(f"api_key_env: environment variable {self.env} is unset or empty")
            return key
        if self.file:
            try:
                key = Path(self.file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise RuntimeError(f"api_key_file: cannot read {self.file}: {exc}") from None
            if not key:
                raise RuntimeError(f"api_key_file: {self.file} is empty")
            return key
        return None


class BearerTokenMiddleware:
    """ASGI middleware: 401 unless exactly one ``Authorization: Bearer <key>`` header. It runs
    before routing, so an unauthenticated request is never parsed and nothing reaches the engine.
    Two Authorization headers are ambiguous (proxies disagree on which one counts): refused."""

    def __init__(self, app, source: ApiKeySource):
        self.app = app
        key = source.read()
        self.expected = None if key is None else key.encode()

    def accepts(self, header: bytes) -> bool:
        """``<scheme> 1*SP <token>`` with the scheme ``Bearer`` in any case (RFC 7235)."""
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.lstrip(b" "), self.expected)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.expected is not None and scope["path"] not in OPEN_PATHS:
            given = [value for name, value in scope["headers"] if name == b"authorization"]
            if len(given) != 1 or not self.accepts(given[0]):
                message = ("send exactly one Authorization header" if len(given) > 1 else
                           "missing or invalid API key: send 'Authorization: Bearer <key>'")
                error = OpenAIError(401, message, type="authentication_error", code="invalid_api_key")
                await error_response(error, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RequestGuardMiddleware:
    """ASGI middleware: reads a POST body up to ``max_body_bytes`` (413 past it, without
    reading the rest), runs :func:`check_request` on it, and hands the checked body on."""

    def __init__(self, app, models: list[str], limits: RequestLimits):
        self.app, self.models, self.limits = app, models, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            body = await self.read_body(scope, receive)
            check_request(scope["path"], parse_body(body), self.models, self.limits)
        except OpenAIError as error:
            await error_response(error)(scope, receive, send)
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for the client's disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def read_body(self, scope, receive) -> bytes:
        limit = self.limits.max_body_bytes
        too_large = OpenAIError(413, f"the body is larger than {limit} bytes (max_body_bytes in the serving "
                                     "config)", code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise OpenAIError(400, "the client disconnected before sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


async def http_exception_as_openai_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own errors (404 for an unmounted path, 405, ours) in OpenAI's shape, not ``{"detail": ...}``."""
    return error_response(OpenAIError(exc.status_code, str(exc.detail)), getattr(exc, "headers", None))


class FocusRequest(BaseModel):
    """Body of ``POST /v1/focus``."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Served model id; the only model when omitted.")
    prompt: str = Field(..., min_length=1, description="The user message to explain.")
    response: str | None = Field(None, description="Answer whose loss is differentiated; the student's own "
                                                   "greedy answer when omitted.")


class LeafIngress(OpenAiIngress):
    """Ray's OpenAI ingress plus ``/health`` and ``/v1/focus``."""

    def __init__(self, llm_deployments: dict[str, DeploymentHandle], model_cards: dict, *,
                 focus: DeploymentHandle | None, api_key: ApiKeySource, **kwargs):
        api_key.read()  # fail the deployment now, not every request later, when the key is missing
        super().__init__(llm_deployments, model_cards, **kwargs)
        self._focus = focus

    async def health(self) -> JSONResponse:
        for model_id, handle in self._default_serve_handles.items():
            try:
                await asyncio.wait_for(self._ping(handle), HEALTH_TIMEOUT_S)
            except Exception:  # any failure or timeout of the engine's own check means "not ready"
                # The reason goes to the log only: engine errors can carry addresses and pids.
                logger.exception("health check of %r failed", model_id)
                return error_response(OpenAIError(503, "the engine is not ready", type="service_unavailable"))
        return JSONResponse({"status": "ok", "models": list(self._model_cards)})

    @staticmethod
    async def _ping(handle: DeploymentHandle) -> None:
        await handle.check_health.remote()

    async def focus(self, body: FocusRequest) -> JSONResponse:
        model_id = await self._get_model_id(body.model)  # 404 for an unknown model, as generation does
        if self._focus is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "/v1/focus is off (focus: false in the serving config)")
        try:
            result = await self._focus.explain.remote(body.prompt, body.response)
        except BackPressureError:
            return error_response(OpenAIError(503, "/v1/focus is busy: retry later", type="service_unavailable"),
                                  {"Retry-After": str(FOCUS_RETRY_AFTER_S)})
        except FocusError as exc:
            # The handle re-raises the replica's error inside a RayTaskError (which also subclasses
            # FocusError); its `cause` is the original, whose message is meant for the caller.
            raise HTTPException(status.HTTP_400_BAD_REQUEST, str(getattr(exc, "cause", exc))) from None
        return JSONResponse({"model": model_id, **result})


# Only what a chat model serves: Ray's defaults also mount embeddings, score, transcriptions
# and (de)tokenize, which would answer 500s for this model.
LEAF_ENDPOINTS = {
    **{name: DEFAULT_ENDPOINTS[name] for name in ("models", "model_data", "completions", "chat")},
    "health": lambda app: app.get("/health"),
    "focus": lambda app: app.post("/v1/focus"),
}


class NoNodeDownload(CallbackBase):
    """Skips the task Ray Serve LLM runs on each node before an engine starts. That task copies a
    model from cloud storage (an s3:// or gs:// model); for a local folder or a hub id (which vLLM
    fetches itself) it does nothing, yet it starts a fresh worker process: 16 s of each start here."""

    async def on_before_node_init(self) -> None:
        self.ctx.run_init_node = False


def llm_config_for(config: ServingConfig) -> LLMConfig:
    """The Ray Serve LLM config of the engine deployment."""
    on_gpu = config.resources.num_gpus > 0
    # vLLM's CPU build binds its threads to every core of the NUMA node: engine replicas on one node
    # then spin on the same cores, and a second replica started under load never finished starting
    # (measured here). On CPU each engine runs as many threads as the CPUs it reserves.
    threads = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(max(1, int(config.resources.num_cpus)))}
    return LLMConfig(
        runtime_env={} if on_gpu else {"env_vars": threads},
        model_loading_config={"model_id": config.model_id, "model_source": config.model},
        accelerator_config={"kind": "gpu" if on_gpu else "cpu"},
        placement_group_config={"bundle_per_worker": config.resources.bundle()},
        engine_kwargs=config.model_dump(include={"max_model_len", "dtype", "gpu_memory_utilization",
                                                 "kv_cache_memory_bytes", "enforce_eager"}, exclude_none=True),
        callback_config={"callback_class": CallbackBase if "://" in config.model else NoNodeDownload},
        deployment_config={"autoscaling_config": config.model_dump(include={
            "min_replicas", "max_replicas", "target_ongoing_requests", "upscale_delay_s", "downscale_delay_s",
            "look_back_period_s"})},
    )


def build_app(args: dict) -> Application:
    """The application for ``serve run`` / ``serve deploy``; ``args`` are ServingConfig fields
    (a pydantic ValidationError names each bad field)."""
    config = ServingConfig.model_validate(args)
    if config.model is None:
        raise ValueError("model: set the model directory to serve (e.g. runs/<name>/distill/leaf/model)")
    llm_config = llm_config_for(config)
    api_key = ApiKeySource(config.api_key_env, config.api_key_file)

    focus = None
    if config.focus:
        focus = FocusDeployment.options(max_queued_requests=config.focus_max_queued_requests, ray_actor_options={
            "num_cpus": config.focus_resources.num_cpus, "num_gpus": config.focus_resources.num_gpus,
        }).bind(config)

    app: FastAPI = init()  # Ray's FastAPI app with its OpenAI error handling
    app.add_exception_handler(StarletteHTTPException, http_exception_as_openai_error)
    # Middleware added last runs first: the key check, then the guard, then Ray's stack.
    app.add_middleware(RequestGuardMiddleware, models=[config.model_id], limits=RequestLimits(
        max_body_bytes=config.max_body_bytes, max_n=config.max_n, max_stop=config.max_stop))
    app.add_middleware(BearerTokenMiddleware, source=api_key)
    ingress_cls = make_fastapi_ingress(LeafIngress, endpoint_map=LEAF_ENDPOINTS, app=app)
    return serve.deployment(ingress_cls, **LeafIngress.get_deployment_options([llm_config])).bind(
        llm_deployments={config.model_id: build_llm_deployment(llm_config)},
        model_cards={config.model_id: to_model_metadata(config.model_id, llm_config)},
        focus=focus,
        api_key=api_key,
    )
