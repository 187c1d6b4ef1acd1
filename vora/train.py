"""VoRA training entry point. Every launcher runs :func:`main`:

    deepspeed [--num_gpus N | --hostfile H] scripts/train.py CONFIG.yaml [key.sub=value ...]
    deepspeed --module vora.train CONFIG.yaml [key.sub=value ...]
    torchrun --nproc_per_node N -m vora.train CONFIG.yaml [key.sub=value ...]
    vora-train CONFIG.yaml [key.sub=value ...]            (one process: CPU or one GPU)

Order matters under ZeRO-3: the ``TrainingArguments`` (and with them the DeepSpeed config) are created before
any model is loaded, so ``from_pretrained`` builds the frozen LLM and the teacher already partitioned
(``deepspeed.zero.Init``); nothing full-size is materialised on every rank.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import glob
import json
import logging
import os
import re
import shutil
import sys
import uuid

from .config import ConfigError, Recipe, load_recipe, resolve_path

logger = logging.getLogger("vora.train")

DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32", "auto": "auto"}


# ---------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="vora-train",
        description="Train VoRA from a YAML recipe. Overrides: key.sub=value (YAML scalars), e.g. train.max_steps=100.",
    )
    parser.add_argument("config", help="recipe YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    args = parser.parse_args(argv)
    if args.local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        recipe = load_recipe(args.config, args.overrides)
    except ConfigError as e:
        print(f"vora-train: error: {e}", file=sys.stderr)
        if argv is None:
            sys.exit(2)
        raise
    from .checkpoint import CheckpointError
    from .data import DataError
    from .runlock import RunLockError

    try:
        check_local_paths(recipe)  # before anything is loaded: a missing path is one line, at once, no hub retries
        if args.print_config:
            print(json.dumps(recipe.to_dict(), indent=2))
            return 0
        train(recipe)
    except (ConfigError, CheckpointError, DataError, RunLockError) as e:
        # Found while building or running the run: say which file / key and why, no traceback.
        print(f"vora-train: error: {e}", file=sys.stderr)
        if argv is None:
            sys.exit(2)
        raise
    return 0


# ---------------------------------------------------------------------------------------------------- paths
# What the hub accepts as a repo id ("name" or "namespace/name"); anything else can only be a local path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _is_local(path: str) -> bool:
    """A path that cannot be a hub id, or ``dir/name`` whose ``dir`` is a local directory (a mistyped ``name``)."""
    if path.startswith(("/", "./", "../", "~")) or not _HUB_ID.fullmatch(path):
        return True
    return "/" in path and os.path.isdir(path.split("/", 1)[0])


def check_local_paths(recipe: Recipe) -> None:
    """Every local path of the recipe exists: the LLM / VoRA / tokenizer / teacher directories (a string that cannot
    be a hub id is a local path) and the data sources. Raises :class:`ConfigError` naming the key."""
    m = recipe.model
    for key, path in (("model.llm", m.llm), ("model.vora", m.vora), ("model.tokenizer", m.tokenizer)):
        if path and _is_local(path) and not os.path.isdir(os.path.expanduser(path)):
            raise ConfigError(f"{recipe.where(key)}: no such directory: {path}")
    d = recipe.distill
    if d is not None:
        if d.backend == "timm":
            if not os.path.isfile(os.path.expanduser(d.teacher)):
                raise ConfigError(f"{recipe.where('distill.teacher')}: no such file: {d.teacher} (backend timm "
                                  "takes a local weights file)")
        elif _is_local(d.teacher) and not os.path.isdir(os.path.expanduser(d.teacher)):
            raise ConfigError(f"{recipe.where('distill.teacher')}: no such directory: {d.teacher}")
    for section, sources in (("data.sources", recipe.data.sources), ("data.eval_sources", recipe.data.eval_sources)):
        for i, src in enumerate(sources or []):
            path = resolve_path(src.path, recipe.source, must_exist=False)
            found = glob.glob(path) if any(ch in path for ch in "*?[") else [path] if os.path.exists(path) else []
            if not found:
                raise ConfigError(f"{recipe.where(f'{section}.{i}.path')}: no such file or directory: {src.path}")
            if src.image_root:
                root = resolve_path(src.image_root, recipe.source, must_exist=False)
                if not os.path.isdir(root):
                    raise ConfigError(f"{recipe.where(f'{section}.{i}.image_root')}: no such directory: "
                                      f"{src.image_root}")


def _single_process_env() -> None:
    """Started without a launcher (no RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT): say so, as one
    process on a free local port. DeepSpeed would otherwise look for an MPI launcher (and want mpi4py)."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    if any(n in os.environ for n in names) or any(n in os.environ for n in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")):
        return
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    logger.info("no launcher: one process (RANK=0, WORLD_SIZE=1, MASTER_PORT=%d)", port)


