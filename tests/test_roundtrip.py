"""Train → merge → serve, end to end on CPU through the real entry points, and stage 2 on top of it.

Stage 1: `vora.train.main` (configs/tiny_cpu.yaml: ZeRO-2, a CLIP teacher, image and text-only samples) →
`python -m merge_tools.merge CKPT --output MERGED` → a fresh interpreter in which vora cannot be imported loads
MERGED with `AutoModelForCausalLM` / `AutoProcessor` (`trust_remote_code=True`) and generates from a chat-template
image prompt. Its logits equal the training checkpoint loaded unmerged (`vora.checkpoint.load_trainable`), and the
greedy tokens are identical.

Stage 2 starts from that merged model, three runs at once: LoRA + patch embedding, a frozen LLM (patch embedding
only: no adapter), full fine-tuning (a full model: no merge). Each one is merged, or for full fine-tuning loaded
as it is, and compared with the unmerged checkpoint.

World, training subprocess and overrides: tests/train_world.py. Batches: tests/vora_world.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoProcessor, GenerationConfig

import vora  # noqa: F401  (registers the Auto classes in this process)
from merge_tools import merge as merge_mod
from tests.train_world import REPO, TINY, _base_overrides, _env, build_train_world, run_main, step_logs
from tests.vora_world import make_batch
from vora.checkpoint import load_trainable

pytestmark = pytest.mark.e2e

N_NEW = 8
ADAPTED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

FRESH = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class NoVora(importlib.abc.MetaPathFinder):  # as if vora were not installed (the dev venv has it editable)
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("vora", "merge_tools", "tests"):
                raise ModuleNotFoundError(f"No module named {name!r}")

    sys.meta_path.insert(0, NoVora())
    import torch
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoProcessor

    model_dir, image, out = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(image).convert("RGB")},
                                             {"type": "text", "text": "What is in the image?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    tokens = model.generate(**inputs, max_new_tokens=int(sys.argv[4]), do_sample=False)
    torch.save({"inputs": {k: v for k, v in inputs.items()}, "logits": logits, "tokens": tokens}, out)
    print(json.dumps({"model": type(model).__module__, "processor": type(processor).__module__,
                      "prompt": processor.tokenizer.decode(inputs["input_ids"][0]),
                      "vora_loaded": any(m.split(".")[0] == "vora" for m in sys.modules)}))
    """
)

