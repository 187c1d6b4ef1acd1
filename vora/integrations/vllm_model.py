"""VoRA for vLLM (0.33): vLLM's own LLM (Qwen2, Llama, ... from its registry) + VoRA's patch embedding, with each
image's tokens attending to each other bidirectionally during prefill (vLLM's "mm prefix" mask).

Imported by vLLM through the plugin (:mod:`vora.integrations.vllm_plugin`), never by ``import vora``. The APIs used
here were read in the vLLM 0.33.0 wheel: ``multimodal/processing/processor.py`` (``BaseMultiModalProcessor``:
vLLM tokenizes the prompt itself and calls ``_call_hf_processor`` with the images only, then applies
``PromptReplacement``), ``multimodal/processing/context.py`` (``BaseProcessingInfo``, ``call_hf_processor``),
``multimodal/processing/dummy_inputs.py``, ``model_executor/models/interfaces.py`` (``SupportsMultiModal``,
``configure_mm_token_handling``, ``_mark_language_model``), ``model_executor/models/paligemma.py`` and
``gemma3_mm.py`` (wrapper around ``init_vllm_registered_model``), ``model_executor/models/qwen2_vl.py`` (flat
patches + per-image grid as ``MultiModalFieldConfig.flat_from_sizes`` / ``batched``).

Everything that does not need vLLM (config fields, token counts, weight names, the image-mask check) is in
:mod:`vora.integrations.serving` and tested on CPU; this class runs in vLLM's CPU build (0.32) in
tests/test_vllm_engine_cpu.py and on CUDA in tests/test_vllm_cuda.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property

import torch
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.inputs import MultiModalDataDict
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)
from vllm.sequence import IntermediateTensors

from ..model.modeling_vora import VoRAPatchEmbed
from ..model.processing_vora import IMAGE_TOKEN
from . import serving


class VoRAProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self):
        # No isinstance check against vora's VoRAConfig: with --trust-remote-code the class comes from the
        # checkpoint's copy of configuration_vora.py, a different class object with the same fields.
        config = self.ctx.get_hf_config()
        if getattr(config, "model_type", None) != "vora":
            raise TypeError(f"expected a VoRA config (model_type 'vora'), got {getattr(config, 'model_type', None)!r}")
        return config

    @cached_property
    def image_processor(self):
        """VoRAImageProcessor with the checkpoint's preprocessor_config.json: same resize and patches as
        transformers' path (``ctx.get_hf_image_processor_config`` reads that file)."""
        return serving.image_processor_for(self.get_hf_config(), self.ctx.get_hf_image_processor_config())

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        return serving.num_image_tokens(self.image_processor, image_width, image_height)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        gh, gw = serving.largest_grid(self.image_processor)
        return {"image": gh * gw}


class VoRADummyInputsBuilder(BaseDummyInputsBuilder[VoRAProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.info.get_hf_config().image_token * mm_counts.get("image", 0)

    def get_dummy_mm_data(
        self, seq_len: int, mm_counts: Mapping[str, int], mm_options: MultiModalDummyOptions
    ) -> MultiModalDataDict:
        # The largest image the processor keeps as is: profiling then sees the most image tokens possible.
        ip = self.info.image_processor
        gh, gw = serving.largest_grid(ip)
        images = self._get_dummy_images(
            width=gw * ip.patch_size, height=gh * ip.patch_size, num_images=mm_counts.get("image", 0),
            overrides=(mm_options or {}).get("image"),
        )
        return {"image": images}


class VoRAMultiModalProcessor(BaseMultiModalProcessor[VoRAProcessingInfo]):
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        # vLLM has already tokenized the prompt; only the images ({"images": [...]}) come here. They go through
        # VoRAImageProcessor itself (per-request mm_processor_kwargs such as max_pixels are its own arguments).
        return self.info.ctx.call_hf_processor(self.info.image_processor, hf_data, hf_kwargs)

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        grid = hf_inputs.get("image_grid_hw", torch.empty((0, 2), dtype=torch.long))
        return dict(
            pixel_values=MultiModalFieldConfig.flat_from_sizes("image", grid.prod(-1)),
            image_grid_hw=MultiModalFieldConfig.batched("image", keep_on_cpu=True),
        )

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        image_token_id = self.info.get_hf_config().image_token_id

        def replacement(item_idx: int) -> list[int]:
            # The count comes from the processed grid (also for cached items), as VoRAProcessor expands it.
            gh, gw = out_mm_kwargs["image"][item_idx]["image_grid_hw"].data.tolist()
            return [image_token_id] * (gh * gw)

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)]


