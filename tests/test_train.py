"""Training end to end on CPU: DeepSpeed ZeRO-2/3 through `vora.train.main` in subprocesses (RANK/WORLD_SIZE/
MASTER_* set, distinct ports), two processes through the `deepspeed` launcher, gradient accumulation, mixed
text-only / image micro-batches (and a skipped sample), exact resume, checkpoint contents, stage 2.

Everything is built locally in tmp dirs (tiny LLM + tokenizer, tiny CLIP teacher, PNGs + JSONL); nothing is
downloaded (tests/train_world.py). DeepSpeed's CPU ops (shared-memory comm, CPU Adam) are built before any run
(scripts/install.sh into .venv/torch_extensions, or the `deepspeed_ops` fixture of tests/conftest.py), so no
timed subprocess here includes a compile.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.train_world import (
    REPO,
    TINY,
    _base_overrides,
    _env,
    _free_port,
    _recipe,
    _trainer,
    assert_same_steps,
    build_train_world,
    run_main,
    step_logs,
)

STEP_KEYS = ("loss", "grad_norm", "learning_rate", "lm_loss", "distill_loss", "distill_block_1", "distill_block_2",
             "tokens_per_second", "images_per_second")


# ---------------------------------------------------------------------------------------------------- world
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_train_world(tmp_path_factory.mktemp("train_world"))


def safetensors_keys(path: Path) -> dict[str, tuple]:
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


# ---------------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def zero2_run(world):
    """6 steps, ZeRO-2, fp32, 2 samples per micro-batch, checkpoints every 2 steps (keep 2), TensorBoard on."""
    out = world / "zero2"
    proc = run_main(world, out,
                    **{"train.save_steps": 2, "train.save_total_limit": 2, "train.report_to": "tensorboard"})
    return out, proc


@pytest.mark.e2e
def test_zero2_logs_checkpoints_and_artifacts(world, zero2_run):
    out, proc = zero2_run
    logs = step_logs(out)
    assert sorted(logs) == [1, 2, 3, 4, 5, 6]
    for rec in logs.values():
        with_images = rec["images_per_second"] > 0
        assert set(STEP_KEYS) - (set() if with_images else {"distill_loss", "distill_block_1",
                                                            "distill_block_2"}) <= set(rec), rec
        assert abs(rec["loss"] - (rec["lm_loss"] + rec.get("distill_loss", 0.0))) < 1e-4  # λ = 1
    assert any(rec.get("distill_loss", 0) > 0 for rec in logs.values())
    # trainable parameters printed by group; bad sample reported
    assert "trainable parameters by group" in proc.stdout and "parameters[lora]" in proc.stdout
    assert "parameters[teacher]: trainable 0" in proc.stdout
    report = json.loads((out / "data_report.json").read_text())
    assert report["skipped"] == {"image_missing": 1}
    # save_total_limit=2 keeps the last two; nothing half-written left over
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert not list(out.glob(".tmp-*"))
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert list(out.rglob("events.out.tfevents.*"))  # TensorBoard by default
    assert (out / "final" / "adapter_model.safetensors").exists()


@pytest.mark.e2e
def test_checkpoint_holds_trainable_weights_only(world, zero2_run):
    out, _ = zero2_run
    ck = out / "checkpoint-6"
    names = {p.name for p in ck.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "vora_trainable.safetensors", "config.json",
            "vora_run.json",
            "trainer_state.json", "rng_state.pth", "scheduler.pt", "latest", "tokenizer.json",
            "processor_config.json"} <= names
    adapter = safetensors_keys(ck / "adapter_model.safetensors")
    assert adapter and all("lora_A" in k or "lora_B" in k for k in adapter)
    assert {k.split(".layers.")[1].split(".")[0] for k in adapter} == {"0", "1"}  # lora.layers: 2
    trainable = safetensors_keys(ck / "vora_trainable.safetensors")
    assert trainable and all(k.startswith(("vision_embed.", "distill_heads.")) for k in trainable)
    assert any(k.startswith("distill_heads.") for k in trainable)
    # DeepSpeed's own part: optimizer partitions, no module weights (the safetensors above hold them)
    ds = torch.load(next(ck.glob("global_step6/mp_rank_00_model_states.pt")), map_location="cpu", weights_only=False)
    assert ds["module"] == {}
    assert list(ck.glob("global_step6/*optim_states.pt"))
    # nothing of the size of the frozen weights anywhere in the checkpoint
    llm_bytes = sum(f.stat().st_size for f in (world / "llm").glob("*.safetensors"))
    assert sum(f.stat().st_size for f in ck.rglob("*.safetensors")) < llm_bytes / 3
    for f in ck.rglob("*"):
        if f.is_file():
            assert f.stat().st_size < llm_bytes / 2, f
    run = json.loads((ck / "vora_run.json").read_text())
    assert run["base_llm"] == str(world / "llm") and run["teacher"]["source"] == str(world / "teacher")
    assert run["recipe"]["lora"]["rank"] == 4 and run["trainable"]["llm"] == "lora"
    from vora.checkpoint import base_fingerprint

    assert run["base_fingerprint"] == base_fingerprint(world / "llm")  # what vora-merge checks its --base against


@pytest.mark.e2e
def test_final_weights_load_with_vora_checkpoint(world, zero2_run):
    from vora.checkpoint import load_trainable

    out, _ = zero2_run
    model, heads = load_trainable(out / "final")
    assert heads and all(k.startswith(("0.", "1.")) for k in heads)
    adapter = safetensors_keys(out / "final" / "adapter_model.safetensors")
    with safe_open(str(out / "final" / "adapter_model.safetensors"), "pt") as f:
        k = next(k for k in f.keys() if "lora_B" in k)
        assert f.get_tensor(k).abs().sum() > 0  # trained (B starts at zero)
    assert adapter


@pytest.mark.e2e
def test_resume_is_exact_and_skips_without_loading(world, zero2_run):
    """4 steps + resume + 2 steps == 6 uninterrupted steps; the 8 samples of the first 4 steps are not loaded again."""
    out, _ = zero2_run
    resumed = world / "zero2_resumed"
    run_main(world, resumed, **{"train.resume_from_checkpoint": str(out / "checkpoint-4"), "train.save_steps": 2})
    a, b = step_logs(out), step_logs(resumed)
    assert_same_steps(a, b, [5, 6],
                      keys=("loss", "lm_loss", "distill_loss", "distill_block_1", "grad_norm", "learning_rate"))
    report = json.loads((resumed / "data_report.json").read_text())
    # 2 steps × 2 samples, plus the one batch the dataloader reads ahead; the skipped 4 steps were never decoded
    assert report["ok"] + report["skipped_total"] <= (2 + 1) * 2


def run_launcher(world: Path, out: Path, nproc=2, timeout=400, **extra) -> subprocess.CompletedProcess:
    """The deepspeed launcher with ``nproc`` CPU processes (what a user runs)."""
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(_free_port()),
           "--module", "vora.train", str(TINY), *_base_overrides(world, out, **extra)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(single=False), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def two_procs_run(world):
    """4 steps on 2 processes × 1 sample (ZeRO-2), checkpoint at step 4."""
    two = world / "two_procs"
    run_launcher(world, two, **{"train.per_device_train_batch_size": 1, "train.max_steps": 4, "train.save_steps": 4})
    return two


@pytest.mark.e2e
def test_gradient_accumulation_and_two_processes_match(world, zero2_run, two_procs_run):
    """The same 4 steps as 1 process × 2 samples, as 1 process × 1 sample × 2 accumulation steps, and as 2 processes
    × 1 sample through the deepspeed launcher: LM loss is normalised over the step's tokens and distillation over
    the step's images, so all three give the same losses and gradients (some micro-batches are text-only or empty)."""
    out, _ = zero2_run
    ga = world / "ga"
    run_main(world, ga,
             **{"train.per_device_train_batch_size": 1, "train.gradient_accumulation_steps": 2, "train.max_steps": 4,
                           "train.save_steps": 100})
    two = two_procs_run
    # the sampler's order (seed 0): some step pairs a text-only micro-batch with an image one
    g = torch.Generator()
    g.manual_seed(0)
    perm = torch.randperm(16, generator=g).tolist()[:8]
    text_only = [i % 4 == 3 for i in perm]
    assert any(text_only[2 * k] != text_only[2 * k + 1] for k in range(4)), perm
    ref = step_logs(out)
    for other in (step_logs(ga), step_logs(two)):
        assert_same_steps(ref, other, [1, 2, 3, 4], rtol=2e-5, atol=2e-5)
    # the two ranks each wrote their RNG state and optimizer partition into the one checkpoint
    ck = two / "checkpoint-4"
    assert (ck / "rng_state_0.pth").exists() and (ck / "rng_state_1.pth").exists()
    assert len(list(ck.glob("global_step4/*optim_states.pt"))) == 2


