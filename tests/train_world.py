"""The training world of the end-to-end training tests, built locally (nothing downloaded), and the helpers that run
`vora.train.main` on it in a fresh interpreter (one process, DeepSpeed without a launcher) and read its logs.

DeepSpeed's CPU ops are built before any run (scripts/install.sh, and the `deepspeed_ops` fixture of
tests/conftest.py for environments made otherwise), so no timed subprocess here includes a compile.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

from tests.helpers_data import build_tokenizer, save_image, write_jsonl
from tests.tiny import save_teacher
from vora import VoRAForCausalLM
from vora.build import (
    build_collator,
    build_datasets,
    build_model,
    build_training_arguments,
)
from vora.config import load_recipe
from vora.model.image_processing_vora import VoRAImageProcessor
from vora.model.processing_vora import VoRAProcessor
from vora.trainer import VoRATrainer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_cpu.yaml"


def _save_llm(path: Path, tok, seed=0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
                      bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    model.save_pretrained(path)


def _save_merged(root: Path) -> Path:
    """What vora-merge writes: a VoRA model (model_type vora) with its processor."""
    tok = AutoTokenizer.from_pretrained(root / "llm")
    proc = VoRAProcessor(image_processor=VoRAImageProcessor(patch_size=2, min_pixels=16, max_pixels=64), tokenizer=tok)
    torch.manual_seed(1)
    model = VoRAForCausalLM.from_llm(str(root / "llm"), image_token_id=proc.image_token_id, patch_size=2,
                                     vision_embed_dim=16, position_grid=4, min_pixels=16, max_pixels=64)
    model.save_pretrained(root / "merged")
    proc.save_pretrained(root / "merged")
    return root / "merged"


def build_train_world(root: Path) -> Path:
    """root/: llm/ (tiny Qwen2 + tokenizer), teacher/ (tiny CLIP), img/ + data.jsonl (16 samples: images, text-only
    ones and one with a missing image), merged/ (what vora-merge writes). Runs write their output_dir under root."""
    root.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(str(root / "llm"), "chatml")
    _save_llm(root / "llm", tok)
    save_teacher(str(root / "teacher"))
    rows = []
    for i in range(16):
        if i % 4 == 3:  # text-only samples: some micro-batches have no image at all
            rows.append({"conversations": [{"from": "human", "value": f"Say hello {i}"},
                                           {"from": "gpt", "value": "Hello! How are you today?"}]})
        elif i == 5:  # a bad sample (missing image): skipped and counted, never replaced
            rows.append({"image": "img/missing.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                                     {"from": "gpt", "value": "A dog."}]})
        else:
            h, w = [(8, 8), (10, 8), (12, 6), (6, 10)][i % 4]
            save_image(str(root / "img" / f"{i}.png"), h=h, w=w, seed=i)
            rows.append({"image": f"img/{i}.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat is in the image?"},
                {"from": "gpt", "value": "A cat sitting on a red mat." if i % 2 else "Two dogs playing in the park."}]})
    write_jsonl(str(root / "data.jsonl"), rows)
    _save_merged(root)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(port=None, single=True):
    env = dict(os.environ)
    env.pop("PYTEST_CURRENT_TEST", None)
    env.update(PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    if single:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port or _free_port()))
    return env


def _base_overrides(world: Path, out: Path, **extra) -> list[str]:
    ov = {
        "model.llm": str(world / "llm"), "distill.teacher": str(world / "teacher"),
        "data.sources.0.path": str(world / "data.jsonl"), "data.cache_dir": str(world / "cache"),
        "train.output_dir": str(out),
    }
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


def run_main(world: Path, out: Path, timeout=300, must_succeed=True, **extra) -> subprocess.CompletedProcess:
    """`vora.train.main([...])` in a fresh interpreter, one process, DeepSpeed without a launcher."""
    code = "import sys; from vora.train import main; sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", code, str(TINY), *_base_overrides(world, out, **extra)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    if must_succeed:
        assert proc.returncode == 0, f"training failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return proc


def step_logs(path: Path) -> dict[int, dict]:
    """Per-step training logs from a trainer_state.json (or a run's output_dir: its last checkpoint)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "trainer_state.json").exists():
            path = max(path.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        path = path / "trainer_state.json"
    hist = json.loads(path.read_text())["log_history"]
    return {h["step"]: h for h in hist if "loss" in h}


def assert_same_steps(a: dict, b: dict, steps, keys=("loss", "lm_loss", "distill_loss", "grad_norm"), rtol=1e-6,
                      atol=1e-6):
    for s in steps:
        for k in keys:
            assert (k in a[s]) == (k in b[s]), f"step {s}: {k} logged in one run only"
            if k not in a[s]:
                continue
            x, y = a[s][k], b[s][k]
            assert abs(x - y) <= atol + rtol * abs(x), f"step {s} {k}: {x} vs {y}"


def _recipe(world, out, *extra):
    return load_recipe(str(TINY), _base_overrides(world, out, **{"train.deepspeed": "null"}) + list(extra))


def _trainer(recipe):
    args = build_training_arguments(recipe)
    built = build_model(recipe, args)
    train_ds, _ = build_datasets(recipe, built.processor)
    return VoRATrainer(model=built.model, args=args, train_dataset=train_ds,
                       data_collator=build_collator(recipe, built.processor),
                       save_mode=built.save_mode, run_info=built.run_info, vora_processor=built.processor)
