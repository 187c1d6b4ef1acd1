"""The VoRA Trainer: Hugging Face ``Trainer`` with VoRA's loss accounting, logs and checkpoints.

Loss. ``VoRAForTraining`` returns ``LM cross-entropy + λ · distillation``. Per optimizer step the trainer makes
the LM term the mean over all label tokens of the step and the distillation term the mean over all images of the
step (all micro-batches, all ranks; text-only micro-batches contribute 0 with weight 0), whatever the split into
micro-batches and ranks: the model gets the step's label-token and image counts (divided by the ranks) and
``vora.distill.objective`` normalises by them; the trainer never writes to the model. The logged ``loss`` is
therefore the step's objective, ``lm_loss`` / ``distill_loss`` / ``distill_block_k`` its parts, plus
``tokens_per_second`` and ``images_per_second`` (all ranks).

Checkpoints (``output_dir/checkpoint-N``): the trainable weights only — peft adapter, ``vora_trainable.safetensors``
(patch embedding, distillation heads), ``config.json``, ``vora_run.json``, the processor — or, when the whole
LLM trains, the full model (``save_pretrained``, sharded safetensors, made standalone like vora-merge's output:
config ``auto_map``, code files, processor, generation config — it needs no merge); plus optimizer / scheduler / RNG /
trainer state for resuming. Never the teacher, never frozen LLM weights. Each checkpoint is written into
``.tmp-checkpoint-N`` and renamed when complete, so ``checkpoint-N`` is whole or absent.

Resume (:mod:`vora.resume`) loads the weights strictly (missing / unexpected / mis-shaped keys are named) and restores
optimizer, scheduler, RNG and the data position: the sampler's batches up to the saved step are skipped as index
lists, without loading or decoding a sample and without a forward pass. The overrides of private ``Trainer``
methods this needs are in :mod:`vora.hf_private`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from .checkpoint import (
    TRAINABLE_WEIGHTS,
    CheckpointError,
    barrier,
    gathered,
    swap_into_place,
    write_manifest,
    write_run,
    write_safetensors,
    write_trainable,
)
from .data import DataError
from .export import complete_full_model
from .hf_private import TrainerOverrides
from .resume import load_weights, resume

logger = logging.getLogger("vora.train")


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
class VoRATrainer(TrainerOverrides):
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
        self._step_lr = None  # the learning rate of the current step's update (read before it; see hf_private)

    # ------------------------------------------------------------------------------------------ loss and logs
    @property
    def train_model(self):
        return self.model  # VoRAForTraining (DeepSpeed / DDP wrap it in model_wrapped)

    def _reset_window(self):
        self._win = {"lm_sum": 0.0, "lm_tokens": 0.0, "distill": 0.0, "img": 0.0, "blocks": None, "tokens": 0,
                     "images": 0}
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

    def trainable_named(self) -> dict[str, torch.nn.Parameter]:
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
        params = dict(self.trainable_named())
        for n, p in self._vora().vision_embed.named_parameters():
            params.setdefault(f"vision_embed.{n}", p)
        out = {}
        items = list(params.items())
        chunk = 64
        for i in range(0, len(items), chunk):
            part = items[i : i + chunk]
            with gathered([p for _, p in part]):
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
                complete_full_model(directory, vora.config, self.vora_processor)
                if heads:
                    write_safetensors(os.path.join(directory, TRAINABLE_WEIGHTS), heads)
        else:
            tensors = self._checkpoint_tensors()
            if self.args.should_save:
                adapter = {k[len("language_model."):]: v for k, v in tensors.items()
                           if k.startswith("language_model.")}
                rest = {k: v for k, v in tensors.items() if not k.startswith("language_model.")}
                bad = [k for k in rest if not k.startswith(("vision_embed.", "distill_heads."))]
                if bad:
                    raise CheckpointError(f"trainable parameters outside the checkpoint format: {bad[:5]}")
                if hasattr(vora.language_model, "peft_config"):
                    info = self.run_info
                    write_trainable(vora, directory, base_llm=info.get("base_llm", ""), teacher=info.get("teacher"),
                                    recipe=info.get("recipe"), trainable=rest, adapter_state_dict=adapter)
                elif adapter:
                    raise CheckpointError(f"LLM parameters {list(adapter)[:3]} train without an adapter: "
                                          "use trainable.llm: full")
                else:  # frozen LLM: patch embedding (and heads) only
                    write_safetensors(os.path.join(directory, TRAINABLE_WEIGHTS), rest)
                    vora.config.save_pretrained(directory)
        if self.args.should_save:
            write_run(directory, self.run_info)
            if self.vora_processor is not None and self.save_mode != "full":  # full: saved by complete_full_model
                self.vora_processor.save_pretrained(directory)

    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole VoRAForTraining state (teacher excluded), gathered on the main process."""
        if self.is_deepspeed_enabled and self.accelerator.deepspeed_config["zero_optimization"]["stage"] == 3:
            # needs stage3_gather_16bit_weights_on_model_save
            state = self.accelerator.get_state_dict(self.model_wrapped)
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
            barrier()
            write(tmp)
            barrier()
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

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Weights only (no optimizer state), written atomically to ``output_dir`` (default ``output_dir/final``)."""
        final = os.path.abspath(output_dir or os.path.join(self.args.output_dir, "final"))
        self._atomic_save(final, self._write_weights)
        if self.args.should_save:
            logger.info("saved the trained weights to %s", final)
        barrier()

    # ------------------------------------------------------------------------------------------ resume
    def _resume(self, checkpoint: str) -> None:
        resume(self, checkpoint)  # weights, then DeepSpeed's state (see vora.resume)

    def load_checkpoint_weights(self, checkpoint: str) -> None:
        """Strictly load a checkpoint's weights into the model being trained (collective under ZeRO-3)."""
        load_weights(self, checkpoint)
