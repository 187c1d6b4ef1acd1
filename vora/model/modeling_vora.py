"""VoRA: a decoder-only LLM that reads images through a patch embedding, with no vision encoder.

    pixels ──patchify──> Linear(3·p·p → d) (= Conv p×p stride p) → RMSNorm → + 2-D position grid
            (interpolated to the image's h×w) → Linear(d → LLM width) ──> tokens at the <image> run

The LLM is any `AutoModelForCausalLM` with q/k/v/o/gate/up/down projections. Training adds LoRA
(`vora/lora.py`) and distillation (`vora/distill.py`); merging folds LoRA back, so this file is all a
merged checkpoint needs. It is copied into merged checkpoints for `trust_remote_code=True`: imports
only torch, transformers and its siblings, relatively.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_vora import VoRAConfig
from .mask import CACHE_KWARG, build_attention_masks, check_attn_implementation, image_block_ids


def check_attention_for(model_dir, attn_implementation, setting: str = "attn_implementation") -> None:
    """Refuse, before any weight is loaded, an attention implementation that would drop the image mask of the
    VoRA checkpoint in `model_dir` (only its `attention_mode: bidirectional` needs the mask)."""
    if attn_implementation is None:
        return
    if VoRAConfig.from_pretrained(model_dir).attention_mode == "bidirectional":
        check_attn_implementation(attn_implementation, setting)


class VoRAPatchEmbed(nn.Module):
    """One token per p×p patch. Input is already patchified ([P, 3·p·p], see DEVELOPERS.md), so the
    conv is a matmul with the conv's weight: same parameters as `Conv2d(3, d, p, stride=p)` (and so
    loadable from a ViT's patch embedding) but no padding of differently-sized images to a batch."""

    def __init__(self, config: VoRAConfig):
        super().__init__()
        p, d, g = config.patch_size, config.vision_embed_dim, config.position_grid
        self.patch_size = p
        self.conv = nn.Conv2d(3, d, kernel_size=p, stride=p)
        self.norm = nn.RMSNorm(d, eps=config.rms_norm_eps)
        self.position = nn.Parameter(torch.zeros(1, d, g, g))
        self.proj = nn.Linear(d, config.text_config.hidden_size)
        nn.init.trunc_normal_(self.position, std=0.02)

    def position_for(self, grid_hw: list[tuple[int, int]]) -> torch.Tensor:
        """Position embeddings for each image's grid, concatenated: [P, d]. The learned grid is
        interpolated (never sliced) to each size; each distinct size is interpolated once."""
        cache = {}
        parts = []
        for hw in grid_hw:
            if hw not in cache:
                pos = self.position.float()
                if tuple(pos.shape[-2:]) != hw:
                    pos = F.interpolate(pos, size=hw, mode="bicubic", align_corners=False)
                cache[hw] = pos[0].flatten(1).t()
            parts.append(cache[hw])
        return torch.cat(parts).to(self.position.dtype)

    def forward(self, pixel_values: torch.Tensor, image_grid_hw: torch.Tensor, image_grid_list=None) -> torch.Tensor:
        """`image_grid_list`: the same grid sizes as host ints (the training collator sends them); without it
        they are read back from `image_grid_hw` — one small host sync (N×2 ints), as every HF VLM does."""
        weight = self.conv.weight.flatten(1)
        x = F.linear(pixel_values.to(weight.dtype), weight, self.conv.bias)
        x = self.norm(x)
        grid = image_grid_list if image_grid_list is not None else image_grid_hw.tolist()
        x = x + self.position_for([tuple(hw) for hw in grid]).to(x.dtype)
        return self.proj(x)


class VoRAPreTrainedModel(PreTrainedModel):
    config_class = VoRAConfig
    base_model_prefix = "vora"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False
    _skip_keys_device_placement = ["cache"]

    def _init_weights(self, module):
        # The wrapped LLM initialises its own modules; ours are initialised in their constructors.
        if isinstance(module, VoRAPatchEmbed):
            return
        if hasattr(self, "language_model") and module is not self:
            init = getattr(self.language_model, "_init_weights", None)
            if init is not None:
                init(module)


