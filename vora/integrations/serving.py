"""What an inference engine needs from a merged VoRA checkpoint, without importing the engine.

vLLM (the optional ``serve`` extra) imports this module from :mod:`vora.integrations.vllm_model`; everything here is
plain Python so it is tested on machines without vLLM or a GPU. Facts about vLLM used below were read in the
vLLM 0.33.0 wheel (file paths relative to its ``vllm/`` package):

- ``transformers_utils/model_arch_config_convertor.py::ModelArchConfigConvertorBase.is_mm_prefix_lm``: an HF config
  attribute ``is_mm_prefix_lm`` switches on the image-bidirectional mask ("mm prefix"); without it only a fixed list
  of model types (gemma3, paligemma, ...) get it. ``ModelConfig.is_mm_prefix_lm`` (``config/model.py``) exposes it.
- ``config/vllm.py::VllmConfig.with_hf_config`` rebuilds that decision from the *text* config when a wrapper builds
  its LLM with ``init_vllm_registered_model``, so the wrapper must copy the flag onto ``text_config`` first
  (``model_executor/models/gemma3_mm.py`` does the same); the LLM's ``Attention`` layers read it at construction
  (``model_executor/layers/attention/attention.py``: ``self.use_mm_prefix``).
- ``v1/attention/backends/utils.py::compute_mm_prefix_ranges`` turns each image's placeholder range into one
  bidirectional span; ``platforms/cuda.py::check_and_update_config`` then forces ``disable_chunked_mm_input``.
- ``v1/attention/backend.py::AttentionBackend.supports_mm_prefix``: backends without it would attend causally; the
  selector skips them when the flag is on (``validate_configuration``), Triton and FlashAttention 4 support it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

VLLM_ARCHITECTURE = "VoRAForCausalLM"
MM_PREFIX_FLAG = "is_mm_prefix_lm"
PREFIXES = ("language_model.", "vision_embed.")


# ------------------------------------------------------------------------------------------------
# config.json
# ------------------------------------------------------------------------------------------------
def wants_image_mask(config) -> bool:
    """Whether the model was trained with bidirectional attention inside each image."""
    return getattr(config, "attention_mode", "bidirectional") == "bidirectional"


def vllm_config_fields(config) -> dict:
    """The config.json fields vLLM reads: the architecture it looks up in its registry (the plugin registers
    ``VoRAForCausalLM``) and ``is_mm_prefix_lm``, true exactly when the model was trained with the image mask."""
    return {"architectures": [VLLM_ARCHITECTURE], MM_PREFIX_FLAG: wants_image_mask(config)}


def add_vllm_config_fields(config):
    """Set :func:`vllm_config_fields` on a VoRAConfig in place (transformers keeps unknown attributes, so the
    transformers load is unchanged) and return it."""
    for key, value in vllm_config_fields(config).items():
        setattr(config, key, value)
    return config


def text_architectures(text_config) -> list[str]:
    """The LLM class name vLLM's registry builds for ``text_config`` (e.g. ``["Qwen2ForCausalLM"]``)."""
    archs = getattr(text_config, "architectures", None)
    if archs:
        return list(archs)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(text_config, "model_type", None))
    if name is None:
        raise ValueError(
            f"config.json: text_config has no 'architectures' and model_type "
            f"{getattr(text_config, 'model_type', None)!r} has no causal-LM class: add text_config.architectures"
        )
    return [name]


# ------------------------------------------------------------------------------------------------
# images → tokens (the same code path as VoRAImageProcessor)
# ------------------------------------------------------------------------------------------------
def image_processor_for(config, preprocessor_config: dict | None = None):
    """The checkpoint's image processor: ``preprocessor_config.json`` as vora-merge writes it, else the sizes in
    config.json. The engine's token counts and pixels come from this object, so they are VoRAImageProcessor's."""
    from ..model.image_processing_vora import VoRAImageProcessor

    if preprocessor_config:
        drop = ("auto_map", "image_processor_type", "processor_class")
        kwargs = {k: v for k, v in preprocessor_config.items() if k not in drop}
        ip = VoRAImageProcessor(**kwargs)
    else:
        ip = VoRAImageProcessor(
            patch_size=config.patch_size, min_pixels=config.min_pixels, max_pixels=config.max_pixels
        )
    if ip.patch_size != config.patch_size:
        raise ValueError(
            f"preprocessor_config.json has patch_size={ip.patch_size} but config.json has "
            f"patch_size={config.patch_size}"
        )
    return ip


def num_image_tokens(image_processor, width: int, height: int) -> int:
    """Placeholder tokens for one image of ``width`` x ``height`` pixels (gh·gw patches after the resize)."""
    gh, gw = image_processor.get_grid_hw(height, width)
    return gh * gw


def largest_grid(image_processor) -> tuple[int, int]:
    """(gh, gw) of the largest image the processor can produce: at most ``max_pixels / p²`` patches, as square as
    possible (an image of ``gh·p`` x ``gw·p`` pixels is kept as is). vLLM sizes its profiling run and
    ``max_num_batched_tokens`` with it, so it must bound every real image."""
    p = image_processor.patch_size
    n = image_processor.max_pixels // (p * p)
    best = (1, 1)
    for gh in range(math.isqrt(n), 0, -1):
        gw = n // gh
        if gw / gh > image_processor.max_aspect_ratio:
            break
        if gh * gw > best[0] * best[1]:
            best = (gh, gw)
        if gh * gw == n:
            break
    return best


