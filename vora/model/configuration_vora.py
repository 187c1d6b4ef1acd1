"""VoRAConfig: what a merged VoRA checkpoint needs at inference.

Training-only settings (teacher, distillation, LoRA rank) live in the recipe, not here: a merged
model has no adapter and no teacher. `lora_layers`/`lora_rank`/`lora_targets` are kept only as a
record of how the checkpoint was made (they do not change the architecture).

This file is copied into merged checkpoints for `trust_remote_code=True`: it may import only
transformers.
"""

from transformers import AutoConfig, PretrainedConfig

ATTENTION_MODES = ("bidirectional", "causal")


class VoRAConfig(PretrainedConfig):
    model_type = "vora"
    sub_configs = {"text_config": AutoConfig}

    def __init__(
        self,
        text_config=None,
        patch_size: int = 14,
        vision_embed_dim: int = 1024,
        position_grid: int = 32,
        min_pixels: int = 14 * 14 * 4,
        max_pixels: int = 448 * 448,
        image_token_id: int | None = None,
        image_token: str = "<image>",
        attention_mode: str = "bidirectional",
        rms_norm_eps: float = 1e-6,
        lora_layers: int | None = None,
        lora_rank: int | None = None,
        lora_targets: list | None = None,
        **kwargs,
    ):
        if isinstance(text_config, dict):
            if "model_type" not in text_config:
                raise ValueError("VoRAConfig.text_config: a dict needs a 'model_type' key (e.g. 'qwen2', 'llama')")
            from transformers import CONFIG_MAPPING

            text_config = CONFIG_MAPPING[text_config["model_type"]](**text_config)
        self.text_config = text_config
        if attention_mode not in ATTENTION_MODES:
            raise ValueError(f"VoRAConfig.attention_mode: {attention_mode!r} is not one of {ATTENTION_MODES}")
        for name, value in (("patch_size", patch_size), ("vision_embed_dim", vision_embed_dim),
                            ("position_grid", position_grid)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"VoRAConfig.{name}: expected a positive int, got {value!r}")
        if not (0 < min_pixels <= max_pixels):
            raise ValueError(
                f"VoRAConfig: need 0 < min_pixels <= max_pixels, got min_pixels={min_pixels}, max_pixels={max_pixels}"
            )
        self.patch_size = patch_size
        self.vision_embed_dim = vision_embed_dim
        self.position_grid = position_grid
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.image_token_id = image_token_id
        self.image_token = image_token
        self.attention_mode = attention_mode
        self.rms_norm_eps = rms_norm_eps
        self.lora_layers = lora_layers
        self.lora_rank = lora_rank
        self.lora_targets = lora_targets
        # Generation and embedding sizes come from the wrapped LLM.
        if text_config is not None:
            kwargs.setdefault("tie_word_embeddings", getattr(text_config, "tie_word_embeddings", False))
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                kwargs.setdefault(key, getattr(text_config, key, None))
        super().__init__(**kwargs)