@pytest.mark.e2e
def test_resume_on_another_number_of_ranks(world, zero2_run, two_procs_run):
    """ZeRO partitions the optimizer state by rank; a checkpoint written by 2 ranks resumes on 1 (and one written by
    1 on 2) through DeepSpeed's universal format, exactly: steps 5–6 equal the uninterrupted 1-rank run's, Adam's
    moments included (step 6 depends on them). Samples per step must stay the same; otherwise a clear error."""
    out, _ = zero2_run
    ref = step_logs(out)
    keys = ("loss", "lm_loss", "distill_loss", "grad_norm", "learning_rate")
    # 2 ranks × 1 sample → 1 rank × 2 samples
    one = world / "resume_2_to_1"
    run_main(world, one, **{"train.resume_from_checkpoint": str(two_procs_run / "checkpoint-4"), "train.save_steps": 2})
    assert_same_steps(ref, step_logs(one), [5, 6], keys=keys, rtol=2e-5, atol=2e-5)
    converted = list((one / ".universal").iterdir())
    assert len(converted) == 1 and converted[0].name.startswith("checkpoint-4-")  # no temporary leftovers
    assert (converted[0] / "global_step4_universal" / "zero").is_dir()
    # 1 rank × 2 samples → 2 ranks × 1 sample, through the launcher
    two = world / "resume_1_to_2"
    run_launcher(world, two, **{"train.per_device_train_batch_size": 1, "train.save_steps": 2,
                                "train.resume_from_checkpoint": str(out / "checkpoint-4")})
    assert_same_steps(ref, step_logs(two), [5, 6], keys=keys, rtol=2e-5, atol=2e-5)
    # another number of samples per step would skip the wrong data: refused, naming the keys
    proc = run_main(world, world / "resume_bad", must_succeed=False, **{
        "train.per_device_train_batch_size": 1, "train.resume_from_checkpoint": str(out / "checkpoint-4")})
    assert proc.returncode != 0
    assert "vora-train: error:" in proc.stderr and "written with 2 samples per step" in proc.stderr, proc.stderr[-3000:]
    assert "train.per_device_train_batch_size" in proc.stderr and not (world / "resume_bad" / "checkpoint-6").exists()


