"""LoRA on the first N decoder blocks, through peft.

VoRA's LoRA is an exact no-op at step 0 (B = 0, no dropout, no new biases) with scale exactly 1
(lora_alpha = r). Only the LoRA weights of the LLM train; the patch embedding (and distillation heads)
train beside it.
"""

import logging

import torch
from peft import LoraConfig, PeftModel, get_peft_model

logger = logging.getLogger(__name__)

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_RANK = 1024


def decoder_layers(language_model) -> torch.nn.ModuleList:
    """The LLM's list of decoder blocks (through a peft wrapper if there is one)."""
    base = language_model.get_base_model() if isinstance(language_model, PeftModel) else language_model
    layers = getattr(base.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(base).__name__}: cannot find its decoder blocks (expected `get_decoder().layers`)")
    return layers


def lora_config(num_layers: int, rank: int, targets=DEFAULT_TARGETS, depth: int | None = None) -> LoraConfig:
    if not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
        raise ValueError(f"lora.rank: expected an int in [1, {MAX_RANK}], got {rank!r}")
    if depth is not None and not 1 <= num_layers <= depth:
        raise ValueError(f"lora.layers: {num_layers} is beyond the LLM depth ({depth} blocks); use 1..{depth}")
    return LoraConfig(
        r=rank,
        lora_alpha=rank,  # scale = alpha / r = 1, as in the paper
        lora_dropout=0.0,
        bias="none",  # never add biases: the merged model must stay the stock architecture
        target_modules=list(targets),
        layers_to_transform=list(range(num_layers)),
        layers_pattern="layers",
        init_lora_weights=True,  # A Kaiming-uniform, B zeros: exact no-op at init
    )


def check_targets(language_model, targets) -> None:
    """Every requested target must be a Linear inside the first decoder block."""
    block = decoder_layers(language_model)[0]
    found = {name.rsplit(".", 1)[-1] for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    for t in targets:
        if t not in found:
            raise ValueError(f"lora.targets: unknown target module {t!r}; the LLM's linear layers are {sorted(found)}")


def add_lora(vora_model, num_layers: int, rank: int, targets=DEFAULT_TARGETS) -> None:
    """Wrap `vora_model.language_model` in a peft LoRA model (in place) and freeze the LLM.

    The peft wrapper is kept so checkpoints are standard peft adapters (`save_pretrained`) and
    `merge_and_unload` folds them back.
    """
    lm = vora_model.language_model
    depth = len(decoder_layers(lm))
    cfg = lora_config(num_layers, rank, targets, depth=depth)
    check_targets(lm, targets)
    vora_model.language_model = get_peft_model(lm, cfg)
    config = vora_model.config
    config.lora_layers, config.lora_rank, config.lora_targets = num_layers, rank, list(targets)


def merge_lora(vora_model) -> None:
    """Fold the adapter into the LLM weights in memory (peft's merge) and drop the wrapper."""
    if isinstance(vora_model.language_model, PeftModel):
        vora_model.language_model = vora_model.language_model.merge_and_unload()


def parameter_groups(model) -> dict[str, dict[str, int]]:
    """Parameter counts per group: {'lora': {'trainable': n, 'total': n}, 'patch_embed': …, …}."""
    groups: dict[str, dict[str, int]] = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            group = "lora"
        elif "vision_embed." in name:
            group = "patch_embed"
        elif "distill_heads." in name:
            group = "distill_heads"
        elif "teacher." in name:
            group = "teacher"
        else:
            group = "llm"
        g = groups.setdefault(group, {"trainable": 0, "total": 0})
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()  # ZeRO-3 partitions parameters
        g["total"] += n
        if p.requires_grad:
            g["trainable"] += n
    return groups


def log_parameter_groups(model, log=logger.info) -> dict:
    groups = parameter_groups(model)
    total_trainable = sum(g["trainable"] for g in groups.values())
    for name, g in groups.items():
        log(f"parameters[{name}]: trainable {g['trainable']:,} / {g['total']:,}")
    log(f"parameters[all]: trainable {total_trainable:,}")
    return groups
