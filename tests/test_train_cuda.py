"""Training on a CUDA GPU (skipped without one): DeepSpeed ZeRO-2 / ZeRO-3 in bf16 with gradient checkpointing and
SDPA, exact resume, and a throughput run at realistic shapes (0.5B-class LLM width/depth, 24-block ViT teacher,
448² images → 1024 image tokens). Same entry point as the CPU tests: `vora.train.main` in a subprocess."""

from __future__ import annotations

import json

import pytest
import torch

from tests.tiny import save_teacher
from tests.train_world import assert_same_steps, build_train_world, run_main, step_logs

pytestmark = [pytest.mark.gpu, pytest.mark.e2e]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_train_world(tmp_path_factory.mktemp("train_world"))


def test_cuda_zero2_bf16_resume_exact(world):
    out = world / "cuda_z2"
    extra = {"train.bf16": "true", "train.gradient_checkpointing": "true", "train.save_steps": 3, "train.max_steps": 6,
             "train.per_device_train_batch_size": 2}
    proc = run_main(world, out, **extra)
    assert "ZeRO-3 at load: False" in proc.stdout
    resumed = world / "cuda_z2_resumed"
    run_main(world, resumed, **{**extra, "train.resume_from_checkpoint": str(out / "checkpoint-3")})
    a, b = step_logs(out), step_logs(resumed)
    print("cuda zero2 bf16:", {s: round(a[s]["loss"], 5) for s in a}, "resumed:",
          {s: round(b[s]["loss"], 5) for s in (4, 5, 6)})
    assert_same_steps(a, b, [4, 5, 6], keys=("loss", "lm_loss", "distill_loss", "grad_norm"))


def test_cuda_zero3_bf16(world):
    out = world / "cuda_z3"
    extra = {"train.deepspeed": "ds_configs/zero3.json", "train.bf16": "true", "train.gradient_checkpointing": "true",
             "train.save_steps": 2, "train.max_steps": 3}
    proc = run_main(world, out, **extra)
    assert "ZeRO-3 at load: True" in proc.stdout
    resumed = world / "cuda_z3_resumed"
    run_main(world, resumed, **{**extra, "train.resume_from_checkpoint": str(out / "checkpoint-2")})
    assert_same_steps(step_logs(out), step_logs(resumed), [3], keys=("loss", "lm_loss", "distill_loss", "grad_norm"))


@pytest.mark.parametrize("ds", ["zero2", "zero3"])
def test_cuda_throughput_realistic_shapes(world, ds):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from tests.helpers_data import save_image, write_jsonl

    big = world / "big"
    if not (big / "llm" / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(world / "llm")
        tok.save_pretrained(big / "llm")
        cfg = Qwen2Config(vocab_size=512, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                          num_attention_heads=14,
                          num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(big / "llm")
        save_teacher(str(big / "teacher"), "clip", image_size=224, patch=14, width=1024, layers=24)
        rows = []
        for i in range(64):
            save_image(str(big / "img" / f"{i}.png"), h=448, w=448 if i % 2 else 336, seed=i)
            rows.append({"image": f"img/{i}.png", "conversations": [
                {"from": "human", "value": "<image>\nDescribe the picture in detail."},
                {"from": "gpt", "value": "There are two dogs playing in the park. " * 8}]})
        write_jsonl(str(big / "data.jsonl"), rows)
    out = world / f"cuda_big_{ds}"
    run_main(world, out, timeout=500, **{
        "model.llm": str(big / "llm"), "distill.teacher": str(big / "teacher"),
        "data.sources.0.path": str(big / "data.jsonl"),
        "model.min_pixels": 3136, "model.max_pixels": 200704, "model.dtype": "bfloat16", "data.max_length": 2048,
        "lora.layers": 24, "lora.rank": 64, "distill.num_blocks": 24,
        "train.deepspeed": f"ds_configs/{ds}.json", "train.bf16": "true", "train.gradient_checkpointing": "true",
        "train.per_device_train_batch_size": 4, "train.max_steps": 10, "train.save_steps": 1000,
        "train.learning_rate": 2e-4})
    logs = step_logs(out)
    tail = [logs[s] for s in (6, 7, 8, 9, 10)]
    summary = {k: round(sum(r[k] for r in tail) / len(tail), 3) for k in ("tokens_per_second", "images_per_second",
                                                                          "loss", "lm_loss", "distill_loss")}
    print(f"cuda throughput {ds}: {json.dumps(summary)}; first loss {logs[1]['loss']:.4f}")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logs.values())
    assert logs[10]["distill_loss"] < logs[1]["distill_loss"]
