"""The four names the Serve app needs from Ray's private ``ray.llm._internal``.

Ray 2.60 has no public API for them: ``ray.serve.llm.ingress.OpenAiIngress``'s own
documented example imports ``to_model_metadata`` from here too, ``make_fastapi_ingress``
(public) is meant to be given Ray's ``init()`` app and ``DEFAULT_ENDPOINTS``, and
``LLMConfig.callback_config`` (public) takes a subclass of ``CallbackBase``. Kept in one
module, pinned by ``ray==2.60.0``, so that an upgrade that moves them breaks one import line.
"""

from ray.llm._internal.common.callbacks.base import CallbackBase
from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS, init

__all__ = ["DEFAULT_ENDPOINTS", "CallbackBase", "init", "to_model_metadata"]
