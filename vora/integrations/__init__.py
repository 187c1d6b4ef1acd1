"""Integrations with serving and evaluation engines. Each engine is an optional extra: nothing here is imported
by ``import vora``, and only the modules named after an engine import it.

- :mod:`vora.integrations.serving` — what vLLM needs from a merged checkpoint (config fields, token counts, weight
  names, the image-mask safety check), importable and tested without vLLM.
- :mod:`vora.integrations.vllm_plugin` — the ``vllm.general_plugins`` entry point (``pip install "vora[serve]"``).
- :mod:`vora.integrations.vllm_model` — the vLLM model class and multimodal processor (imports vLLM).
- :mod:`vora.integrations.lmms_eval_model` — the ``vora`` model for lmms-eval (``pip install "vora[eval]"``).
"""