def serve_fresh(model_dir: Path, image: Path, tmp: Path) -> tuple[dict, dict]:
    """Load ``model_dir`` with trust_remote_code in a fresh interpreter without vora; chat-template prompt with
    ``image``, forward + greedy generate. Returns (its printed summary, {inputs, logits, tokens})."""
    tmp.mkdir(parents=True, exist_ok=True)
    script, out = tmp / "fresh.py", tmp / "fresh.pt"
    script.write_text(FRESH)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_CURRENT_TEST")}
    env.update(HF_MODULES_CACHE=str(tmp / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-I", str(script), str(model_dir), str(image), str(out), str(N_NEW)],
                       cwd=tmp, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["model"].startswith("transformers_modules.")
    assert summary["processor"].startswith("transformers_modules.")
    assert not summary["vora_loaded"]
    return summary, torch.load(out, weights_only=False)


def assert_same_as_unmerged(reference, inputs: dict, logits: torch.Tensor, tokens: torch.Tensor, gen_dir: Path) -> None:
    """``reference`` (the unmerged model) gives the same logits (fp32 tolerance) and greedy tokens."""
    with torch.no_grad():
        want = reference(**inputs).logits
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-5)
    gen = GenerationConfig.from_pretrained(gen_dir)
    ref_tokens = reference.generate(**inputs, max_new_tokens=N_NEW, do_sample=False, generation_config=gen)
    assert tokens.shape[1] > inputs["input_ids"].shape[1]
    assert tokens.tolist() == ref_tokens.tolist()


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for f in files:
        out.update(load_file(str(directory / f)))
    return out


def cli_merge(ckpt: Path, output: Path, capsys, *extra) -> tuple[dict, str]:
    """`vora-merge` in this process (its `main`): returns its JSON summary and its log."""
    capsys.readouterr()
    assert merge_mod.main([str(ckpt), "--output", str(output), *extra]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    return json.loads(printed[-1]), "\n".join(printed[:-1])


def image_batch(model, seed=0):
    """Two rows, an image in each, left padded (tests/vora_world.py), in the model's vocabulary and patch size."""
    cfg = model.config
    rows = [[3, (2, 2), 4], [2, (1, 3), 2, (2, 1), 1]]
    return make_batch(rows, "left", cfg.image_token_id, cfg.text_config.vocab_size, p=cfg.patch_size, seed=seed)


def assert_valid_vora_dir(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "vora" and cfg["architectures"] == ["VoRAForCausalLM"]
    assert set(cfg["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM", "AutoProcessor"}
    for f in merge_mod.CODE_FILES:
        assert (d / f).read_text() == (REPO / "vora" / "model" / f).read_text(), f
    for f in ("tokenizer.json", "processor_config.json", "preprocessor_config.json", "generation_config.json"):
        assert (d / f).is_file(), f
    proc = AutoProcessor.from_pretrained(d)
    assert proc.image_token_id == cfg["image_token_id"] and proc.tokenizer.padding_side == "left"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_train_world(tmp_path_factory.mktemp("train_world"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is fastest, and on a shared 2-core machine several threads spin against
    each other and against the training subprocesses (100× slower forwards under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------------- stage 1
STAGE2_RUNS = {  # stage 2 from the stage-1 merged model: 2 steps (no warmup), no teacher, plain torch
    "lora": {"lora.layers": 3, "lora.rank": 4, "trainable.llm": "lora"},  # LoRA + patch embedding
    "frozen": {"lora": "null", "trainable.llm": "frozen"},  # patch embedding only: no adapter
    "full": {"lora": "null", "trainable.llm": "full", "train.max_steps": 1, "train.save_steps": 1},  # a full model
}


def start_stage2(world: Path, merged: Path, log: Path) -> tuple[subprocess.Popen, dict[str, Path]]:
    """The STAGE2_RUNS through `vora.train.main`, one after the other in one fresh interpreter (imports paid once),
    not waited for."""
    common = {"model.llm": "null", "model.vora": str(merged), "distill": "null", "train.deepspeed": "null",
              "train.max_steps": 2, "train.save_steps": 2, "train.warmup_steps": 0}
    outs = {name: world / f"rt_s2_{name}" for name in STAGE2_RUNS}
    argvs = [[str(TINY),
              *_base_overrides(world, outs[name], **{**common, **extra})] for name, extra in STAGE2_RUNS.items()]
    code = "import json, sys; from vora.train import main\nfor argv in json.loads(sys.argv[1]):\n    main(argv)"
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(argvs)], cwd=REPO, env=_env(),
                            stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, text=True)
    return proc, outs


@pytest.fixture(scope="module")
def stage1(world):
    """3 steps of the tiny recipe (ZeRO-2, teacher): the sampler's 6 samples hold images and a text-only one;
    merged with `python -m merge_tools.merge`. The stage-2 runs start from it at once, in the background, so they
    train while the stage-1 checks run (the `stage2` fixture waits for them)."""
    out = world / "rt_stage1"
    run_main(world, out, **{"train.max_steps": 3, "train.save_steps": 3})
    ckpt = out / "checkpoint-3"
    merged = world / "rt_merged1"
    r = subprocess.run([sys.executable, "-m", "merge_tools.merge", str(ckpt), "--output", str(merged)],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = world / "rt_stage2.log"
    proc, outs = start_stage2(world, merged, log)
    yield SimpleNamespace(out=out, ckpt=ckpt, merged=merged, summary=json.loads(r.stdout.strip().splitlines()[-1]),
                          stage2=(proc, outs, log))
    if proc.poll() is None:  # stage-2 tests not selected: do not leave it running
        proc.kill()
        proc.wait()


def test_stage1_train_merge_serve_roundtrip(world, stage1, tmp_path):
    logs = step_logs(stage1.out)
    assert sorted(logs) == [1, 2, 3]
    assert all(rec["images_per_second"] > 0 and rec["distill_loss"] > 0 for rec in logs.values())  # distillation ran
    g = torch.Generator()
    g.manual_seed(0)  # the sampler's order (seed 0): step 3 pairs a text-only sample (i % 4 == 3) with an image one
    assert [i % 4 == 3 for i in torch.randperm(16, generator=g).tolist()[:6]] == [False] * 4 + [True, False]
    report = json.loads((stage1.out / "data_report.json").read_text())
    assert report["ok"] >= 6 and set(report["skipped"]) <= {"image_missing"}  # read ahead: the next batch's bad sample
    assert stage1.summary["lora_weights"] == 7 * 2 and stage1.summary["base_kind"] == "llm"
    assert_valid_vora_dir(stage1.merged)

    summary, got = serve_fresh(stage1.merged, world / "img" / "0.png", tmp_path)
    prompt = summary["prompt"]
    assert prompt.startswith("<|im_start|>") and prompt.rstrip().endswith("<|im_start|>assistant")
    assert "<|im_start|>user\n<image>" in prompt and "What is in the image?<|im_end|>" in prompt
    inputs = got["inputs"]
    assert inputs["image_grid_hw"].shape[0] == 1
    image_token_id = json.loads((stage1.merged / "config.json").read_text())["image_token_id"]
    assert int((inputs["input_ids"] == image_token_id).sum()) == int(inputs["image_grid_hw"].prod(-1).sum())
    unmerged, heads = load_trainable(stage1.ckpt)
    assert heads  # the distillation heads are in the checkpoint, not in the merged model
    assert_same_as_unmerged(unmerged, inputs, got["logits"], got["tokens"], stage1.merged)


# ---------------------------------------------------------------------------------------------------- stage 2
@pytest.fixture(scope="module")
def stage2(stage1):
    proc, outs, log = stage1.stage2
    rc = proc.wait(timeout=600)
    assert rc == 0, f"stage-2 training failed:\n{log.read_text()[-8000:]}"
    return outs


def test_stage2_lora_merges_into_the_vora_base(world, stage1, stage2, tmp_path, capsys):
    ckpt = stage2["lora"] / "checkpoint-2"
    run = json.loads((ckpt / "vora_run.json").read_text())
    assert run["base_llm"] == str(stage1.merged) and run["stage"] == 2 and run["trainable"]["llm"] == "lora"
    merged = tmp_path / "merged2"
    summary, log = cli_merge(ckpt, merged, capsys)
    assert summary["base_kind"] == "vora" and summary["patch_embedding"] == "checkpoint"
    assert summary["lora_weights"] == 7 * 3
    assert_valid_vora_dir(merged)
    provenance = json.loads((merged / "vora_run.json").read_text())
    assert provenance["stage"] == 2 and provenance["base_run"]["stage"] == 1  # how the base was made, kept

    # weights: the new LoRA folded into the base's language_model.* (blocks 0-2 only); the trained patch embedding
    got, base = read_weights(merged), read_weights(stage1.merged)
    assert set(got) == set(base)
    changed = {k for k in base if not torch.equal(got[k], base[k])}
    lm_changed = {k for k in changed if k.startswith("language_model.")}
    assert {k.split(".layers.")[1].split(".")[0] for k in lm_changed} == {"0", "1", "2"}
    assert all(k.rsplit(".", 2)[-2] in ADAPTED for k in lm_changed) and len(lm_changed) == 7 * 3
    trained = load_file(str(ckpt / "vora_trainable.safetensors"))
    assert {k for k in changed if k.startswith("vision_embed.")}
    assert all(torch.equal(got[k], trained[k]) for k in trained)

    # the merged model computes what the unmerged checkpoint computes (base = the stage-1 merged model)
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    unmerged, _ = load_trainable(ckpt)
    batch = image_batch(model)
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits[valid], unmerged(**batch).logits[valid], atol=1e-4, rtol=1e-5)
    kw = dict(max_new_tokens=N_NEW, do_sample=False, generation_config=model.generation_config)
    assert model.generate(**batch, **kw).tolist() == unmerged.generate(**batch, **kw).tolist()

    # merged again: a stage-3 base works the same way (a VoRA base whose index is sharded)
    assert summary["shards"] == 1
    again, _ = cli_merge(ckpt, tmp_path / "merged2b", capsys, "--max-shard-size", "100KB")
    assert again["shards"] > 1
    assert all(torch.equal(v, got[k]) for k, v in read_weights(tmp_path / "merged2b").items())


def test_stage2_untrained_patch_embedding_is_the_base_s(world, stage1, stage2, tmp_path, capsys):
    """A run that froze the patch embedding (trainable.patch_embed: false), or a checkpoint without one: the merged
    model keeps the VoRA base's patch embedding, bit for bit; load_trainable does the same."""
    base = read_weights(stage1.merged)
    for variant in ("frozen_flag", "no_tensors"):
        ckpt = tmp_path / variant
        shutil.copytree(stage2["lora"] / "checkpoint-2", ckpt)
        if variant == "frozen_flag":
            run = json.loads((ckpt / "vora_run.json").read_text())
            run["trainable"]["patch_embed"] = False
            (ckpt / "vora_run.json").write_text(json.dumps(run))
        else:
            path = ckpt / "vora_trainable.safetensors"
            save_file({k: v for k, v in load_file(str(path)).items() if not k.startswith("vision_embed.")}, str(path))
        summary, _ = cli_merge(ckpt, tmp_path / f"m_{variant}", capsys)
        assert summary["patch_embedding"] == "base"
        got = read_weights(tmp_path / f"m_{variant}")
        vision = [k for k in got if k.startswith("vision_embed.")]
        assert vision and all(torch.equal(got[k], base[k]) for k in vision)
        unmerged, _ = load_trainable(ckpt)
        for k, v in unmerged.vision_embed.state_dict().items():
            assert torch.equal(v, base["vision_embed." + k])


def test_stage2_frozen_llm_only_replaces_the_patch_embedding(world, stage1, stage2, tmp_path, capsys):
    ckpt = stage2["frozen"] / "checkpoint-2"
    assert not (ckpt / "adapter_model.safetensors").exists() and not (ckpt / "adapter_config.json").exists()
    merged = tmp_path / "merged_frozen"
    summary, log = cli_merge(ckpt, merged, capsys)
    assert "no LoRA adapter" in log and "only the patch embedding is replaced" in log
    assert summary["lora_weights"] == 0 and summary["patch_embedding"] == "checkpoint"
    assert_valid_vora_dir(merged)
    got, base = read_weights(merged), read_weights(stage1.merged)
    assert set(got) == set(base)
    trained = load_file(str(ckpt / "vora_trainable.safetensors"))
    for k, v in got.items():
        if k.startswith("language_model."):
            assert torch.equal(v, base[k]), k  # the LLM is the base's, bit for bit
        else:
            assert torch.equal(v, trained[k]), k
    assert any(not torch.equal(got[k], base[k]) for k in trained)  # the patch embedding did train

    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    unmerged, _ = load_trainable(ckpt)
    batch = image_batch(model, seed=1)
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits[valid], unmerged(**batch).logits[valid], atol=1e-5, rtol=1e-5)


def test_stage2_full_finetune_is_standalone_and_not_merged(world, stage1, stage2, tmp_path):
    final = stage2["full"] / "final"
    assert (final / "model.safetensors").is_file() and not (final / "adapter_model.safetensors").exists()
    assert_valid_vora_dir(final)
    assert (stage2["full"] / "checkpoint-1" / "modeling_vora.py").is_file()  # every full checkpoint is standalone
    with pytest.raises(SystemExit, match="full model .* needs no merge"):
        merge_mod.main([str(final), "--output", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()

    trained, base = read_weights(final), read_weights(stage1.merged)
    assert set(trained) == set(base)
    assert {k.split(".")[0] for k in base if not torch.equal(trained[k], base[k])} == {"language_model", "vision_embed"}

    summary, got = serve_fresh(final, world / "img" / "2.png", tmp_path / "fresh")
    reference, _ = load_trainable(final)  # a full model is loaded as it is
    assert_same_as_unmerged(reference, got["inputs"], got["logits"], got["tokens"], final)


def test_merge_refuses_a_base_of_the_wrong_stage(world, stage1, stage2, tmp_path):
    from merge_tools.merge import MergeError, merge

    with pytest.raises(MergeError, match="stage-2 run .* is a text LLM"):
        merge(stage2["lora"] / "checkpoint-2", tmp_path / "a", base=str(world / "llm"), log=lambda m: None)
    with pytest.raises(MergeError, match="stage-1 run .* is a merged VoRA model"):
        merge(stage1.ckpt, tmp_path / "b", base=str(stage1.merged), log=lambda m: None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