# ---------------------------------------------------------------------------------------------------- setup
def _setup_logging(is_main: bool) -> None:
    import transformers

    level = logging.INFO if is_main else logging.WARNING
    fmt = "[%(asctime)s] [%(levelname)s] [%(name)s] %(message)s"
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=fmt, stream=sys.stdout)
    for name in ("vora", "vora.train"):
        logging.getLogger(name).setLevel(level)
    transformers.utils.logging.set_verbosity(logging.INFO if is_main else logging.WARNING)
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    logging.getLogger("transformers").setLevel(logging.WARNING)
    logging.getLogger("transformers.trainer").setLevel(level)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def build_training_arguments(recipe: Recipe):
    """``TrainingArguments`` from ``recipe.train`` (our defaults filled in). Call BEFORE loading models: with a
    ZeRO-3 DeepSpeed config this is what makes ``from_pretrained`` load partitioned."""
    import torch
    from transformers import TrainingArguments

    from .config import TRAIN_DEFAULTS, TRAIN_FORCED

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


def _torch_dtype(name: str | None, recipe: Recipe, args):
    import torch

    if name is None:
        name = "bfloat16" if (args.bf16 and args.deepspeed) else "float32"
    if name == "auto":
        return "auto"
    return getattr(torch, name)


def _zero3() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


# ---------------------------------------------------------------------------------------------------- teacher
def _auto_config(path: str, where: str):
    """``AutoConfig.from_pretrained`` with its failure as one line naming the recipe key."""
    from transformers import AutoConfig

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
    import timm
    import torch

    with torch.device("meta"):
        m = timm.create_model(d.timm_model, pretrained=False, num_classes=0, **(d.timm_kwargs or {}))
    patch = m.patch_embed.patch_size
    patch = patch if isinstance(patch, int) else patch[0]
    size = m.patch_embed.img_size
    size = size if isinstance(size, int) else size[0]
    return {"depth": len(m.blocks), "width": m.embed_dim, "patch": patch, "grid": size // patch}


def _layer_pairs(recipe: Recipe, llm_depth: int, teacher_depth: int) -> list[tuple[int, int]]:
    from .distill import default_layer_map

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
    import torch

    from .teacher import init_patch_embed_from_teacher

    in_blocks = set()
    for m in teacher.model.modules():
        if isinstance(m, torch.nn.ModuleList):
            in_blocks.update(id(p) for p in m.parameters())
    outside = [p for p in list(teacher.model.parameters()) + list(vision_embed.parameters()) if id(p) not in in_blocks]
    from .trainer import _gathered

    with _gathered(outside, modifier_rank=0):
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
            f"{source}: the tokenizer has {len(beyond)} token(s) beyond the LLM's {vocab_size} embeddings (e.g. {names}); "
            "VoRA does not resize embeddings — use the LLM's own tokenizer (with a chat template)"
        )


def build_processor(recipe: Recipe, geometry: dict):
    from transformers import AutoTokenizer

    from .model.image_processing_vora import VoRAImageProcessor
    from .model.processing_vora import VoRAProcessor

    m = recipe.model
    ip_kw = {k: v for k, v in (("patch_size", geometry["patch_size"]), ("min_pixels", m.min_pixels),
                              ("max_pixels", m.max_pixels), ("image_mean", m.image_mean), ("image_std", m.image_std)) if v is not None}
    tok_source = m.tokenizer or recipe.base
    if recipe.stage == 2 and not m.tokenizer and os.path.isfile(os.path.join(m.vora, "processor_config.json")):
        return VoRAProcessor.from_pretrained(m.vora, **ip_kw)
    tokenizer = AutoTokenizer.from_pretrained(tok_source)
    return VoRAProcessor(image_processor=VoRAImageProcessor(**ip_kw), tokenizer=tokenizer)