# ------------------------------------------------------------------------------------------------
# weights
# ------------------------------------------------------------------------------------------------
def split_checkpoint_key(name: str) -> tuple[str, str]:
    """A merged checkpoint's tensor name → (component, name inside it): ``language_model.model.x`` →
    (``"language_model"``, ``"model.x"``) for vLLM's LLM class; ``vision_embed.conv.weight`` → (``"vision_embed"``,
    ``"conv.weight"``) for the patch embedding. Anything else is refused: a training checkpoint (LoRA, heads) must
    be merged first."""
    for prefix in PREFIXES:
        if name.startswith(prefix):
            return prefix[:-1], name[len(prefix):]
    if name.startswith("distill_heads.") or "lora_" in name:
        raise ValueError(
            f"checkpoint tensor {name!r} belongs to a training checkpoint: run vora-merge on it and serve the output"
        )
    raise ValueError(
        f"checkpoint tensor {name!r} is neither language_model.* nor vision_embed.*: not a merged VoRA checkpoint"
    )


def check_vision_keys(loaded: set[str], expected: set[str]) -> None:
    """Every patch-embedding tensor must come from the checkpoint (never a random init)."""
    missing, unexpected = sorted(expected - loaded), sorted(loaded - expected)
    if missing or unexpected:
        raise ValueError(
            f"patch embedding tensors in the checkpoint do not match the model: missing {missing}, "
            f"unexpected {unexpected} (config.json patch_size / vision_embed_dim / position_grid disagree?)"
        )


# ------------------------------------------------------------------------------------------------
# refuse to serve without the image mask
# ------------------------------------------------------------------------------------------------
class ImageMaskError(RuntimeError):
    """The engine would run a bidirectionally trained VoRA model with causal attention over its images."""


@dataclass(frozen=True)
class AttentionLayerInfo:
    name: str
    backend: str
    uses_mm_prefix: bool  # the layer was built with the image mask on
    backend_supports_mm_prefix: bool


def check_image_mask(
    *,
    attention_mode: str,
    engine_mm_prefix: bool,
    images_enabled: bool,
    chunked_mm_input: bool,
    layers: list[AttentionLayerInfo],
    device_type: str = "cuda",
) -> None:
    """Raise :class:`ImageMaskError` unless the engine keeps the model's image mask exactly.

    ``engine_mm_prefix``: vLLM's ``model_config.is_mm_prefix_lm``; ``images_enabled``: the deployment accepts images
    (``--limit-mm-per-prompt`` not 0); ``chunked_mm_input``: an image may be split across prefill chunks;
    ``layers``: the LLM's attention layers as built; ``device_type``: vLLM's device ("cuda", "cpu", ...), for the
    advice.
    """
    if attention_mode == "causal":
        if engine_mm_prefix:
            raise ImageMaskError(
                "this VoRA model was trained with causal attention over images (attention_mode: causal) but the "
                "engine has is_mm_prefix_lm on: set is_mm_prefix_lm to false in config.json (or re-run vora-merge)"
            )
        return
    if not images_enabled:
        return  # text-only deployment: no image ever reaches the model, no image mask is needed
    if not engine_mm_prefix:
        raise ImageMaskError(
            "this VoRA model needs bidirectional attention inside each image but vLLM would attend causally: "
            "config.json lacks 'is_mm_prefix_lm: true' (re-run vora-merge, or add it) or it was overridden "
            "(--hf-overrides)"
        )
    if not layers:
        raise ImageMaskError("found no attention layers in the language model to check the image mask on")
    bad = [layer for layer in layers if not (layer.uses_mm_prefix and layer.backend_supports_mm_prefix)]
    if bad:
        first = bad[0]
        why = "was built without the image mask" if not first.uses_mm_prefix else "ignores the image mask"
        if device_type == "cpu":
            # vLLM's CPU platform picks CPU_ATTN without asking whether it can keep the mask (it cannot).
            fix = ("vLLM has no CPU attention backend with it: serve this model on a GPU, or text only with "
                   "--limit-mm-per-prompt '{\"image\": 0}'")
        else:
            fix = ("use a backend with mm-prefix support (--attention-backend TRITON_ATTN, or FLASH_ATTN with "
                   "FlashAttention 4)")
        raise ImageMaskError(
            f"{len(bad)} of {len(layers)} attention layers would attend causally over images: {first.name} runs on "
            f"backend {first.backend}, which {why}; {fix}"
        )
    # after the backend: no point asking for a flag on an engine that cannot keep the mask anyway
    if chunked_mm_input:
        raise ImageMaskError(
            "chunked prefill may split an image across chunks, which breaks its bidirectional block: "
            "pass --disable-chunked-mm-input (vLLM forces it on CUDA and ROCm)"
        )


def safe_input_ids(input_ids, image_token_id: int, fill_id: int = 0):
    """Token ids safe for the LLM's embedding lookup: the image token (which may lie beyond the LLM's vocabulary,
    added to the tokenizer without resizing the embeddings) becomes ``fill_id``; the image features overwrite those
    rows afterwards, as in ``VoRAForCausalLM.embed_inputs``."""
    return input_ids.masked_fill(input_ids == image_token_id, fill_id)