@MULTIMODAL_REGISTRY.register_processor(
    VoRAMultiModalProcessor, info=VoRAProcessingInfo, dummy_inputs=VoRADummyInputsBuilder
)
class VoRAForCausalLM(nn.Module, SupportsMultiModal):
    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_TOKEN
        raise ValueError(f"VoRA reads images only, not {modality}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        text_config = config.text_config
        self.image_token_id = config.image_token_id
        # The LLM is built from text_config and vLLM re-derives its mask flag from that config
        # (VllmConfig.with_hf_config): copy the engine's decision there, as gemma3_mm.py does.
        text_config.is_mm_prefix_lm = bool(vllm_config.model_config.is_mm_prefix_lm)
        # The image token may lie beyond the LLM's vocabulary (interfaces.py: masked to 0 before the lookup).
        self.configure_mm_token_handling(vocab_size=text_config.vocab_size, mm_token_ids=[config.image_token_id])

        self.vision_embed = VoRAPatchEmbed(config)
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=text_config,
                prefix=maybe_prefix(prefix, "language_model"),
                architectures=serving.text_architectures(text_config),
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors
        self._refuse_serving_without_image_mask(vllm_config)

    def _refuse_serving_without_image_mask(self, vllm_config: VllmConfig) -> None:
        model_config, scheduler = vllm_config.model_config, vllm_config.scheduler_config
        mm_config = model_config.multimodal_config
        layers = [
            serving.AttentionLayerInfo(
                name=name,
                backend=module.attn_backend.get_name(),
                uses_mm_prefix=bool(module.use_mm_prefix),
                backend_supports_mm_prefix=bool(module.attn_backend.supports_mm_prefix()),
            )
            for name, module in self.language_model.named_modules()
            if isinstance(module, Attention)
        ]
        serving.check_image_mask(
            attention_mode=getattr(self.config, "attention_mode", "bidirectional"),
            engine_mm_prefix=bool(model_config.is_mm_prefix_lm),
            images_enabled=mm_config is None or mm_config.get_limit_per_prompt("image") > 0,
            chunked_mm_input=bool(scheduler.enable_chunked_prefill and not scheduler.disable_chunked_mm_input),
            layers=layers,
            device_type=str(vllm_config.device_config.device_type),
        )

    # --- images -------------------------------------------------------------------------------
    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        pixel_values = kwargs.get("pixel_values")
        grid = kwargs.get("image_grid_hw")
        if pixel_values is None:
            return []
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.cat(list(pixel_values))
        if isinstance(grid, (list, tuple)):
            grid = torch.stack([torch.as_tensor(g) for g in grid])
        grid = grid.reshape(-1, 2).cpu()
        embeds = self.vision_embed(pixel_values, grid)
        return embeds.split((grid[:, 0] * grid[:, 1]).tolist())

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: MultiModalEmbeddings | None = None,
        *,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # Never look up the image token itself (it may be out of the LLM's vocabulary), whatever vLLM passes.
        input_ids = serving.safe_input_ids(input_ids, self.image_token_id)
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)

    # --- LLM ----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    # --- weights ------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """A merged checkpoint as vora-merge writes it: ``language_model.*`` (the stock LLM's names) go to vLLM's LLM
        class, ``vision_embed.*`` to the patch embedding; anything else is refused (serving.split_checkpoint_key)."""
        vision_params = dict(self.vision_embed.named_parameters())
        vision_seen: set[str] = set()

        def llm_weights():
            for name, tensor in weights:
                component, inner = serving.split_checkpoint_key(name)
                if component == "vision_embed":
                    vision_seen.add(inner)
                    if inner in vision_params:
                        default_weight_loader(vision_params[inner], tensor)
                else:
                    yield inner, tensor

        llm_loaded = self.language_model.load_weights(llm_weights())
        serving.check_vision_keys(vision_seen, set(vision_params))
        return {f"vision_embed.{n}" for n in vision_seen} | {f"language_model.{n}" for n in llm_loaded}