class VoRAForCausalLM(VoRAPreTrainedModel, GenerationMixin):
    def __init__(self, config: VoRAConfig, language_model: PreTrainedModel | None = None):
        super().__init__(config)
        if config.image_token_id is None:
            raise ValueError("VoRAConfig.image_token_id is not set: give the tokenizer's id of '<image>'")
        self.vision_embed = VoRAPatchEmbed(config)
        if language_model is None:
            language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.language_model = language_model
        self._no_split_modules = getattr(language_model, "_no_split_modules", None)
        self._check_attention(language_model.config._attn_implementation)
        self.post_init()

    # --- attention kernels: only those that honour VoRA's mask (see vora/mask.py) ----------------------
    def _check_attention(self, impl):
        # Causal mode needs no mask beyond padding, which every kernel handles; packing is checked per batch.
        if self.config.attention_mode == "bidirectional":
            check_attn_implementation(impl)

    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        # Checked before transformers loads or dispatches the kernel, so the error is ours, not an import error.
        self._check_attention(attn_implementation)
        return super().set_attn_implementation(attn_implementation, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        config = kwargs.get("config")
        impl = kwargs.get("attn_implementation") or getattr(config, "_attn_implementation_internal", None)
        if isinstance(config, VoRAConfig):
            if config.attention_mode == "bidirectional":
                check_attn_implementation(impl)
        elif impl is not None:
            check_attention_for(pretrained_model_name_or_path, impl)  # reads config.json only
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_llm(cls, llm, *, image_token_id: int, dtype=None, attn_implementation: str | None = None, **vora_kwargs):
        """Wrap a pretrained LLM (path, hub id or loaded model) in a fresh VoRA model.

        The LLM is loaded once, with its own weights; only the patch embedding is new. An attention
        implementation that would drop VoRA's image mask is refused before anything is loaded.
        """
        if vora_kwargs.get("attention_mode", "bidirectional") == "bidirectional":
            check_attn_implementation(attn_implementation)
        if not isinstance(llm, PreTrainedModel):
            kwargs = {}
            if dtype is not None:
                kwargs["dtype"] = dtype
            if attn_implementation is not None:
                kwargs["attn_implementation"] = attn_implementation
            llm = AutoModelForCausalLM.from_pretrained(llm, **kwargs)
        impl = llm.config._attn_implementation  # read first: the nested configs' choice is reset below
        config = VoRAConfig(text_config=llm.config, image_token_id=image_token_id, **vora_kwargs)
        model = cls(config, language_model=llm)
        model.set_attn_implementation(impl)
        model.vision_embed.to(llm.dtype)
        return model

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def get_decoder(self):
        return self.language_model.get_decoder()

    # --- inputs -------------------------------------------------------------------------------
    def embed_inputs(self, input_ids, pixel_values=None, image_grid_hw=None, image_grid_list=None):
        """Text embeddings with each image's patch tokens written at its placeholder run.

        `image_grid_list` is `image_grid_hw` as host ints, given by a caller that has already checked the
        placeholders against the images on its CPU copy of `input_ids` (`VoRACollator` does): then nothing is
        read back from the device. Without it, the placeholder count is checked here (one host sync).
        """
        image_token_id = self.config.image_token_id
        is_image = input_ids == image_token_id
        # The image token may lie beyond the LLM's vocabulary (added to the tokenizer, embeddings not
        # resized): look up a valid id and overwrite those rows below.
        safe_ids = torch.where(is_image, torch.zeros_like(input_ids), input_ids)
        embeds = self.language_model.get_input_embeddings()(safe_ids)
        n_images = 0 if image_grid_hw is None else image_grid_hw.shape[0]
        n_patches = 0 if pixel_values is None else pixel_values.shape[0]
        if image_grid_list is not None:
            if len(image_grid_list) != n_images:
                raise ValueError(f"image_grid_list has {len(image_grid_list)} images but image_grid_hw {n_images}")
            expected = sum(int(h) * int(w) for h, w in image_grid_list)
        else:
            n_tokens = int(is_image.sum())  # one sync per forward: wrong inputs must fail here, loudly
            if n_tokens != n_patches:
                raise ValueError(
                    f"image placeholders and images disagree: input_ids hold {n_tokens} '{self.config.image_token}' "
                    f"tokens but the {n_images} image(s) in image_grid_hw have {n_patches} patches in pixel_values"
                )
            expected = int((image_grid_hw[:, 0] * image_grid_hw[:, 1]).sum()) if n_images else 0
        if n_images == 0:
            return embeds, None
        if expected != n_patches:
            raise ValueError(f"pixel_values has {n_patches} patches but image_grid_hw describes {expected}")
        image_embeds = self.vision_embed(pixel_values, image_grid_hw, image_grid_list).to(embeds.dtype)
        if image_grid_list is not None:
            # Positions sized by the host count: unlike masked_scatter, whose backward (masked_select) must read
            # the mask's count back from the GPU, nothing here or in backward syncs.
            positions = torch.nonzero_static(is_image.flatten(), size=n_patches).squeeze(1)
            embeds = embeds.flatten(0, 1).index_copy(0, positions, image_embeds).view_as(embeds)
        else:
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds)
        return embeds, is_image

    # --- forward ------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_hw: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_grid_list: list | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if cache is None:  # transformers < 5.24 passes the KV cache as past_key_values (mask.CACHE_KWARG)
            cache = kwargs.pop("past_key_values", None)
        if (
            inputs_embeds is None and pixel_values is None and input_ids is not None and input_ids.shape[-1] == 1
            and cache is not None and cache.get_seq_length() > 0
        ):
            # A decoding step (one new token, images already in the cache) is exactly a base LLM step: no
            # placeholder check (a host sync), no extra ops. Decoding costs what the base LLM costs.
            return self.language_model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels,
                use_cache=use_cache, logits_to_keep=logits_to_keep, **{CACHE_KWARG: cache}, **kwargs,
            )
        inputs_embeds, attention_mask = self._decoder_inputs(
            input_ids, attention_mask, position_ids, cache, inputs_embeds, pixel_values, image_grid_hw, image_grid_list
        )
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **{CACHE_KWARG: cache},
            **kwargs,
        )

    def last_hidden_state(
        self, input_ids, attention_mask=None, position_ids=None, pixel_values=None, image_grid_hw=None,
        image_grid_list=None, **kwargs,
    ) -> torch.Tensor:
        """The decoder's final (normed) hidden states `[B, L, H]`, without the `lm_head`: training computes the
        LM loss from these at label positions only (`vora.chunked_ce.chunked_lm_loss`), never building logits for
        every position. Same inputs, mask and decoder as `forward`: `get_decoder()` reaches the base decoder
        through a peft wrapper too, whose LoRA layers sit inside it."""
        inputs_embeds, attention_mask = self._decoder_inputs(
            input_ids, attention_mask, position_ids, None, None, pixel_values, image_grid_hw, image_grid_list
        )
        out = self.get_decoder()(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
            **kwargs,
        )
        return out.last_hidden_state

    def _decoder_inputs(
        self, input_ids, attention_mask, position_ids, cache, inputs_embeds, pixel_values, image_grid_hw,
        image_grid_list,
    ):
        """(inputs_embeds, attention_mask) for the decoder: images written in, VoRA's mask built where needed."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("VoRAForCausalLM.forward needs input_ids or inputs_embeds")
            inputs_embeds, _ = self.embed_inputs(input_ids, pixel_values, image_grid_hw, image_grid_list)
        elif pixel_values is not None:
            raise ValueError("pass pixel_values with input_ids, not with inputs_embeds")

        has_images = pixel_values is not None and image_grid_hw is not None and image_grid_hw.shape[0] > 0
        prefill = cache is None or cache.get_seq_length() == 0
        # Packed rows carry segment ids in the mask and restart position ids (see DEVELOPERS.md);
        # generation never packs.
        packed = position_ids is not None and cache is None and attention_mask is not None
        bidirectional = has_images and prefill and self.config.attention_mode == "bidirectional"
        if not isinstance(attention_mask, dict) and (bidirectional or packed):
            block_ids = image_block_ids(input_ids, self.config.image_token_id, image_grid_hw) if bidirectional else None
            attention_mask = build_attention_masks(
                self.language_model.config, inputs_embeds, attention_mask, cache, position_ids, block_ids, packed
            )
        # Otherwise the LLM builds its usual causal mask: decoding costs exactly what the base LLM costs.
        return inputs_embeds, attention_mask

    def prepare_inputs_for_generation(self, input_ids, is_first_iteration=False, pixel_values=None, image_grid_hw=None,
                                      **kwargs):
        # the KV cache stays in kwargs under the installed transformers' name (mask.CACHE_KWARG)
        model_inputs = super().prepare_inputs_for_generation(input_ids, is_first_iteration=is_first_iteration,
                                                             **kwargs)
        # Images enter once, with the prompt; decoding steps are plain causal LLM steps.
        if is_first_iteration or not kwargs.get("use_cache", True):
            model_inputs["pixel_values"] = pixel_values
            model_inputs["image_grid_hw"] = image_grid_hw
        return model_inputs
