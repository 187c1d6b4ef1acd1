"""Every override of a private ``transformers.Trainer`` method and every use of a DeepSpeed internal, in one place.

:class:`VoRATrainer <vora.trainer.VoRATrainer>` inherits :class:`TrainerOverrides`; :mod:`vora.resume` calls
:func:`load_engine_state`. Each entry says why it is needed. Checked against transformers 5.24.0 and DeepSpeed 0.19.8
(the versions the suite runs; pyproject allows ``transformers>=5.17,<5.25``): a newer release may rename or change
any of these, so raise that bound only after the suite passes on it.

Private ``Trainer`` members used but not overridden: ``_get_output_dir``, ``store_flos``, ``_save_scaler``,
``_save_rng_state``, ``_load_optimizer_and_scheduler``, ``_load_scaler`` (here), ``_prepare_inputs``
(``VoRATrainer.prediction_step``) and the attribute ``_loss_shifts_labels`` (set in ``VoRATrainer.__init__``: the
Trainer counts a step's label tokens over ``labels[..., 1:]`` when it is true).
"""

from __future__ import annotations

import logging
import os

import torch
from accelerate.utils import DeepSpeedSchedulerWrapper
from transformers import Trainer
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, rotate_checkpoints

from .checkpoint import barrier

logger = logging.getLogger("vora.train")

TRAINER_STATE = "trainer_state.json"


class TrainerOverrides(Trainer):
    """The private ``Trainer`` methods VoRA replaces. They call ``_atomic_save``, ``_write_weights``, ``_resume`` and
    ``_reset_window`` of :class:`vora.trainer.VoRATrainer`."""

    def _get_learning_rate(self) -> float:
        # Why: the Trainer reads the scheduler after the update; when DeepSpeed owns the optimizer (a ds config with
        # an "optimizer" block, e.g. zero3_offload.json) its engine has already stepped the scheduler by then, so the
        # logged rate was the next step's. Log the rate the update used (``_step_lr``, read before it by
        # compute_loss), for every backend.
        return super()._get_learning_rate() if self._step_lr is None else self._step_lr

    def _save_checkpoint(self, model, trial):
        # Why: Trainer._save_checkpoint writes into checkpoint-N in place (a crash leaves half a checkpoint that
        # resume picks up) and saves the whole model. This writes the same parts (VoRA's weights, optimizer,
        # scheduler, scaler, RNG, trainer state) into a temporary directory renamed when complete (_atomic_save),
        # then rotates old checkpoints as the Trainer does (ordered by step number, not mtime).
        # Otherwise the body of transformers 5.24's method, without push_to_hub.
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
        barrier()

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # Why: under DeepSpeed the Trainer saves the engine's checkpoint, module weights included. The safetensors
        # files written next to it hold every weight a resume needs (loaded strictly before this state), so
        # DeepSpeed's copy would store them twice — the whole LLM when it trains in full under ZeRO-1/2.
        # DeepSpeed internal: ``save_checkpoint`` reads the weights through ``self.module_state_dict()``
        # (_save_checkpoint in DeepSpeed 0.19.8's runtime/engine.py); an instance attribute returning {} shadows that
        # method for this one call.
        if not self.is_deepspeed_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        engine = self.model_wrapped
        engine.module_state_dict = lambda *args, **kwargs: {}
        try:
            engine.save_checkpoint(output_dir, exclude_frozen_parameters=True)
        finally:
            del engine.module_state_dict  # the class method again
        if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # Why: the Trainer loads the weights here (non-strictly for peft models, before the model is prepared for
        # plain torch, through DeepSpeed's module state otherwise). VoRA loads them strictly from its own files
        # after the model is prepared, for every backend: see _prepare_for_training.
        return

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        # Why: the Trainer resumes here with ``deepspeed_load_checkpoint`` (DeepSpeed's module state, refused on
        # another number of ranks). Prepare without it, then resume with vora.resume (strict weights, DeepSpeed
        # state, converted to a universal checkpoint when the world size changed), then the optimizer, scheduler
        # and scaler as the Trainer does.
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, None)
        if resume_from_checkpoint is not None:
            self._resume(resume_from_checkpoint)
            self._load_optimizer_and_scheduler(resume_from_checkpoint)
            self._load_scaler(resume_from_checkpoint)
        self._reset_window()
        return model, train_dataloader


# ---------------------------------------------------------------------------------------------------- DeepSpeed
def load_engine_state(engine, load_dir: str, tag: str, universal: bool, check_module) -> str | None:
    """``engine.load_checkpoint`` of the optimizer, scheduler and DeepSpeed state (module part checked by
    ``check_module``), from a universal checkpoint when ``universal``. Returns the path loaded, None on failure."""
    # DeepSpeed internal: the engine chooses the universal loader through ``load_universal_checkpoint()``, which
    # reads ``_config.load_universal_checkpoint`` (set from the ds config at start); load_checkpoint has no argument
    # for it. Set for this load only: saving and later loads use the native format (DeepSpeed 0.19.8:
    # runtime/engine.py).
    engine._config.load_universal_checkpoint = universal
    try:
        load_path, _ = engine.load_checkpoint(
            load_dir, tag=tag, load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=True,
            custom_load_fn=check_module,
        )
    finally:
        engine._config.load_universal_checkpoint = False
    if load_path is not None and universal:
        unshare_step_counters(engine.optimizer)
    return load_path


def unshare_step_counters(zero_optimizer) -> None:
    """DeepSpeed's ZeRO-3 universal load gives every parameter group the *same* ``step`` tensor; torch's Adam
    increments it in place once per group, so a second group would see step + 2 (wrong bias correction). Give
    each state its own counter (found comparing a universal resume with a native one: step 6 differed)."""
    # DeepSpeed internal: the torch optimizer inside the ZeRO optimizer (``.optimizer``) and its per-parameter state.
    inner = getattr(zero_optimizer, "optimizer", None)
    seen = set()
    for state in getattr(inner, "state", {}).values():
        step = state.get("step") if isinstance(state, dict) else None
        if torch.is_tensor(step):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(step))