def build_model(recipe: Recipe, args) -> Built:
    """Processor, VoRA model (+ LoRA), teacher, heads, trainable flags; all under the DeepSpeed config of ``args``."""
    import torch

    from .checkpoint import base_fingerprint
    from .distill import VoRAForTraining
    from .lora import add_lora
    from .model.modeling_vora import VoRAForCausalLM
    from .teacher import Teacher

    m = recipe.model
    dtype = _torch_dtype(m.dtype, recipe, args)
    attn = m.attn_implementation

    # ---- geometry: LLM depth/vocab, teacher depth/width/patch
    base_cfg = _auto_config(recipe.base, recipe.where("model.vora" if recipe.stage == 2 else "model.llm"))
    if recipe.stage == 1 and base_cfg.model_type == "vora":
        raise ConfigError(f"{recipe.source}: model.llm: {m.llm} is a VoRA checkpoint; use model.vora for stage 2")
    if recipe.stage == 2 and base_cfg.model_type != "vora":
        raise ConfigError(f"{recipe.source}: model.vora: {m.vora} is not a VoRA checkpoint (model_type {base_cfg.model_type!r}); use model.llm for stage 1")
    text_cfg = base_cfg.text_config if recipe.stage == 2 else base_cfg
    llm_depth, vocab_size = text_cfg.num_hidden_layers, text_cfg.vocab_size

    teacher_geo = _teacher_geometry(recipe.distill, recipe.where("distill.teacher")) if recipe.distill else None
    if recipe.stage == 2:
        geometry = {"patch_size": base_cfg.patch_size, "vision_embed_dim": base_cfg.vision_embed_dim, "position_grid": base_cfg.position_grid}
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
        vora = VoRAForCausalLM.from_llm(m.llm, image_token_id=processor.image_token_id, dtype=None if dtype == "auto" else dtype,
                                        attn_implementation=attn, **vora_kw)
    else:
        kw = {"dtype": dtype}
        if attn:
            kw["attn_implementation"] = attn
        vora = VoRAForCausalLM.from_pretrained(m.vora, **kw)
        if processor.image_token_id != vora.config.image_token_id:
            raise ConfigError(f"{recipe.source}: the tokenizer's '<image>' id {processor.image_token_id} differs from the "
                              f"checkpoint's image_token_id {vora.config.image_token_id}")
        if m.attention_mode:
            vora.config.attention_mode = m.attention_mode
        vora.config.min_pixels, vora.config.max_pixels = processor.image_processor.min_pixels, processor.image_processor.max_pixels

    # ---- teacher (partitioned at load under ZeRO-3 with the transformers backend)
    teacher = None
    if recipe.distill:
        d = recipe.distill
        tdtype = _torch_dtype(d.dtype, recipe, args) if d.dtype else (vora.dtype if dtype == "auto" else dtype)
        teacher = Teacher.from_pretrained(d.teacher, blocks=sorted({t for _, t in pairs}), backend=d.backend,
                                          timm_model=d.timm_model, timm_kwargs=d.timm_kwargs, dtype=None if tdtype == "auto" else tdtype)
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
        vora.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs)
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
    if _zero3():
        # ZeRO-3 places the parameters; buffers of modules built outside zero.Init (teacher mean/std) stay where they
        # were made: move them to this rank's device.
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None and buf.device != args.device:
                    module._buffers[name] = buf.to(args.device)
    n_train = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters() if p.requires_grad)
    if n_train == 0:
        raise ConfigError(f"{recipe.source}: nothing to train (trainable.llm: frozen, trainable.patch_embed: false, no distillation)")

    run_info = {
        "base_llm": recipe.base,
        "base_fingerprint": base_fingerprint(recipe.base),  # vora-merge checks it against the --base it is given
        "stage": recipe.stage,
        "teacher": None if not recipe.distill else {
            "source": recipe.distill.teacher, "backend": recipe.distill.backend, "timm_model": recipe.distill.timm_model,
            "timm_kwargs": recipe.distill.timm_kwargs, "layer_map": [list(p) for p in pairs], "weight": recipe.distill.weight,
        },
        "trainable": {"llm": mode, "patch_embed": recipe.trainable.patch_embed, "distill_heads": teacher is not None},
        "recipe": recipe.to_dict(),
    }
    return Built(model=model, processor=processor, pairs=pairs, run_info=run_info, save_mode="full" if mode == "full" else "trainable")


