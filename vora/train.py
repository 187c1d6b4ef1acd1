"""VoRA training entry point. Every launcher runs :func:`main`:

    deepspeed [--num_gpus N | --hostfile H] scripts/train.py CONFIG.yaml [key.sub=value ...]
    deepspeed --module vora.train CONFIG.yaml [key.sub=value ...]
    torchrun --nproc_per_node N -m vora.train CONFIG.yaml [key.sub=value ...]
    vora-train CONFIG.yaml [key.sub=value ...]            (one process: CPU or one GPU)

This module is the command line and the run (paths checked, logging, the output_dir lock, resume target, training,
final save, loss curve); building the model, teacher and data is :mod:`vora.build`, the training loop
:mod:`vora.trainer`. Order matters under ZeRO-3: the ``TrainingArguments`` (and with them the DeepSpeed config) are
created before any model is loaded, so ``from_pretrained`` builds the frozen LLM and the teacher already partitioned
(``deepspeed.zero.Init``); nothing full-size is materialised on every rank.
"""

from __future__ import annotations

import argparse
import errno
import glob
import json
import logging
import os
import re
import shutil
import socket
import sys
import uuid

import torch.distributed as dist
import transformers
from transformers import set_seed
from transformers.integrations import is_deepspeed_zero3_enabled

from .build import build_collator, build_datasets, build_model, build_training_arguments
from .checkpoint import CheckpointError, list_checkpoints, validate_checkpoint
from .config import ConfigError, Recipe, load_recipe, resolve_path
from .data import DataError
from .lora import log_parameter_groups
from .runlock import RunLock, RunLockError
from .trainer import DataReportCallback, VoRATrainer

logger = logging.getLogger("vora.train")


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
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    logger.info("no launcher: one process (RANK=0, WORLD_SIZE=1, MASTER_PORT=%d)", port)


# ---------------------------------------------------------------------------------------------------- setup
def _setup_logging(is_main: bool) -> None:
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

# ---------------------------------------------------------------------------------------------------- run
def _resume_target(recipe: Recipe, output_dir: str):
    """The checkpoint to resume from, validated (:func:`vora.checkpoint.validate_checkpoint`). With ``true`` /
    ``auto`` a damaged newest checkpoint is passed over, with a warning, for the newest intact one; a damaged
    checkpoint given by path is an error naming the file."""
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
    # Imported at the end of a run only: selecting the Agg backend (no display) is process-wide.
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
    is_main = _is_main_process()
    _setup_logging(is_main)
    if recipe.train.get("deepspeed"):
        _single_process_env()
    args = build_training_arguments(recipe)  # FIRST: sets up the (ZeRO-3) DeepSpeed config and process group
    if args.deepspeed and dist.is_available() and dist.is_initialized():
        import deepspeed  # only with a DeepSpeed config: importing it probes the accelerator and logs

        # On CPU, TrainingArguments starts torch.distributed but not DeepSpeed's comm layer, which ZeRO-3's
        # partitioned load (before the engine exists) asks for the number of ranks: it would see 1 and reject the
        # batch size. This adopts the existing process group (a no-op where the GPU path already did it).
        deepspeed.init_distributed(auto_mpi_discovery=False)
    is_main = args.process_index == 0
    _setup_logging(is_main)
    logger.info("recipe %s (stage %d), output_dir %s, deepspeed %s, ZeRO-3 at load: %s",
                recipe.source, recipe.stage, args.output_dir, args.deepspeed or "off", is_deepspeed_zero3_enabled())
    lock, run_id = _lock_output_dir(recipe, args)  # before anything is loaded: a refused run stops at once
    try:
        return _train(recipe, args, is_main, run_id)
    finally:
        if lock is not None:
            lock.release()


def _train(recipe: Recipe, args, is_main: bool, run_id: str):
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