@pytest.mark.e2e
def test_config_error_found_while_building_the_run_is_one_clear_line(world, tmp_path):
    """A resume target that is not a directory is found after the recipe loaded (inside train()): vora-train says
    which file and key, not a traceback from deep inside."""
    proc = run_main(world, tmp_path / "out", must_succeed=False,
                    **{"train.resume_from_checkpoint": str(tmp_path / "nope")})
    assert proc.returncode != 0
    assert f"vora-train: error: command line: train.resume_from_checkpoint: {tmp_path / 'nope'} is not a directory" \
        in proc.stderr, \
        proc.stderr[-3000:]


@pytest.mark.e2e
def test_zero3_two_processes_then_resume_on_one(world, zero2_run):
    """ZeRO-3 on 2 processes: every rank must call the same modules in the same order (DeepSpeed checks it), also
    when one rank's micro-batch is text-only or empty (the dummy image enters where real images do). Its losses
    equal the 1-process ZeRO-2 run's; resumed on 1 process (universal checkpoint, each parameter group with its own
    Adam step counter) steps 5–6 equal it too."""
    out, _ = zero2_run
    ref = step_logs(out)
    keys = ("loss", "lm_loss", "distill_loss", "grad_norm", "learning_rate")
    z3 = world / "zero3_two_procs"
    extra = {"train.deepspeed": "ds_configs/zero3.json", "train.per_device_train_batch_size": 1, "train.max_steps": 4,
             "train.save_steps": 4}
    run_launcher(world, z3, **extra)
    assert_same_steps(ref, step_logs(z3), [1, 2, 3, 4], keys=keys, rtol=2e-5, atol=2e-5)
    resumed = world / "zero3_resumed_on_one"
    run_main(world, resumed, **{"train.deepspeed": "ds_configs/zero3.json", "train.save_steps": 2,
                                "train.resume_from_checkpoint": str(z3 / "checkpoint-4")})
    assert_same_steps(ref, step_logs(resumed), [5, 6], keys=keys, rtol=2e-5, atol=2e-5)


