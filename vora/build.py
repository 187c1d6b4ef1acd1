"""Building a run from its recipe: training arguments, processor, VoRA model (+ LoRA), teacher, heads, datasets,
collator. Every problem found here is a :class:`ConfigError` naming the recipe key.

Order matters under ZeRO-3: :func:`build_training_arguments` (and with it the DeepSpeed config) runs before any model
is loaded, so ``from_pretrained`` in :func:`build_model` builds the frozen LLM and the teacher already partitioned
(``deepspeed.zero.Init``); nothing full-size is materialised on every rank.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import torch
from transformers import AutoConfig, AutoTokenizer, TrainingArguments
from transformers.integrations import is_deepspeed_zero3_enabled

from .checkpoint import base_fingerprint, gathered
from .collator import VoRACollator
from .config import TRAIN_DEFAULTS, TRAIN_FORCED, ConfigError, Recipe, resolve_path
from .data import VoRADataset, _default_cache_dir
from .distill import VoRAForTraining, default_layer_map
from .lora import add_lora
from .model.image_processing_vora import VoRAImageProcessor
from .model.modeling_vora import VoRAForCausalLM
from .model.processing_vora import VoRAProcessor
from .teacher import Teacher, init_patch_embed_from_teacher

logger = logging.getLogger("vora.train")


# ---------------------------------------------------------------------------------------------------- arguments
def build_training_arguments(recipe: Recipe):
    """``TrainingArguments`` from ``recipe.train`` (our defaults filled in). Call BEFORE loading models: with a
    ZeRO-3 DeepSpeed config this is what makes ``from_pretrained`` load partitioned."""
    kw = dict(recipe.train)
    kw.pop("resume_from_checkpoint", None)
    for key, value in TRAIN_DEFAULTS.items():
        kw.setdefault(key, value)
    kw.update(TRAIN_FORCED)
    # Activation checkpointing is applied to the VoRA model by us (non-reentrant, so distillation hooks see grads).
    kw.pop("gradient_checkpointing", None)
    kw.pop("activation_checkpointing", None)
    kw.pop("gradient_checkpointing_kwargs", None)
    kw.pop("activation_checkpointing_kwargs", None)
    kw["dataloader_num_workers"] = recipe.data.num_workers
    if not torch.cuda.is_available() and "use_cpu" not in kw:
        kw["use_cpu"] = True
    try:
        return TrainingArguments(**kw)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{recipe.source}: train: {e}") from e


def _gradient_checkpointing(recipe: Recipe) -> tuple[bool, dict]:
    t = recipe.train
    on = bool(t.get("activation_checkpointing", t.get("gradient_checkpointing", False)))
    kwargs = t.get("activation_checkpointing_kwargs") or t.get("gradient_checkpointing_kwargs") or {}
    if isinstance(kwargs, str):
        kwargs = json.loads(kwargs)
    kwargs = {"use_reentrant": False, **kwargs}
    if kwargs["use_reentrant"]:
        raise ConfigError(f"{recipe.source}: train.gradient_checkpointing_kwargs.use_reentrant: must be false "
                          "(distillation reads block outputs through hooks)")
    return on, kwargs


def enable_activation_checkpointing(model, kwargs: dict) -> None:
    """transformers 5.23 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` (the old
    name warns); releases down to pyproject's lower bound have only the old one."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _torch_dtype(name: str | None, recipe: Recipe, args):
    if name is None:
        name = "bfloat16" if (args.bf16 and args.deepspeed) else "float32"
    if name == "auto":
        return "auto"
    return getattr(torch, name)


def flex_training_problem(device: torch.device) -> str | None:
    """Why flex_attention cannot train on ``device`` (torch 2.14 has no flex backward on CPU or MPS), else None.
    Checked before any model loads, instead of failing at the first backward from inside torch. Asked of torch with
    a 2-token probe (no compile; torch refuses before computing), so a torch that adds the backward passes. CUDA
    has it: not probed."""
    if device.type == "cuda":
        return None
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.zeros(1, 1, 2, 8, device=device, requires_grad=True)
    try:
        flex_attention(q, q, q).sum().backward()
    except NotImplementedError as e:
        return (f"'flex_attention' cannot train on {device.type} with torch {torch.__version__} "
                f"({str(e).split('.')[0]}); use 'sdpa' there (the same mask, dense)")
    return None


# ---------------------------------------------------------------------------------------------------- teacher
def _auto_config(path: str, where: str):
    """``AutoConfig.from_pretrained`` with its failure as one line naming the recipe key."""
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{where}: cannot load a model config from {path}: {first}") from None


def _teacher_geometry(d, where: str = "distill.teacher") -> dict:
    """Depth, width, patch and image size of the teacher without loading its weights (``where``: the recipe key,
    for messages)."""
    if d.backend == "transformers":
        cfg = _auto_config(d.teacher, where)
        cfg = getattr(cfg, "vision_config", None) or cfg
        missing = [k for k in ("patch_size", "image_size", "num_hidden_layers", "hidden_size") if not hasattr(cfg, k)]
        if missing:
            raise ConfigError(f"{where}: {d.teacher} is not a vision transformer ({type(cfg).__name__}, model_type "
                              f"{getattr(cfg, 'model_type', None)!r}: no {', '.join(missing)}); use a ViT such as "
                              "CLIP, SigLIP or AIMv2")
        patch, size = cfg.patch_size, cfg.image_size
        patch = patch if isinstance(patch, int) else patch[0]
        size = size if isinstance(size, int) else size[0]
        return {"depth": cfg.num_hidden_layers, "width": cfg.hidden_size, "patch": patch, "grid": size // patch}
    import timm  # only for the timm backend: importing it takes seconds

    with torch.device("meta"):
        m = timm.create_model(d.timm_model, pretrained=False, num_classes=0, **(d.timm_kwargs or {}))
    patch = m.patch_embed.patch_size
    patch = patch if isinstance(patch, int) else patch[0]
    size = m.patch_embed.img_size
    size = size if isinstance(size, int) else size[0]
    return {"depth": len(m.blocks), "width": m.embed_dim, "patch": patch, "grid": size // patch}


def _layer_pairs(recipe: Recipe, llm_depth: int, teacher_depth: int) -> list[tuple[int, int]]:
    d = recipe.distill
    if d.layer_map is not None:
        pairs = [(int(a), int(b)) for a, b in d.layer_map]
    else:
        k = d.num_blocks or (recipe.lora.layers if recipe.lora else min(teacher_depth, llm_depth))
        if k > llm_depth:
            raise ConfigError(f"{recipe.source}: distill.num_blocks: {k} is beyond the LLM depth ({llm_depth})")
        pairs = default_layer_map(k, teacher_depth)
    bad = [s for s, _ in pairs if not 1 <= s <= llm_depth]
    if bad:
        raise ConfigError(f"{recipe.source}: distill.layer_map: LLM block(s) {bad} outside 1..{llm_depth}")
    bad = [t for _, t in pairs if not 1 <= t <= teacher_depth]
    if bad:
        raise ConfigError(f"{recipe.source}: distill.layer_map: teacher block(s) {bad} outside 1..{teacher_depth}")
    return pairs


def _init_patch_embed(vision_embed, teacher) -> list[str]:
    """Copy the teacher's patch embedding (gathering only its non-block parameters under ZeRO-3)."""
    in_blocks = set()
    for m in teacher.model.modules():
        if isinstance(m, torch.nn.ModuleList):
            in_blocks.update(id(p) for p in m.parameters())
    outside = [p for p in list(teacher.model.parameters()) + list(vision_embed.parameters()) if id(p) not in in_blocks]
    with gathered(outside, modifier_rank=0):
        return init_patch_embed_from_teacher(vision_embed, teacher)


# ---------------------------------------------------------------------------------------------------- model
@dataclasses.dataclass
class Built:
    model: object  # VoRAForTraining
    processor: object
    pairs: list
    run_info: dict
    save_mode: str


def _check_vocab(processor, vocab_size: int, source: str) -> None:
    tok = processor.tokenizer
    beyond = sorted({i for t, i in tok.get_vocab().items() if i >= vocab_size and i != processor.image_token_id})
    if beyond:
        names = [tok.convert_ids_to_tokens(i) for i in beyond[:5]]
        raise ConfigError(
            f"{source}: the tokenizer has {len(beyond)} token(s) beyond the LLM's {vocab_size} embeddings "
            f"(e.g. {names}); VoRA does not resize embeddings — use the LLM's own tokenizer (with a chat template)"
        )


def build_processor(recipe: Recipe, geometry: dict):
    m = recipe.model
    ip_kw = {k: v for k, v in (("patch_size", geometry["patch_size"]), ("min_pixels", m.min_pixels),
                              ("max_pixels", m.max_pixels), ("image_mean", m.image_mean), ("image_std", m.image_std))
             if v is not None}
    tok_source = m.tokenizer or recipe.base
    if recipe.stage == 2 and not m.tokenizer and os.path.isfile(os.path.join(m.vora, "processor_config.json")):
        return VoRAProcessor.from_pretrained(m.vora, **ip_kw)
    tokenizer = AutoTokenizer.from_pretrained(tok_source)
    return VoRAProcessor(image_processor=VoRAImageProcessor(**ip_kw), tokenizer=tokenizer)


def build_model(recipe: Recipe, args) -> Built:
    """Processor, VoRA model (+ LoRA), teacher, heads, trainable flags; all under the DeepSpeed config of ``args``."""
    m = recipe.model
    dtype = _torch_dtype(m.dtype, recipe, args)
    attn = m.attn_implementation
    if attn == "flex_attention" and (problem := flex_training_problem(args.device)):
        raise ConfigError(f"{recipe.where('model.attn_implementation')}: {problem}: the override "
                          "model.attn_implementation=sdpa")

    # ---- geometry: LLM depth/vocab, teacher depth/width/patch
    base_cfg = _auto_config(recipe.base, recipe.where("model.vora" if recipe.stage == 2 else "model.llm"))
    if recipe.stage == 1 and base_cfg.model_type == "vora":
        raise ConfigError(f"{recipe.source}: model.llm: {m.llm} is a VoRA checkpoint; use model.vora for stage 2")
    if recipe.stage == 2 and base_cfg.model_type != "vora":
        raise ConfigError(f"{recipe.source}: model.vora: {m.vora} is not a VoRA checkpoint (model_type "
                          f"{base_cfg.model_type!r}); use model.llm for stage 1")
    text_cfg = base_cfg.text_config if recipe.stage == 2 else base_cfg
    llm_depth, vocab_size = text_cfg.num_hidden_layers, text_cfg.vocab_size

    teacher_geo = _teacher_geometry(recipe.distill, recipe.where("distill.teacher")) if recipe.distill else None
    if recipe.stage == 2:
        geometry = {"patch_size": base_cfg.patch_size, "vision_embed_dim": base_cfg.vision_embed_dim,
                    "position_grid": base_cfg.position_grid}
    else:
        geometry = {
            "patch_size": m.patch_size or (teacher_geo["patch"] if teacher_geo else 14),
            "vision_embed_dim": m.vision_embed_dim or (teacher_geo["width"] if teacher_geo else 1024),
            "position_grid": m.position_grid or (teacher_geo["grid"] if teacher_geo else 32),
        }
    pairs = _layer_pairs(recipe, llm_depth, teacher_geo["depth"]) if recipe.distill else []

    # ---- processor
    processor = build_processor(recipe, geometry)
    _check_vocab(processor, vocab_size, recipe.source)

    # ---- VoRA model (partitioned at load under ZeRO-3)
    if recipe.stage == 1:
        vora_kw = dict(geometry, attention_mode=m.attention_mode or "bidirectional")
        ip = processor.image_processor
        vora_kw.update(min_pixels=ip.min_pixels, max_pixels=ip.max_pixels)
        vora = VoRAForCausalLM.from_llm(m.llm, image_token_id=processor.image_token_id,
                                        dtype=None if dtype == "auto" else dtype, attn_implementation=attn, **vora_kw)
    else:
        kw = {"dtype": dtype}
        if attn:
            kw["attn_implementation"] = attn
        vora = VoRAForCausalLM.from_pretrained(m.vora, **kw)
        if processor.image_token_id != vora.config.image_token_id:
            raise ConfigError(f"{recipe.source}: the tokenizer's '<image>' id {processor.image_token_id} differs from "
                              f"the checkpoint's image_token_id {vora.config.image_token_id}")
        if m.attention_mode:
            vora.config.attention_mode = m.attention_mode
        ip = processor.image_processor
        vora.config.min_pixels, vora.config.max_pixels = ip.min_pixels, ip.max_pixels

    # ---- teacher (partitioned at load under ZeRO-3 with the transformers backend)
    teacher = None
    if recipe.distill:
        d = recipe.distill
        tdtype = _torch_dtype(d.dtype, recipe, args) if d.dtype else (vora.dtype if dtype == "auto" else dtype)
        teacher = Teacher.from_pretrained(d.teacher, blocks=sorted({t for _, t in pairs}), backend=d.backend,
                                          timm_model=d.timm_model, timm_kwargs=d.timm_kwargs,
                                          dtype=None if tdtype == "auto" else tdtype)
        if recipe.stage == 1 and m.init_patch_embed_from_teacher:
            copied = _init_patch_embed(vora.vision_embed, teacher)
            logger.info("patch embedding initialised from the teacher: %s", ", ".join(copied))

    # ---- what trains
    # New weights (LoRA A, heads) draw from a fixed seed: the same model whatever the ZeRO stage consumed before.
    torch.manual_seed(args.seed + 1)
    mode = recipe.trainable.llm
    if mode == "lora":
        lo = recipe.lora
        try:
            add_lora(vora, num_layers=lo.layers, rank=lo.rank, targets=lo.targets)
        except ValueError as e:  # lora.layers beyond the LLM, a target that is not one of its linear layers
            key, _, msg = str(e).partition(": ")
            text = f"{recipe.where(key)}: {msg}" if key.startswith("lora.") and msg else f"{recipe.source}: {e}"
            raise ConfigError(text) from None
    elif mode == "full":
        vora.language_model.requires_grad_(True)
    else:
        vora.language_model.requires_grad_(False)
    vora.vision_embed.requires_grad_(recipe.trainable.patch_embed)

    gc_on, gc_kwargs = _gradient_checkpointing(recipe)
    if gc_on:
        enable_activation_checkpointing(vora, gc_kwargs)
        vora.config.use_cache = False

    ip = processor.image_processor
    torch.manual_seed(args.seed + 2)
    model = VoRAForTraining(vora, teacher, pairs, weight=recipe.distill.weight if recipe.distill else 1.0,
                            image_mean=ip.image_mean, image_std=ip.image_std, chunked_ce=recipe.model.chunked_ce)
    if teacher is not None:
        model.distill_heads.requires_grad_(True)
    if args.deepspeed and args.bf16:
        # DeepSpeed computes in bf16 (fp32 master weights in the optimizer). ZeRO-1/2 cast the module itself;
        # ZeRO-3 needs every parameter it did not create (patch embedding, LoRA, heads) in bf16 already.
        for p in model.parameters():
            if not hasattr(p, "ds_id") and p.is_floating_point() and p.dtype != torch.bfloat16:
                p.data = p.data.to(torch.bfloat16)
    if is_deepspeed_zero3_enabled():
        # ZeRO-3 places the parameters; buffers of modules built outside zero.Init (teacher mean/std) stay where they
        # were made: move them to this rank's device.
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None and buf.device != args.device:
                    module._buffers[name] = buf.to(args.device)
    n_train = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters() if p.requires_grad)
    if n_train == 0:
        raise ConfigError(f"{recipe.source}: nothing to train (trainable.llm: frozen, trainable.patch_embed: false, "
                          "no distillation)")

    run_info = {
        "base_llm": recipe.base,
        "base_fingerprint": base_fingerprint(recipe.base),  # vora-merge checks it against the --base it is given
        "stage": recipe.stage,
        "teacher": None if not recipe.distill else {
            "source": recipe.distill.teacher, "backend": recipe.distill.backend,
            "timm_model": recipe.distill.timm_model, "timm_kwargs": recipe.distill.timm_kwargs,
            "layer_map": [list(p) for p in pairs], "weight": recipe.distill.weight,
        },
        "trainable": {"llm": mode, "patch_embed": recipe.trainable.patch_embed, "distill_heads": teacher is not None},
        "recipe": recipe.to_dict(),
    }
    return Built(model=model, processor=processor, pairs=pairs, run_info=run_info,
                 save_mode="full" if mode == "full" else "trainable")


# ---------------------------------------------------------------------------------------------------- data
def _check_cache_dir(recipe: Recipe) -> None:
    d = recipe.data
    cache = d.cache_dir or _default_cache_dir()
    what = recipe.where("data.cache_dir") if d.cache_dir else f"{recipe.source}: data.cache_dir (default {cache})"
    try:
        os.makedirs(cache, exist_ok=True)
        with open(os.path.join(cache, f".write-test-{os.getpid()}"), "w"):
            pass
        os.remove(os.path.join(cache, f".write-test-{os.getpid()}"))
    except OSError as e:
        raise ConfigError(f"{what}: cannot write the data cache in {cache} ({e.strerror}); set data.cache_dir "
                          "(or $VORA_DATA_CACHE) to a writable directory") from None


def build_datasets(recipe: Recipe, processor):
    d = recipe.data
    _check_cache_dir(recipe)

    def make(sources, key):
        specs = [dataclasses.asdict(s) for s in sources]
        for s in specs:
            s["path"] = resolve_path(s["path"], recipe.source, must_exist=False)
            if s.get("image_root"):
                s["image_root"] = resolve_path(s["image_root"], recipe.source, must_exist=False)
        try:
            ds = VoRADataset(specs, processor, max_length=d.max_length, on_bad_sample=d.on_bad_sample,
                             cache_dir=d.cache_dir)
        except (ValueError, OSError) as e:  # unreadable / unknown format / malformed file: the message names it
            raise ConfigError(f"{recipe.where(key)}: {' '.join(str(e).split())}") from None
        for i, (src, spec) in enumerate(zip(ds.sources, sources)):
            if len(src) == 0:
                bad = f" ({src.n_bad_lines} malformed lines)" if src.n_bad_lines else ""
                raise ConfigError(f"{recipe.where(f'{key}.{i}.path')}: {spec.path} holds no record{bad}: nothing to "
                                  "train on")
        return ds

    train_ds = make(d.sources, "data.sources")
    eval_ds = make(d.eval_sources, "data.eval_sources") if d.eval_sources else None
    return train_ds, eval_ds


def build_collator(recipe: Recipe, processor):
    d = recipe.data
    return VoRACollator(pad_token_id=processor.pad_token_id, padding_side="right",
                        max_length=d.max_length if d.packing else None, packing=d.packing,
                        patch_size=processor.patch_size, pad_to_multiple_of=d.pad_to_multiple_of,
                        image_token_id=processor.image_token_id)
