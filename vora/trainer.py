"""The VoRA Trainer: Hugging Face ``Trainer`` with VoRA's loss accounting, logs and checkpoints.

Loss. ``VoRAForTraining`` returns ``LM cross-entropy + λ · distillation``. Per optimizer step the trainer makes
the LM term the mean over all label tokens of the step and the distillation term the mean over all images of the
step (all micro-batches, all ranks; text-only micro-batches contribute 0 with weight 0), whatever the split into
micro-batches and ranks: the model gets the step's label-token count, and λ is rescaled per micro-batch by its
share of the step's images. The logged ``loss`` is therefore the step's objective, ``lm_loss`` / ``distill_loss`` /
``distill_block_k`` its parts, plus ``tokens_per_second`` and ``images_per_second`` (all ranks).

Checkpoints (``output_dir/checkpoint-N``): the trainable weights only — peft adapter, ``vora_trainable.safetensors``
(patch embedding, distillation heads), ``config.json``, ``vora_run.json``, the processor — or, when the whole
LLM trains, the full model (``save_pretrained``, sharded safetensors, made standalone like vora-merge's output:
config ``auto_map``, code files, processor, generation config — it needs no merge); plus optimizer / scheduler / RNG /
trainer state for resuming. Never the teacher, never frozen LLM weights. Each checkpoint is written into
``.tmp-checkpoint-N`` and renamed when complete, so ``checkpoint-N`` is whole or absent.

Resume loads the weights strictly (missing / unexpected / mis-shaped keys are named) and restores optimizer,
scheduler, RNG and the data position: the sampler's batches up to the saved step are skipped as index lists,
without loading or decoding a sample and without a forward pass.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import uuid

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, rotate_checkpoints

logger = logging.getLogger("vora.train")

TRAINER_STATE = "trainer_state.json"

# The checkpoint format and its errors are the ones vora-merge reads.
from .checkpoint import (  # noqa: E402
    ADAPTER_WEIGHTS,
    RUN_FILE,
    TRAINABLE_WEIGHTS,
    CheckpointError,
    check_state_dict,
    swap_into_place,
    run_info,
    write_manifest,
    write_trainable,
)
from .data import DataError  # noqa: E402


def _is_zero3_param(p) -> bool:
    return hasattr(p, "ds_id")


def _gathered(params, modifier_rank=None):
    """Context that materialises ZeRO-3 partitioned params (a no-op for ordinary ones)."""
    params = [p for p in params if _is_zero3_param(p)]
    if not params:
        import contextlib

        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _shape(p) -> tuple:
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


def _read_safetensors_shapes(path: str) -> dict[str, tuple]:
    with safe_open(path, "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def saved_world_size(checkpoint: str) -> int | None:
    """How many ranks wrote a Trainer checkpoint: one writes ``rng_state.pth``, several ``rng_state_<rank>.pth``."""
    names = os.listdir(checkpoint)
    ranks = [int(m.group(1)) for n in names if (m := re.fullmatch(r"rng_state_(\d+)\.pth", n))]
    if ranks:
        return max(ranks) + 1
    return 1 if "rng_state.pth" in names else None


def _unshare_step_counters(zero_optimizer) -> None:
    """DeepSpeed's ZeRO-3 universal load gives every parameter group the *same* ``step`` tensor; torch's Adam
    increments it in place once per group, so a second group would see step + 2 (wrong bias correction). Give
    each state its own counter (found comparing a universal resume with a native one: step 6 differed)."""
    inner = getattr(zero_optimizer, "optimizer", None)
    seen = set()
    for state in getattr(inner, "state", {}).values():
        step = state.get("step") if isinstance(state, dict) else None
        if torch.is_tensor(step):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(step))


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def save_failure_message(final: str, cause: BaseException) -> str:
    """One line: what could not be saved, why, and how much room is left where it was being written."""
    parent = os.path.dirname(os.path.abspath(final))
    try:
        free = f"{_bytes(shutil.disk_usage(parent).free)} free"
    except OSError:
        free = "free space unknown"
    why = " ".join(f"{type(cause).__name__}: {cause}".split())
    why = why if len(why) <= 400 else why[:397] + "..."
    return f"saving {final} failed ({why}); {free} on {parent}; the partial copy was removed"


# ---------------------------------------------------------------------------------------------------- callbacks
class DataReportCallback(TrainerCallback):
    """Bad-sample report at the end of every epoch and of training (counts summed over ranks), and the stop rule:
    a run whose samples read so far are all skipped, or more than ``max_skip_fraction`` of them, raises
    :class:`DataError` (every rank: the counts are all-reduced) before any further step or ``final/``.

    Checked at steps 1, 2, 4, 8, … and every 100 steps, before every checkpoint, and at the end of an epoch and of
    training. The fraction is judged once ``min(100, len)`` samples were read (a few unlucky batches, or the last
    steps of a resumed run, do not stop a run); "none usable" once ``min(16, len)`` were, before a checkpoint (a
    run that trained on nothing saves nothing) and at the ends."""

    def __init__(self, dataset, output_dir: str, is_main: bool, max_skip_fraction: float = 0.5):
        self.dataset = dataset
        self.output_dir = output_dir
        self.is_main = is_main
        self.max_skip_fraction = max_skip_fraction
        self.last = None

    def _counts(self):
        stats = getattr(self.dataset, "stats", None)
        if stats is None:
            return None
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return stats.report(all_reduce=world > 1, log=False)

    def _report(self, title: str):
        rep = self._counts()
        if rep is None:
            return None
        if self.is_main:
            msg = (f"{title}: {rep['ok']} samples ok, {rep['truncated']} truncated, "
                   f"{rep['skipped_total']} skipped {rep['skipped'] or ''}")
            logger.log(logging.WARNING if rep["skipped_total"] else logging.INFO, msg)
        self.last = rep
        return rep

    def _write(self, rep) -> None:
        if rep is not None and self.is_main:
            os.makedirs(self.output_dir, exist_ok=True)
            with open(os.path.join(self.output_dir, "data_report.json"), "w") as f:
                json.dump(rep, f, indent=2)

    def _check(self, rep, final: bool, before_save: bool = False) -> None:
        if rep is None:
            return
        ok, skipped = rep["ok"], rep["skipped_total"]
        seen = ok + skipped
        n = len(self.dataset)
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(rep["skipped"].items(), key=lambda kv: -kv[1]))
        error = None
        if ok == 0 and skipped and (final or before_save or seen >= min(16, n)):
            error = (f"data: no usable sample: all {skipped} samples read so far were skipped ({reasons}); "
                     "the log names the first ones by file:line — fix the data (or data.max_length), or run with "
                     "data.on_bad_sample: error to stop at the first bad one")
        elif seen >= min(100, n) and skipped / seen > self.max_skip_fraction:
            error = (f"data: {skipped} of {seen} samples read so far were skipped ({skipped / seen:.0%}: {reasons}), "
                     f"more than data.max_skip_fraction {self.max_skip_fraction:g}; the log names the first ones by "
                     "file:line — fix the data, or raise data.max_skip_fraction to train on the rest")
        if error:
            self._write(rep)
            raise DataError(error)

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        # At 1, 2, 4, 8, ... then every 100 (one small all-reduce), and before every checkpoint: a run that has
        # trained on nothing writes none.
        if control.should_save or step & (step - 1) == 0 or step % 100 == 0:
            self._check(self._counts(), final=False, before_save=control.should_save)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._check(self._report(f"data report (epoch {state.epoch:.2f})"), final=True)

    def on_train_end(self, args, state, control, **kwargs):
        rep = self._report("data report (end of training)")
        self._write(rep)
        self._check(rep, final=True)


# ---------------------------------------------------------------------------------------------------- trainer
class VoRATrainer(Trainer):
    """``Trainer`` for :class:`vora.distill.VoRAForTraining`.

    ``save_mode``: ``"trainable"`` (LoRA / frozen LLM: adapter + patch embedding + heads) or ``"full"`` (the whole
    LLM trains: the full VoRA model via ``save_pretrained``). ``run_info`` goes to ``vora_run.json``;
    ``vora_processor`` is saved with every checkpoint.
    """

    def __init__(self, *args, save_mode: str = "trainable", run_info: dict | None = None, vora_processor=None,
                 run_id: str | None = None, **kwargs):
        if save_mode not in ("trainable", "full"):
            raise ValueError(f"save_mode must be 'trainable' or 'full', got {save_mode!r}")
        super().__init__(*args, **kwargs)
        self.save_mode = save_mode
        # Unique per run (the same on every rank): names the temporary directories of saves, so two runs can never
        # write into one, and is recorded in vora_run.json and the checkpoint manifest.
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.run_info = {**(run_info or {}), "run_id": self.run_id}
        self.vora_processor = vora_processor
        # VoRAForTraining's LM loss shifts labels (a causal LM): count label tokens over labels[..., 1:].
        self._loss_shifts_labels = True
        # compute_loss normalises over the whole accumulated step itself.
        self.loss_is_scaled_for_ga = True
        self._reset_window()
        self._eval_acc = None
        self._step_lr = None  # the learning rate of the current step's update (read before it; see _get_learning_rate)

    # ------------------------------------------------------------------------------------------ loss and logs
    @property
    def train_model(self):
        return self.model  # VoRAForTraining (DeepSpeed / DDP wrap it in model_wrapped)

    def _reset_window(self):
        self._win = {"lm_sum": 0.0, "lm_tokens": 0.0, "distill": 0.0, "img": 0.0, "blocks": None, "tokens": 0, "images": 0}
        self._win_t0 = time.perf_counter()

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Also count the step's images (all micro-batches, all ranks): the distillation term is a mean over them."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        n = sum(int(b["image_grid_hw"].shape[0]) for b in batch_samples if b.get("image_grid_hw") is not None)
        n = torch.tensor(float(n), device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            n = self.accelerator.gather(n.reshape(1)).sum()
        self._step_images = float(n)
        return batch_samples, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Training: LM = Σ token losses / label tokens of the whole step (all micro-batches and ranks); distillation
        = Σ per-image losses / images of the whole step. The model gets both counts divided by the ranks, so that
        the gradient DeepSpeed / DDP average over ranks and sum over micro-batches is exactly the step objective's."""
        labels = inputs["labels"]
        if model.training and self.optimizer is not None:
            self._step_lr = self.optimizer.param_groups[0]["lr"]  # the rate this step's update will use
        n_local = (labels[:, 1:] != -100).sum()
        grid = inputs.get("image_grid_hw")
        n_img = 0 if grid is None else int(grid.shape[0])
        if model.training and num_items_in_batch is not None:
            world = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            n = torch.as_tensor(num_items_in_batch, device=labels.device).float()
            denom = torch.where(n > 0, n / world, torch.ones_like(n))
            images = getattr(self, "_step_images", 0.0) / world
            out = model(**inputs, num_items_in_batch=denom, num_images_in_batch=images)
            lm_sum = out.lm_loss.float() * denom
        else:
            out = model(**inputs)
            lm_sum = out.lm_loss.float() * n_local
        if model.training:
            w = self._win
            w["lm_sum"] = w["lm_sum"] + lm_sum.detach()
            w["lm_tokens"] = w["lm_tokens"] + n_local
            w["distill"] = w["distill"] + out.distill_loss.detach().float() * n_img
            w["img"] += n_img
            bl = out.block_losses.detach().float() * n_img
            w["blocks"] = bl if w["blocks"] is None else w["blocks"] + bl
            if "attention_mask" in inputs:
                w["tokens"] = w["tokens"] + (inputs["attention_mask"] > 0).sum()
            w["images"] += n_img
        return (out.loss, out) if return_outputs else out.loss

    def _window_metrics(self) -> dict[str, float]:
        w = self._win
        k = len(self.train_model.pairs)
        blocks = w["blocks"] if w["blocks"] is not None else torch.zeros(k)
        head = [w[key] for key in ("lm_sum", "lm_tokens", "distill", "img", "tokens", "images")]
        vec = torch.cat([
            torch.stack([torch.as_tensor(x, dtype=torch.float64).reshape(()).cpu() for x in head]),
            torch.as_tensor(blocks, dtype=torch.float64).reshape(-1).cpu(),
        ]).to(self.args.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(vec)
        vec = vec.cpu().tolist()
        lm_sum, lm_tokens, distill, img, tokens, images = vec[:6]
        elapsed = max(time.perf_counter() - self._win_t0, 1e-9)
        out = {"lm_loss": lm_sum / max(lm_tokens, 1.0)}
        if self.train_model.teacher is not None and img > 0:  # no images in the window: nothing to report
            out["distill_loss"] = distill / max(img, 1.0)
            for (s, _), v in zip(self.train_model.pairs, vec[6:]):
                out[f"distill_block_{s}"] = v / max(img, 1.0)
        out["tokens_per_second"] = round(tokens / elapsed, 2)
        out["images_per_second"] = round(images / elapsed, 2)
        return out

    def _get_learning_rate(self) -> float:
        # The Trainer reads the scheduler after the update; when DeepSpeed owns the optimizer (a ds config with an
        # "optimizer" block, e.g. zero3_offload.json) its engine has already stepped the scheduler by then, so the
        # logged rate was the next step's. Log the rate the update used, read before it, for every backend.
        return super()._get_learning_rate() if self._step_lr is None else self._step_lr

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and "learning_rate" in logs and self.model is not None and self.model.training:
            logs.update(self._window_metrics())
            self._reset_window()
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, out = self.compute_loss(model, inputs, return_outputs=True)
        acc = self._eval_acc
        if acc is not None:
            n = (inputs["labels"][:, 1:] != -100).sum().double()
            acc[0] += out.lm_loss.double() * n
            acc[1] += n
            n_img = 0 if inputs.get("image_grid_hw") is None else inputs["image_grid_hw"].shape[0]
            acc[2] += out.distill_loss.double() * n_img
            acc[3] += n_img
        return loss.detach(), None, None

    def evaluation_loop(self, *args, **kwargs):
        self._eval_acc = [torch.zeros((), dtype=torch.float64, device=self.args.device) for _ in range(4)]
        try:
            output = super().evaluation_loop(*args, **kwargs)
        finally:
            acc, self._eval_acc = self._eval_acc, None
        vec = torch.stack(acc)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(vec)
        prefix = kwargs.get("metric_key_prefix", "eval")
        output.metrics[f"{prefix}_lm_loss"] = float(vec[0] / vec[1].clamp(min=1))
        if self.train_model.teacher is not None:
            output.metrics[f"{prefix}_distill_loss"] = float(vec[2] / vec[3].clamp(min=1))
        return output

    # ------------------------------------------------------------------------------------------ what is saved
    def _vora(self):
        return self.train_model.vora

    def _trainable_named(self) -> dict[str, torch.nn.Parameter]:
        """Trainable parameters by checkpoint name: ``language_model.*`` (peft names) / ``vision_embed.*`` /
        ``distill_heads.*``."""
        out = {}
        for n, p in self.train_model.named_parameters():
            if p.requires_grad:
                out[n[len("vora."):] if n.startswith("vora.") else n] = p
        return out

    def _checkpoint_tensors(self) -> dict[str, torch.Tensor] | None:
        """Gathered CPU copies of what a trainable-only checkpoint holds (on the main process; None elsewhere):
        every trainable parameter, plus the whole patch embedding (it defines the model even when frozen)."""
        params = dict(self._trainable_named())
        for n, p in self._vora().vision_embed.named_parameters():
            params.setdefault(f"vision_embed.{n}", p)
        out = {}
        items = list(params.items())
        chunk = 64
        for i in range(0, len(items), chunk):
            part = items[i : i + chunk]
            with _gathered([p for _, p in part]):
                if self.args.should_save:
                    for n, p in part:
                        out[n] = p.detach().to("cpu", copy=True).contiguous()
        return out if self.args.should_save else None

    def _write_weights(self, directory: str) -> None:
        """Write the model part of a checkpoint into ``directory`` (collective under ZeRO-3)."""
        vora = self._vora()
        if self.save_mode == "full":
            state = self._full_state_dict()
            if self.args.should_save:
                vora_sd = {k[len("vora."):]: v for k, v in state.items() if k.startswith("vora.")}
                heads = {k: v for k, v in state.items() if k.startswith("distill_heads.")}
                vora.save_pretrained(directory, state_dict=vora_sd, max_shard_size="5GB")
                # A standalone model like vora-merge's output (no merge needed): auto_map + code files for
                # trust_remote_code, processor padding on the left, generation config.
                from merge_tools.merge import complete_full_model

                complete_full_model(directory, vora.config, self.vora_processor)
                if heads:
                    save_file({k: v.contiguous() for k, v in heads.items()}, os.path.join(directory, TRAINABLE_WEIGHTS), metadata={"format": "pt"})
        else:
            tensors = self._checkpoint_tensors()
            if self.args.should_save:
                adapter = {k[len("language_model."):]: v for k, v in tensors.items() if k.startswith("language_model.")}
                rest = {k: v for k, v in tensors.items() if not k.startswith("language_model.")}
                bad = [k for k in rest if not k.startswith(("vision_embed.", "distill_heads."))]
                if bad:
                    raise CheckpointError(f"trainable parameters outside the checkpoint format: {bad[:5]}")
                if hasattr(vora.language_model, "peft_config"):
                    info = self.run_info
                    write_trainable(vora, directory, base_llm=info.get("base_llm", ""), teacher=info.get("teacher"),
                                    recipe=info.get("recipe"), trainable=rest, adapter_state_dict=adapter)
                elif adapter:
                    raise CheckpointError(f"LLM parameters {list(adapter)[:3]} train without an adapter: use trainable.llm: full")
                else:  # frozen LLM: patch embedding (and heads) only
                    save_file(rest, os.path.join(directory, TRAINABLE_WEIGHTS), metadata={"format": "pt"})
                    vora.config.save_pretrained(directory)
        if self.args.should_save:
            with open(os.path.join(directory, RUN_FILE), "w") as f:
                json.dump(self.run_info, f, indent=2, default=str)
                f.write("\n")
            if self.vora_processor is not None and self.save_mode != "full":  # full: saved by complete_full_model
                self.vora_processor.save_pretrained(directory)

    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole VoRAForTraining state (teacher excluded), gathered on the main process."""
        if self.is_deepspeed_enabled and self.accelerator.deepspeed_config["zero_optimization"]["stage"] == 3:
            state = self.accelerator.get_state_dict(self.model_wrapped)  # needs stage3_gather_16bit_weights_on_model_save
        else:
            state = self.train_model.state_dict()
        if not self.args.should_save:
            return {}
        return {k: v.detach().to("cpu").contiguous() for k, v in state.items() if not k.startswith("teacher.")}

    # ------------------------------------------------------------------------------------------ checkpoints
    def _atomic_save(self, final: str, write) -> None:
        """Collective: every rank runs ``write(tmp)`` into ``.tmp-<name>-<run id>`` next to ``final``; the main process
        writes the manifest, fsyncs and renames it to ``final``. A failure removes the temporary directory and raises
        a one-line :class:`CheckpointError` naming ``final``, the cause and the free space."""
        final = os.path.abspath(final)
        tmp = os.path.join(os.path.dirname(final), f".tmp-{os.path.basename(final)}-{self.run_id}")
        try:
            if self.args.should_save:
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)
            _barrier()
            write(tmp)
            _barrier()
            if self.args.should_save:
                write_manifest(tmp, self.run_id, self.state.global_step)
                swap_into_place(tmp, final)
        except Exception as e:
            if self.args.should_save:
                shutil.rmtree(tmp, ignore_errors=True)
            logger.debug("saving %s failed", final, exc_info=True)
            raise CheckpointError(save_failure_message(final, e)) from e
        except BaseException:  # Ctrl-C: no half-written directory either
            if self.args.should_save:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _save_checkpoint(self, model, trial):
        step = self.state.global_step
        run_dir = self._get_output_dir(trial=trial)
        final = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        if self.hp_search_backend is None and trial is None:
            self.store_flos()

        def write(tmp):
            self._write_weights(tmp)
            if not self.args.save_only_model:
                self._save_optimizer_and_scheduler(tmp)
                self._save_scaler(tmp)
                self._save_rng_state(tmp)
            if self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST) \
                    and self.state.best_global_step:
                best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
                if os.path.exists(best) or best == final:
                    self.state.best_model_checkpoint = best
            if self.args.should_save:
                from transformers.trainer_callback import ExportableState

                for cb in [cb for cb in self.callback_handler.callbacks + [self.control]
                           if isinstance(cb, ExportableState)]:
                    name = cb.__class__.__name__
                    if isinstance(self.state.stateful_callbacks.get(name), list):
                        self.state.stateful_callbacks[name].append(cb.state())
                    else:
                        self.state.stateful_callbacks[name] = cb.state()
                self.state.save_to_json(os.path.join(tmp, TRAINER_STATE))

        self._atomic_save(final, write)
        if self.args.should_save:
            logger.info("saved %s", final)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        _barrier()

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_deepspeed_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        from accelerate.utils import DeepSpeedSchedulerWrapper

        # Optimizer partitions + DeepSpeed's own state, without the module weights: the safetensors files written
        # next to them hold every weight a resume needs (loaded strictly before this state), so DeepSpeed's copy
        # would store them twice — the whole LLM when it trains in full under ZeRO-1/2.
        engine = self.model_wrapped
        engine.module_state_dict = lambda *args, **kwargs: {}
        try:
            engine.save_checkpoint(output_dir, exclude_frozen_parameters=True)
        finally:
            del engine.module_state_dict  # the class method again
        if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Weights only (no optimizer state), written atomically to ``output_dir`` (default ``output_dir/final``)."""
        final = os.path.abspath(output_dir or os.path.join(self.args.output_dir, "final"))
        self._atomic_save(final, self._write_weights)
        if self.args.should_save:
            logger.info("saved the trained weights to %s", final)
        _barrier()

    # ------------------------------------------------------------------------------------------ resume
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # Weights are loaded (strictly) after the model is prepared, for every backend: see _prepare_for_training.
        return

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, None)
        if resume_from_checkpoint is not None:
            logger.info("resuming from %s", resume_from_checkpoint)
            saved_ranks = saved_world_size(resume_from_checkpoint)
            self._check_same_global_batch(resume_from_checkpoint, saved_ranks)
            self.load_checkpoint_weights(resume_from_checkpoint)
            if self.is_deepspeed_enabled:
                self._load_deepspeed_state(resume_from_checkpoint, saved_ranks)
            self._load_optimizer_and_scheduler(resume_from_checkpoint)
            self._load_scaler(resume_from_checkpoint)
        self._reset_window()
        return model, train_dataloader

    def _load_deepspeed_state(self, checkpoint: str, saved_ranks: int | None) -> None:
        frozen = {n for n, p in self.train_model.named_parameters() if not p.requires_grad}

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
        engine, load_dir = self.model_wrapped, checkpoint
        universal = saved_ranks is not None and saved_ranks != self.args.world_size
        if universal:
            # ZeRO partitions the optimizer state by rank, so DeepSpeed refuses it on another number of ranks.
            # Its universal checkpoint (one file per parameter and state) loads on any number: convert once.
            load_dir, tag = self._universal_checkpoint(checkpoint, tag, saved_ranks)
        engine._config.load_universal_checkpoint = universal
        try:
            load_path, _ = engine.load_checkpoint(
                load_dir, tag=tag, load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=True,
                custom_load_fn=check_module,
            )
        finally:
            engine._config.load_universal_checkpoint = False  # saving and later loads use the native format
        if load_path is None:
            raise CheckpointError(f"{checkpoint}: DeepSpeed could not load its state")
        if universal:
            _unshare_step_counters(engine.optimizer)

    def _universal_checkpoint(self, checkpoint: str, tag: str, saved: int) -> tuple[str, str]:
        """DeepSpeed's universal form of ``checkpoint/tag`` under ``output_dir/.universal/`` (converted by rank 0
        with ``deepspeed.checkpoint.ds_to_universal`` into a temporary directory, renamed when complete; reused
        if already there). Returns ``(load_dir, tag)``."""
        # Keyed by the source's path and modification time: another run's checkpoint-N, or this one rewritten,
        # is converted afresh rather than served from a stale copy.
        src = os.path.abspath(os.path.join(checkpoint, tag))
        key = hashlib.sha1(f"{src}:{os.stat(src).st_mtime_ns}".encode()).hexdigest()[:10]
        final = os.path.join(self.args.output_dir, ".universal", f"{os.path.basename(os.path.normpath(checkpoint))}-{key}")
        utag = f"{tag}_universal"
        error = None
        if self.args.process_index == 0 and not os.path.isdir(os.path.join(final, utag)):
            logger.warning("%s was written by %d ranks, this run has %d: converting its DeepSpeed state to a universal "
                           "checkpoint in %s", checkpoint, saved, self.args.world_size, final)
            tmp = f"{final}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                   os.path.join(checkpoint, tag), "--output_folder", os.path.join(tmp, utag), "--inject_missing_state",
                   "--num_extract_workers", "2", "--num_merge_workers", "2"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0 or not os.path.isdir(os.path.join(tmp, utag, "zero")):
                shutil.rmtree(tmp, ignore_errors=True)
                error = (f"{checkpoint}: converting the DeepSpeed state ({saved} ranks) for {self.args.world_size} "
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

    def _check_same_global_batch(self, checkpoint: str, saved: int | None) -> None:
        """The data position is restored by skipping whole steps of the sampler's order, so a resume is exact only
        with the run's samples per step (ranks × per-device batch × accumulation) unchanged; the split may change."""
        if saved is None:
            return
        train = (run_info(checkpoint).get("recipe") or {}).get("train") or {}
        b, ga = train.get("per_device_train_batch_size"), train.get("gradient_accumulation_steps", 1)
        if not isinstance(b, int) or not isinstance(ga, int):
            return
        args = self.args
        now = args.world_size * args.per_device_train_batch_size * args.gradient_accumulation_steps
        if saved * b * ga != now:
            raise CheckpointError(
                f"{checkpoint}: written with {saved * b * ga} samples per step ({saved} ranks × "
                f"train.per_device_train_batch_size {b} × train.gradient_accumulation_steps {ga}); this run has {now} "
                f"({args.world_size} × {args.per_device_train_batch_size} × {args.gradient_accumulation_steps}). "
                "Resuming skips whole steps of data, so keep the product the same (the split may change).")

    def load_checkpoint_weights(self, checkpoint: str) -> None:
        """Strictly load a checkpoint's weights into the model being trained (collective under ZeRO-3)."""
        checkpoint = str(checkpoint)
        if self.save_mode == "full":
            tensors = self._read_full_checkpoint(checkpoint)
        else:
            tensors = self._read_trainable_checkpoint(checkpoint)
        named = dict(self.train_model.named_parameters())
        targets = []
        for name, t in tensors.items():
            key = name if name.startswith("distill_heads.") else f"vora.{name}"
            p = named.get(key)
            if p is None:
                buf = dict(self.train_model.named_buffers()).get(key)
                if buf is None:
                    raise CheckpointError(f"{checkpoint}: {name} has no place in the model")
                buf.data.copy_(t.to(buf.dtype))
                continue
            targets.append((p, t))
        for i in range(0, len(targets), 64):
            part = targets[i : i + 64]
            with _gathered([p for p, _ in part], modifier_rank=0), torch.no_grad():
                for p, t in part:
                    p.data.copy_(t.to(device=p.device, dtype=p.dtype))

    def _read_trainable_checkpoint(self, checkpoint: str) -> dict[str, torch.Tensor]:
        expected = {n: _shape(p) for n, p in self._trainable_named().items()}
        for n, p in self._vora().vision_embed.named_parameters():
            expected.setdefault(f"vision_embed.{n}", _shape(p))
        lm_expected = {k: v for k, v in expected.items() if k.startswith("language_model.")}
        rest_expected = {k: v for k, v in expected.items() if not k.startswith("language_model.")}
        tensors = {}
        path = os.path.join(checkpoint, TRAINABLE_WEIGHTS)
        if not os.path.isfile(path):
            raise CheckpointError(f"{checkpoint}: {TRAINABLE_WEIGHTS} missing (not a VoRA training checkpoint?)")
        check_state_dict(rest_expected, _read_safetensors_shapes(path), path)
        tensors.update(_read_safetensors(path))
        adapter_path = os.path.join(checkpoint, ADAPTER_WEIGHTS)
        if lm_expected or os.path.isfile(adapter_path):
            if not os.path.isfile(adapter_path):
                raise CheckpointError(f"{checkpoint}: {ADAPTER_WEIGHTS} missing but the run trains LoRA weights")
            lm = self._vora().language_model
            adapter_name = getattr(lm, "active_adapter", "default")
            # peft stores keys without the adapter name: ...q_proj.lora_A.weight ↔ ...q_proj.lora_A.default.weight
            to_model = {}
            for k in lm_expected:
                short = k[len("language_model."):].replace(f".{adapter_name}.", ".")
                to_model[short] = k
            got = _read_safetensors_shapes(adapter_path)
            check_state_dict({s: lm_expected[k] for s, k in to_model.items()}, got, adapter_path)
            for s, t in _read_safetensors(adapter_path).items():
                tensors[to_model[s]] = t
        return tensors

    def _read_full_checkpoint(self, checkpoint: str) -> dict[str, torch.Tensor]:
        vora = self._vora()
        index = os.path.join(checkpoint, "model.safetensors.index.json")
        single = os.path.join(checkpoint, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            paths = [os.path.join(checkpoint, x) for x in files]
        elif os.path.isfile(single):
            paths = [single]
        else:
            raise CheckpointError(f"{checkpoint}: no model.safetensors(.index.json) (not a full-model checkpoint?)")
        got = {}
        for p in paths:
            got.update(_read_safetensors_shapes(p))
        # Parameters shared by several names (tied embeddings) are saved once.
        by_id: dict[int, list[str]] = {}
        shapes = {}
        for n, p in vora.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(p), []).append(n)
            shapes[n] = _shape(p)
        persistent_buffers = {n: tuple(b.shape) for n, b in vora.state_dict().items() if n not in shapes}
        expected = dict(persistent_buffers)
        for names in by_id.values():
            present = [n for n in names if n in got]
            for n in present or names[:1]:
                expected[n] = shapes[n]
        check_state_dict(expected, got, f"{checkpoint} (full model)")
        tensors = {}
        for p in paths:
            tensors.update(_read_safetensors(p))
        heads_path = os.path.join(checkpoint, TRAINABLE_WEIGHTS)
        if self.train_model.teacher is not None:
            want = {n: _shape(p) for n, p in self.train_model.distill_heads.named_parameters(prefix="distill_heads")}
            if not os.path.isfile(heads_path):
                raise CheckpointError(f"{checkpoint}: {TRAINABLE_WEIGHTS} (distillation heads) missing")
            check_state_dict(want, _read_safetensors_shapes(heads_path), heads_path)
            tensors.update(_read_safetensors(heads_path))
        return tensors
