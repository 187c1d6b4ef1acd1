"""vLLM plugin: the ``vllm.general_plugins`` entry point ``vora`` calls :func:`register` in every vLLM process
(``vllm/plugins/__init__.py::load_general_plugins``, vLLM 0.33), before the model's config is read.

Importing this module needs neither vLLM nor a GPU; :func:`register` imports vLLM.
"""

from __future__ import annotations

from .serving import VLLM_ARCHITECTURE

MODEL_CLASS = "vora.integrations.vllm_model:VoRAForCausalLM"


def register() -> None:
    """Teach vLLM (and transformers, in this process) about merged VoRA checkpoints.

    - ``import vora`` registers model_type ``vora`` with transformers' Auto classes, so vLLM reads config.json and
      the processor without ``--trust-remote-code``.
    - ``ModelRegistry.register_model`` with a ``module:class`` string imports the model class lazily, so CUDA is
      not initialised in the engine's front-end process (``vllm/model_executor/models/registry.py``).
    """
    from vllm import ModelRegistry

    import vora  # noqa: F401  (Auto-class registration)

    ModelRegistry.register_model(VLLM_ARCHITECTURE, MODEL_CLASS)