# ---------------------------------------------------------------------------------------------------- data
def _check_cache_dir(recipe: Recipe) -> None:
    from .data import _default_cache_dir

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
    from .data import VoRADataset

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
    from .collator import VoRACollator

    d = recipe.data
    return VoRACollator(pad_token_id=processor.pad_token_id, padding_side="right",
                        max_length=d.max_length if d.packing else None, packing=d.packing, patch_size=processor.patch_size,
                        pad_to_multiple_of=d.pad_to_multiple_of, image_token_id=processor.image_token_id)


# ---------------------------------------------------------------------------------------------------- run
def _resume_target(recipe: Recipe, output_dir: str):
    """The checkpoint to resume from, validated (:func:`vora.checkpoint.validate_checkpoint`). With ``true`` /
    ``auto`` a damaged newest checkpoint is passed over, with a warning, for the newest intact one; a damaged
    checkpoint given by path is an error naming the file."""
    from .checkpoint import CheckpointError, list_checkpoints, validate_checkpoint

    r = recipe.train.get("resume_from_checkpoint")
    key = recipe.where("train.resume_from_checkpoint")
    if r in (None, False, "false", ""):
        return None
    if r is True or r == "auto":
        found = list_checkpoints(output_dir)
        if not found:
            if r is True:
                raise ConfigError(f"{key}: no checkpoint-N in {output_dir} "
                                  "(use 'auto' to start fresh when there is none)")
            logger.info("resume_from_checkpoint=auto: no checkpoint in %s, starting from scratch", output_dir)
            return None
        damaged = []
        for ck in found:
            try:
                validate_checkpoint(ck)
            except CheckpointError as e:
                logger.warning("not resuming from %s: %s", ck.name, e)
                damaged.append(str(e))
                continue
            if damaged:
                logger.warning("resuming from %s, the newest intact checkpoint (%d newer one(s) damaged: %s)",
                               ck, len(damaged), "; ".join(damaged))
            return str(ck)
        raise CheckpointError(f"{key}: no intact checkpoint in {output_dir} ({len(found)} damaged; newest: "
                              f"{damaged[0]}); resume from a path, or use another train.output_dir to start afresh")
    if not os.path.isdir(r):
        raise ConfigError(f"{key}: {r} is not a directory")
    try:
        validate_checkpoint(r)
    except CheckpointError as e:
        raise CheckpointError(f"{key}: {e}") from None
    return r


def _lock_output_dir(recipe: Recipe, args):
    """Rank 0 takes ``output_dir``'s run lock (:mod:`vora.runlock`) and picks the run id; every rank learns both, so
    a refused run stops on every rank at once. Returns ``(lock or None, run_id)``."""
    import torch.distributed as dist

    from .runlock import RunLock, RunLockError

    out = args.output_dir
    lock, run_id, error = None, None, None
    if args.process_index == 0:
        run_id = uuid.uuid4().hex[:12]
        try:
            if os.path.exists(out) and not os.path.isdir(out):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), out)
            lock = RunLock(out, run_id).acquire()
        except RunLockError as e:
            error = ("lock", str(e))
        except OSError as e:
            error = ("config", f"{recipe.where('train.output_dir')}: cannot use {out} ({e.strerror or e}); "
                     "choose a writable directory")
        else:
            _remove_stale_temps(out)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [error, run_id]
        dist.broadcast_object_list(box, src=0)
        error, run_id = box
    if error:
        kind, msg = error
        raise RunLockError(msg) if kind == "lock" else ConfigError(msg)
    return lock, run_id


