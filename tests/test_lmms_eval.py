"""lmms-eval on a merged model, offline on CPU: the demo's held-out split exported as a local task and scored by
`lmms-eval --model vora` (the entry-point-registered model) gives the demo's own evaluation — the same answer to
every question and the same accuracy. Skips when lmms-eval is not installed (README "Evaluate")."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.e2e
pytest.importorskip("lmms_eval")

from examples.demo import corpus as demo_corpus  # noqa: E402
from examples.demo import evaluate as demo_eval  # noqa: E402
from examples.demo.export_lmms_task import main  # noqa: E402
from tests.vora_world import build_world  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    world = build_world(root / "world")
    demo_out = root / "demo_out"
    demo_corpus.generate(str(demo_out / "corpus"), n_train=0, n_heldout=5, seed=3, log=lambda m: None)
    return world, demo_out


def demo_evaluation(merged_dir, corpus_dir):
    """What the demo does after merging (examples/demo/run.py::evaluate_merged)."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    model = AutoModelForCausalLM.from_pretrained(str(merged_dir), trust_remote_code=True, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(str(merged_dir), trust_remote_code=True)
    rows = demo_eval.load_heldout(str(corpus_dir))
    acc, answers = demo_eval.evaluate(model, processor, str(corpus_dir), rows)
    return rows, acc, answers


def make_some_answers_right(corpus_dir, answers) -> None:
    """A random tiny model answers nothing right, and 0 == 0 would prove little: make the truth of every other
    question the model's own (demo-scored) answer, so the score is a fraction both evaluations must reproduce."""
    path = Path(corpus_dir) / "heldout.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for k, (row, answer) in enumerate(zip(rows, answers)):
        if k % 2 == 0 and demo_eval.first_word(answer):
            row["answer"] = demo_eval.first_word(answer)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_lmms_eval_score_equals_the_demos_evaluation(setup, tmp_path):
    world, demo_out = setup
    corpus_dir = demo_out / "corpus"
    _, _, answers = demo_evaluation(world.merged_dir, corpus_dir)
    make_some_answers_right(corpus_dir, answers)
    rows, acc, answers = demo_evaluation(world.merged_dir, corpus_dir)
    assert len(rows) >= 10 and 0.2 < acc["all"] < 1

    task_dir = tmp_path / "task"
    assert main([str(demo_out), str(task_dir)]) == 0
    out_dir = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    cmd = [
        str(Path(sys.executable).parent / "lmms-eval"), "--model", "vora",
        "--model_args", f"pretrained={world.merged_dir},device=cpu,dtype=float32",
        "--tasks", "vora_demo", "--include_path", str(task_dir), "--batch_size", "4",
        "--output_path", str(out_dir), "--log_samples",
    ]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    [results_file] = out_dir.rglob("*_results.json")
    results = json.loads(results_file.read_text())["results"]["vora_demo"]
    [samples_file] = out_dir.rglob("*samples_vora_demo*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines() if line.strip()]
    got = {s["doc_id"]: s["filtered_resps"] for s in samples}
    # the same answer to every question (batched differently: 4 per batch, sorted by length, vs the demo's 48)
    assert [got[i].strip() for i in range(len(rows))] == answers
    assert results["accuracy,none"] == pytest.approx(acc["all"])


@pytest.mark.parametrize("device, needle", [("cuda", "torch sees no CUDA GPU here"), ("gpu", "is not a device")])
def test_a_device_torch_does_not_have_is_refused_before_loading(setup, monkeypatch, device, needle):
    """model_args device=cuda on a machine without one: one ValueError naming the argument, before the model loads
    (not torch's error from inside .to() after it)."""
    from transformers import AutoModelForCausalLM

    from vora.integrations.lmms_eval_model import VoRA

    world, _ = setup
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(ValueError, match=f"vora model: device='{device}'.*{needle}"):
        VoRA(pretrained=str(world.merged_dir), device=device)