@pytest.mark.e2e
def test_zero3_offload_matches_and_logs_the_rate_it_used(world, zero2_run):
    """ds_configs/zero3_offload.json (DeepSpeed owns the optimizer, on the CPU): the same losses as ZeRO-2, and the
    logged learning rate is the one each update used (warm-up 0 → 5e-4 → 1e-3), not the next step's."""
    out, _ = zero2_run
    off = world / "zero3_offload"
    run_main(world, off,
             **{"train.deepspeed": "ds_configs/zero3_offload.json", "train.max_steps": 3, "train.save_steps": 3})
    logs = step_logs(off)
    assert [logs[s]["learning_rate"] for s in (1, 2, 3)] == [0.0, 5e-4, 1e-3]
    assert_same_steps(step_logs(out), logs, [1, 2, 3],
                      keys=("loss", "lm_loss", "distill_loss", "grad_norm", "learning_rate"),
                      rtol=2e-5, atol=2e-5)


@pytest.mark.e2e
def test_zero3_bf16_checkpointing_and_resume(world, zero2_run):
    """ZeRO-3 (LLM and teacher partitioned at load), bf16, gradient checkpointing: trains, gathers the trainable
    weights for the checkpoint, resumes exactly."""
    out, _ = zero2_run
    z3 = world / "zero3"
    extra = {"train.deepspeed": "ds_configs/zero3.json", "train.bf16": "true", "train.gradient_checkpointing": "true",
             "train.max_steps": 3, "train.save_steps": 2, "train.per_device_train_batch_size": 2}
    proc = run_main(world, z3, **extra)
    assert "ZeRO-3 at load: True" in proc.stdout
    logs = step_logs(z3)
    ref = step_logs(out)
    for s in (1, 2, 3):  # bf16 vs fp32: close, not equal
        assert abs(logs[s]["lm_loss"] - ref[s]["lm_loss"]) < 0.05 * abs(ref[s]["lm_loss"])
    ck = z3 / "checkpoint-2"
    ours = safetensors_keys(ck / "adapter_model.safetensors")
    theirs = safetensors_keys(out / "checkpoint-4" / "adapter_model.safetensors")
    assert ours == theirs  # full shapes, not ZeRO-3 partitions
    want = safetensors_keys(out / "checkpoint-4" / "vora_trainable.safetensors")
    assert safetensors_keys(ck / "vora_trainable.safetensors") == want
    resumed = world / "zero3_resumed"
    run_main(world, resumed, **{**extra, "train.resume_from_checkpoint": str(ck)})
    assert_same_steps(logs, step_logs(resumed), [3], keys=("loss", "lm_loss", "distill_loss", "grad_norm"))


@pytest.mark.e2e
def test_stage2_full_finetune_saves_full_model_and_resumes(world):
    """Stage 2 from a merged VoRA checkpoint, no teacher, all LLM weights + patch embedding trainable; the plain
    torch path (no DeepSpeed: `vora-train` on one device), with evaluation."""
    from vora import VoRAForCausalLM

    out = world / "stage2"
    extra = {"model.llm": "null", "model.vora": str(world / "merged"), "lora": "null", "distill": "null",
             "trainable.llm": "full", "train.max_steps": 4, "train.save_steps": 2, "train.deepspeed": "null",
             "data.eval_sources": f"[{world / 'data.jsonl'}]", "train.eval_strategy": "steps", "train.eval_steps": 4,
             "train.per_device_eval_batch_size": 4}
    proc = run_main(world, out, **extra)
    evals = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "eval_loss" in h]
    assert evals and evals[0]["eval_lm_loss"] > 0 and abs(evals[0]["eval_loss"] - evals[0]["eval_lm_loss"]) < 0.5
    assert "parameters[llm]: trainable 214,080 / 214,080" in proc.stdout
    assert "parameters[patch_embed]: trainable 1,568 / 1,568" in proc.stdout
    ck = out / "checkpoint-4"
    assert (ck / "model.safetensors").exists() and (ck / "optimizer.pt").exists()
    assert not (ck / "adapter_model.safetensors").exists()
    keys = safetensors_keys(ck / "model.safetensors")
    assert any(k.startswith("language_model.") for k in keys) and any(k.startswith("vision_embed.") for k in keys)
    model = VoRAForCausalLM.from_pretrained(out / "final")
    base = VoRAForCausalLM.from_pretrained(world / "merged")
    assert not torch.equal(model.language_model.lm_head.weight, base.language_model.lm_head.weight)
    resumed = world / "stage2_resumed"
    run_main(world, resumed, **{**extra, "train.resume_from_checkpoint": str(out / "checkpoint-2")})
    assert_same_steps(step_logs(out), step_logs(resumed), [3, 4], keys=("loss", "grad_norm"))


