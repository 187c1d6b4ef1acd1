"""Resuming a run from ``checkpoint-N``: the weights loaded strictly, then DeepSpeed's optimizer state.

Weights come from VoRA's own safetensors files (missing / unexpected / mis-shaped keys are named), never from
DeepSpeed's module state. The DeepSpeed state is partitioned by rank: on another number of ranks it is converted once
to DeepSpeed's universal checkpoint (``output_dir/.universal/``), which loads on any number. The data position is
restored by skipping whole steps of the sampler, so the samples per step must stay the same (the split may change).
Called by ``VoRATrainer._prepare_for_training`` (:mod:`vora.hf_private`) after the model is prepared.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys

import torch
import torch.distributed as dist

from .checkpoint import (
    CheckpointError,
    gathered,
    param_shape,
    read_full_weights,
    read_trainable_weights,
    run_info,
    saved_world_size,
    swap_into_place,
)
from .hf_private import load_engine_state

logger = logging.getLogger("vora.train")


def resume(trainer, checkpoint: str) -> None:
    """Load ``checkpoint``'s weights into ``trainer``'s prepared model, then its DeepSpeed state (under DeepSpeed).
    The optimizer, scheduler and scaler follow (the Trainer's own loaders)."""
    logger.info("resuming from %s", checkpoint)
    saved_ranks = saved_world_size(checkpoint)
    check_same_global_batch(checkpoint, saved_ranks, trainer.args)
    load_weights(trainer, checkpoint)
    if trainer.is_deepspeed_enabled:
        load_deepspeed_state(trainer, checkpoint, saved_ranks)


def check_same_global_batch(checkpoint: str, saved: int | None, args) -> None:
    """The data position is restored by skipping whole steps of the sampler's order, so a resume is exact only
    with the run's samples per step (ranks × per-device batch × accumulation) unchanged; the split may change."""
    if saved is None:
        return
    train = (run_info(checkpoint).get("recipe") or {}).get("train") or {}
    b, ga = train.get("per_device_train_batch_size"), train.get("gradient_accumulation_steps", 1)
    if not isinstance(b, int) or not isinstance(ga, int):
        return
    now = args.world_size * args.per_device_train_batch_size * args.gradient_accumulation_steps
    if saved * b * ga != now:
        raise CheckpointError(
            f"{checkpoint}: written with {saved * b * ga} samples per step ({saved} ranks × "
            f"train.per_device_train_batch_size {b} × train.gradient_accumulation_steps {ga}); this run has {now} "
            f"({args.world_size} × {args.per_device_train_batch_size} × {args.gradient_accumulation_steps}). "
            "Resuming skips whole steps of data, so keep the product the same (the split may change).")


# ---------------------------------------------------------------------------------------------------- weights
def load_weights(trainer, checkpoint: str) -> None:
    """Strictly load a checkpoint's weights into the model being trained (collective under ZeRO-3)."""
    checkpoint = str(checkpoint)
    model = trainer.train_model  # VoRAForTraining
    if trainer.save_mode == "full":
        heads = None
        if model.teacher is not None:
            heads = {n: param_shape(p) for n, p in model.distill_heads.named_parameters(prefix="distill_heads")}
        tensors = read_full_weights(checkpoint, model.vora, heads)
    else:
        expected = {n: param_shape(p) for n, p in trainer.trainable_named().items()}
        for n, p in model.vora.vision_embed.named_parameters():
            expected.setdefault(f"vision_embed.{n}", param_shape(p))
        adapter_name = getattr(model.vora.language_model, "active_adapter", "default")
        tensors = read_trainable_weights(checkpoint, expected, adapter_name)
    named = dict(model.named_parameters())
    targets = []
    for name, t in tensors.items():
        key = name if name.startswith("distill_heads.") else f"vora.{name}"
        p = named.get(key)
        if p is None:
            buf = dict(model.named_buffers()).get(key)
            if buf is None:
                raise CheckpointError(f"{checkpoint}: {name} has no place in the model")
            buf.data.copy_(t.to(buf.dtype))
            continue
        targets.append((p, t))
    for i in range(0, len(targets), 64):
        part = targets[i : i + 64]
        with gathered([p for p, _ in part], modifier_rank=0), torch.no_grad():
            for p, t in part:
                p.data.copy_(t.to(device=p.device, dtype=p.dtype))


# ---------------------------------------------------------------------------------------------------- DeepSpeed
def load_deepspeed_state(trainer, checkpoint: str, saved_ranks: int | None) -> None:
    """DeepSpeed's optimizer / scheduler state of ``checkpoint`` (its tag in ``latest``), through a universal
    checkpoint when it was written by another number of ranks."""
    frozen = {n for n, p in trainer.train_model.named_parameters() if not p.requires_grad}

    def check_module(src, dst):
        # The weights came from the safetensors files (strictly, above); DeepSpeed's module part is empty
        # (older checkpoints: the trainable parameters). Frozen weights there mean the checkpoint is not this run's.
        extra = sorted(k for k in src if k in frozen)
        if extra:
            raise CheckpointError(f"{checkpoint}: DeepSpeed module state holds non-trainable weights {extra[:5]}")

    latest = os.path.join(checkpoint, "latest")
    if not os.path.isfile(latest):
        raise CheckpointError(f"{checkpoint}: no DeepSpeed optimizer state (file 'latest' missing)")
    with open(latest) as f:
        tag = f.read().strip()
    load_dir = checkpoint
    universal = saved_ranks is not None and saved_ranks != trainer.args.world_size
    if universal:
        # ZeRO partitions the optimizer state by rank, so DeepSpeed refuses it on another number of ranks.
        # Its universal checkpoint (one file per parameter and state) loads on any number: convert once.
        load_dir, tag = universal_checkpoint(checkpoint, tag, saved_ranks, trainer.args)
    if load_engine_state(trainer.model_wrapped, load_dir, tag, universal, check_module) is None:
        raise CheckpointError(f"{checkpoint}: DeepSpeed could not load its state")


def universal_checkpoint(checkpoint: str, tag: str, saved: int, args) -> tuple[str, str]:
    """DeepSpeed's universal form of ``checkpoint/tag`` under ``output_dir/.universal/`` (converted by rank 0
    with ``deepspeed.checkpoint.ds_to_universal`` into a temporary directory, renamed when complete; reused
    if already there). Returns ``(load_dir, tag)``."""
    # Keyed by the source's path and modification time: another run's checkpoint-N, or this one rewritten,
    # is converted afresh rather than served from a stale copy.
    src = os.path.abspath(os.path.join(checkpoint, tag))
    key = hashlib.sha1(f"{src}:{os.stat(src).st_mtime_ns}".encode()).hexdigest()[:10]
    name = f"{os.path.basename(os.path.normpath(checkpoint))}-{key}"
    final = os.path.join(args.output_dir, ".universal", name)
    utag = f"{tag}_universal"
    error = None
    if args.process_index == 0 and not os.path.isdir(os.path.join(final, utag)):
        logger.warning("%s was written by %d ranks, this run has %d: converting its DeepSpeed state to a universal "
                       "checkpoint in %s", checkpoint, saved, args.world_size, final)
        tmp = f"{final}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
               os.path.join(checkpoint, tag), "--output_folder", os.path.join(tmp, utag), "--inject_missing_state",
               "--num_extract_workers", "2", "--num_merge_workers", "2"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.isdir(os.path.join(tmp, utag, "zero")):
            shutil.rmtree(tmp, ignore_errors=True)
            error = (f"{checkpoint}: converting the DeepSpeed state ({saved} ranks) for {args.world_size} "
                     f"ranks failed: {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-3000:]}")
        else:
            swap_into_place(tmp, final)
    if dist.is_available() and dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)  # every rank stops with the same message, none waits forever
        error = box[0]
    if error:
        raise CheckpointError(error)
    return final, utag
