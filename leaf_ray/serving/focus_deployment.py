"""The Serve deployment behind ``POST /v1/focus``: a thin adapter over
:class:`leaf_ray.serving.focus.FocusScorer`.

A module of its own because a replica imports the module its deployment class lives in:
here that is torch, transformers and Ray Serve, not vLLM and Ray Serve LLM (which
:mod:`leaf_ray.serving.app` needs for the engine and the ingress). The focus replica so starts
on a node without vLLM, and each app start imports about 6 s less on one core here.
"""

from __future__ import annotations

from ray import serve

from leaf_ray.config import ServingConfig
from leaf_ray.serving.focus import FocusScorer


@serve.deployment(max_ongoing_requests=4)
class FocusDeployment:
    """Holds a transformers copy of the student (and the teacher, if any) for /v1/focus.

    Its queue is bounded per caller (``max_queued_requests``, set in
    :func:`leaf_ray.serving.app.build_app`): past the bound, /v1/focus answers 503 with
    Retry-After instead of queueing without end."""

    def __init__(self, config: ServingConfig):
        dtype = "float32" if config.dtype == "auto" else config.dtype
        self.scorer = FocusScorer.from_paths(config.model, config.teacher, dtype=dtype, method=config.method,
                                             pruning=config.pruning, max_length=config.max_model_len)

    def explain(self, prompt: str, response: str | None) -> dict:
        return self.scorer.explain(prompt, response)