@pytest.mark.e2e
def test_stage2_full_finetune_under_zero2_stores_the_model_once(world):
    """Full fine-tuning under ZeRO-2: the checkpoint's model lives in model.safetensors only (DeepSpeed's model
    states carry no copy), and resuming from it is exact."""
    out = world / "stage2_zero2"
    extra = {"model.llm": "null", "model.vora": str(world / "merged"), "lora": "null", "distill": "null",
             "trainable.llm": "full", "train.max_steps": 4, "train.save_steps": 2}
    run_main(world, out, **extra)
    ck = out / "checkpoint-2"
    model_bytes = (ck / "model.safetensors").stat().st_size
    states = ck / "global_step2" / "mp_rank_00_model_states.pt"
    assert states.stat().st_size < model_bytes / 10, (states.stat().st_size, model_bytes)
    resumed = world / "stage2_zero2_resumed"
    run_main(world, resumed, **{**extra, "train.resume_from_checkpoint": str(ck)})
    assert_same_steps(step_logs(out), step_logs(resumed), [3, 4],
                      keys=("loss", "lm_loss", "grad_norm", "learning_rate"))


# ---------------------------------------------------------------------------------------------------- in process
def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("spec", ["full", "lora", "frozen", "frozen_no_patch"])
def test_stage2_trainable_sets(world, tmp_path, spec):
    from vora.build import build_model, build_training_arguments
    from vora.config import ConfigError

    extra = ["model.llm=null", f"model.vora={world / 'merged'}", "distill=null"]
    if spec == "lora":
        extra += ["lora.layers=3", "lora.rank=2", "trainable.llm=lora"]
    else:
        extra += ["lora=null", f"trainable.llm={spec.split('_')[0]}"]
    if spec == "frozen_no_patch":
        extra += ["trainable.patch_embed=false"]
    recipe = _recipe(world, tmp_path / "o", *extra)
    if spec == "frozen_no_patch":
        with pytest.raises(ConfigError, match="nothing to train"):
            build_model(recipe, build_training_arguments(recipe))
        return
    model = build_model(recipe, build_training_arguments(recipe)).model
    names = _trainable(model)
    vision = {n for n in names if n.startswith("vora.vision_embed.")}
    llm = names - vision
    assert len(vision) == 6  # conv weight/bias, norm, position, proj weight/bias
    if spec == "full":
        assert llm == {n for n, _ in model.named_parameters() if n.startswith("vora.language_model.")}
    elif spec == "lora":
        assert llm and all("lora_" in n for n in llm)
        assert {n.split(".layers.")[1].split(".")[0] for n in llm} == {"0", "1", "2"}
    else:
        assert not llm


@pytest.mark.skipif(torch.cuda.is_available(), reason="flex_attention trains on CUDA")
def test_flex_attention_training_on_cpu_is_refused_before_loading(world, tmp_path):
    """torch 2.14 has no flex_attention backward on CPU: a GPU recipe run on a CPU box fails with one line naming
    the key before any model loads, not at the first backward from inside torch."""
    from vora.build import build_model, build_training_arguments
    from vora.config import ConfigError

    recipe = _recipe(world, tmp_path / "o", "model.attn_implementation=flex_attention")
    with pytest.raises(ConfigError, match=r"command line: model\.attn_implementation: 'flex_attention' cannot train "
                                          r"on cpu .*use 'sdpa'"):
        build_model(recipe, build_training_arguments(recipe))