def _remove_stale_temps(output_dir: str) -> None:
    """Temporary save directories of runs that died while saving (``.tmp-checkpoint-N-<run>``, ``.tmp-final-<run>``):
    no other run can be writing them while this one holds the lock, and they may fill the disk."""
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if re.fullmatch(r"\.tmp-(checkpoint-\d+|final)(-[0-9a-f]+)?", name) and os.path.isdir(path):
            logger.warning("removing %s, left by a run that died while saving", path)
            shutil.rmtree(path, ignore_errors=True)


def plot_losses(log_history: list[dict], path: str) -> str | None:
    """Loss curve (loss, lm_loss, distill_loss, eval_loss) → PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for rec in log_history:
        for key in ("loss", "lm_loss", "distill_loss", "eval_loss"):
            if key in rec and "step" in rec:
                series.setdefault(key, []).append((rec["step"], rec[key]))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for key, pts in series.items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, label=key, marker="." if len(xs) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def train(recipe: Recipe):
    """Run a recipe. Returns the trainer (after training, the final weights saved in ``output_dir/final``).
    ``output_dir`` is locked for the run (one run per output_dir: :mod:`vora.runlock`)."""
    import torch.distributed as dist

    is_main = _is_main_process()
    _setup_logging(is_main)
    if recipe.train.get("deepspeed"):
        _single_process_env()
    args = build_training_arguments(recipe)  # FIRST: sets up the (ZeRO-3) DeepSpeed config and process group
    if args.deepspeed and dist.is_available() and dist.is_initialized():
        import deepspeed

        # On CPU, TrainingArguments starts torch.distributed but not DeepSpeed's comm layer, which ZeRO-3's
        # partitioned load (before the engine exists) asks for the number of ranks: it would see 1 and reject the
        # batch size. This adopts the existing process group (a no-op where the GPU path already did it).
        deepspeed.init_distributed(auto_mpi_discovery=False)
    is_main = args.process_index == 0
    _setup_logging(is_main)
    logger.info("recipe %s (stage %d), output_dir %s, deepspeed %s, ZeRO-3 at load: %s",
                recipe.source, recipe.stage, args.output_dir, args.deepspeed or "off", _zero3())
    lock, run_id = _lock_output_dir(recipe, args)  # before anything is loaded: a refused run stops at once
    try:
        return _train(recipe, args, is_main, run_id)
    finally:
        if lock is not None:
            lock.release()


def _train(recipe: Recipe, args, is_main: bool, run_id: str):
    import torch.distributed as dist
    from transformers import set_seed

    from .lora import log_parameter_groups
    from .trainer import DataReportCallback, VoRATrainer

    set_seed(args.seed)
    resume = _resume_target(recipe, args.output_dir)  # validated before the (slow) model build

    built = build_model(recipe, args)
    if is_main:
        lines = []
        log_parameter_groups(built.model, log=lines.append)
        logger.info("trainable parameters by group:\n  %s", "\n  ".join(lines))
        if built.pairs:
            logger.info("distillation pairs (LLM block, teacher block): %s", built.pairs)

    train_ds, eval_ds = build_datasets(recipe, built.processor)
    collator = build_collator(recipe, built.processor)

    trainer = VoRATrainer(
        model=built.model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, data_collator=collator,
        save_mode=built.save_mode, run_info=built.run_info, vora_processor=built.processor, run_id=run_id,
    )
    trainer.add_callback(DataReportCallback(train_ds, args.output_dir, is_main, recipe.data.max_skip_fraction))
    if is_main:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "recipe.resolved.json"), "w") as f:
            json.dump(recipe.to_dict(), f, indent=2)

    trainer.train(resume_from_checkpoint=resume)
    trainer.save_state()  # output_dir/trainer_state.json: the whole log history
    trainer.save_model()  # output_dir/final: weights only, atomic
    if is_main:
        png = plot_losses(trainer.state.log_history, os.path.join(args.output_dir, "loss_curve.png"))
        if png:
            logger.info("loss curve: %s", png)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return trainer


if __name__ == "__main__":
    main()