@pytest.mark.e2e
def test_resume_loads_strictly(world, zero2_run, tmp_path):
    """Missing or unexpected keys in a checkpoint are named; nothing is loaded with strict=False."""
    from safetensors.torch import load_file, save_file

    from vora.checkpoint import CheckpointError

    out, _ = zero2_run
    trainer = _trainer(_recipe(world, tmp_path / "o"))
    good = out / "checkpoint-6"
    trainer.load_checkpoint_weights(good)  # fits
    lora_b = next(p for n, p in trainer.model.named_parameters() if "lora_B" in n)
    assert lora_b.abs().sum() > 0

    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    t = load_file(bad / "vora_trainable.safetensors")
    dropped = sorted(t)[0]
    t.pop(dropped)
    t["vision_embed.extra"] = torch.zeros(1)
    save_file(t, bad / "vora_trainable.safetensors")
    with pytest.raises(CheckpointError) as e:
        trainer.load_checkpoint_weights(bad)
    assert dropped in str(e.value) and "vision_embed.extra" in str(e.value)

    shutil.copy(good / "vora_trainable.safetensors", bad / "vora_trainable.safetensors")
    a = load_file(bad / "adapter_model.safetensors")
    key = sorted(a)[0]
    a[key] = torch.zeros(a[key].shape[0] + 1, *a[key].shape[1:])
    save_file(a, bad / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        trainer.load_checkpoint_weights(bad)


def test_checkpoints_are_atomic(world, tmp_path, monkeypatch):
    """A save that fails half-way leaves no checkpoint-N and removes its temporary directory; the next save works.
    (tests/test_faults_train.py: the message, a real full disk, kill -9 while saving.)"""
    from transformers.trainer_utils import get_last_checkpoint

    from vora.checkpoint import CheckpointError

    out = tmp_path / "o"
    trainer = _trainer(_recipe(world, out, "train.save_only_model=true"))
    trainer.state.global_step = 7
    real = trainer._write_weights

    def broken(directory):
        real(directory)
        raise OSError("disk full")

    monkeypatch.setattr(trainer, "_write_weights", broken)
    with pytest.raises(CheckpointError, match="disk full"):
        trainer._save_checkpoint(trainer.model, None)
    assert not (out / "checkpoint-7").exists() and not list(out.glob(".tmp-*"))
    assert get_last_checkpoint(str(out)) is None
    monkeypatch.setattr(trainer, "_write_weights", real)
    trainer._save_checkpoint(trainer.model, None)
    assert (out / "checkpoint-7" / "adapter_model.safetensors").exists() and not list(out.glob(".tmp-*"))
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-7")


def test_cli_config_error_exit_code(monkeypatch, capsys):
    from vora.train import main

    monkeypatch.setattr(sys, "argv", ["vora-train", str(TINY), "train.learning_rat=1e-4"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    assert "command line: train.learning_rat: unknown key (did you mean learning_rate?)" in capsys.readouterr().err


def test_resume_target(world, tmp_path):
    from vora.config import ConfigError
    from vora.train import _resume_target

    out = tmp_path / "o"
    auto = _recipe(world, out, "train.resume_from_checkpoint=auto")
    assert _resume_target(auto, str(out)) is None  # nothing yet: start fresh
    with pytest.raises(ConfigError, match="no checkpoint-N"):
        _resume_target(_recipe(world, out, "train.resume_from_checkpoint=true"), str(out))
    for n in (3, 12):  # (what validate_checkpoint needs of a checkpoint without manifest)
        (out / f"checkpoint-{n}").mkdir(parents=True)
        (out / f"checkpoint-{n}" / "trainer_state.json").write_text("{}")
    (out / ".tmp-checkpoint-20").mkdir()  # an interrupted save is never resumed from
    assert _resume_target(auto, str(out)) == str(out / "checkpoint-12")
    assert _resume_target(_recipe(world, out, f"train.resume_from_checkpoint={out / 'checkpoint-3'}"),
                          str(out)) == str(out / "checkpoint-3")
    with pytest.raises(ConfigError, match="is not a directory"):
        _resume_target(_recipe(world, out, "train.resume_from_checkpoint=/nope"), str(out))
