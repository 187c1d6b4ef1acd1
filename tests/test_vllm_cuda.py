"""vLLM serves a merged VoRA model exactly like transformers, image mask included (CUDA + vLLM only; skips
elsewhere). One prompt with two images of 4x4 and 6x5 patches:

- float32: vLLM's prompt log-probs equal transformers' (|Δ| ≤ 2e-3 nats) and greedy tokens are identical;
- the same conversation sent as an OpenAI chat request (`LLM.chat`, data-URL images between text parts) gets the
  same prompt ids and greedy tokens as the processor's prompt;
- bfloat16: mean |Δ log-prob| ≤ 0.05 nats and ≤ 10 % of what serving causally changes; greedy tokens identical up
  to a step where transformers' top-2 logit margin is below 0.25 (a bf16 near-tie: logits here are ~10 in
  size, bf16 keeps ~3 significant digits);
- the same weights served causally (attention_mode: causal, is_mm_prefix_lm: false) differ — so the test can fail;
- a bidirectional model whose config.json lacks the flag is refused at model init with the image-mask message.

Each engine runs in its own process (one vLLM engine per process; results come back as JSON).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.e2e]
pytest.importorskip("vllm")

from tests.helpers_data import make_image  # noqa: E402
from tests.vora_world import build_world  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAX_NEW = 8

ENGINE = r"""
import base64, json, sys
from PIL import Image
from vllm import LLM, SamplingParams

model_dir, dtype, prompt, images, out = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5]
parts = json.loads(sys.argv[6])
llm = LLM(model=model_dir, dtype=dtype, max_model_len=512, gpu_memory_utilization=0.25, enforce_eager=True,
          seed=0, limit_mm_per_prompt={"image": 2}, max_num_seqs=4)
params = SamplingParams(max_tokens=%d, temperature=0.0, prompt_logprobs=0)
[res] = llm.generate({"prompt": prompt, "multi_modal_data": {"image": [Image.open(p) for p in images]}}, params)
ids = res.prompt_token_ids
lps = [None] + [res.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]
# the same conversation as an OpenAI chat request (data-URL images between text parts), as `vllm serve` gets it
url = lambda p: "data:image/png;base64," + base64.b64encode(open(p, "rb").read()).decode()
chat = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url(images[v])}} if kind == "image"
                                     else {"type": "text", "text": v} for kind, v in parts]}]
[c] = llm.chat(chat, SamplingParams(max_tokens=%d, temperature=0.0), use_tqdm=False)
json.dump({"prompt_ids": ids, "prompt_logprobs": lps, "tokens": list(res.outputs[0].token_ids),
           "chat_prompt_ids": list(c.prompt_token_ids), "chat_tokens": list(c.outputs[0].token_ids)}, open(out, "w"))
""" % (MAX_NEW, MAX_NEW)
# the test prompt: text and two images interleaved
PARTS = [("text", "Look:"), ("image", 0), ("text", "and"), ("image", 1), ("text", "What is in the picture?")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_cuda")
    # hidden 256 / 4 heads: head size 64 (vLLM's Triton attention needs >= 32)
    world = build_world(root / "world", hidden=256, max_shard_size="5GB")
    images = [make_image(16, 16, seed=1), make_image(24, 20, seed=2)]  # 4x4 and 6x5 patches (patch 4)
    paths = []
    for k, img in enumerate(images):
        paths.append(str(root / f"img{k}.png"))
        img.save(paths[-1])
    from vora.model.processing_vora import VoRAProcessor

    proc = VoRAProcessor.from_pretrained(str(world.merged_dir))
    conv = [{"role": "user", "content": [{"type": "image", "image": images[v]} if kind == "image"
                                         else {"type": "text", "text": v} for kind, v in PARTS]}]
    prompt = proc.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    return world, root, images, paths, prompt, proc


def variant(world, root, name, **config_changes) -> Path:
    """A copy of the merged directory with config.json fields changed (same weights)."""
    path = root / name
    if not path.exists():
        shutil.copytree(world.merged_dir, path)
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(config_changes)
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def run_vllm(model_dir, dtype, prompt, paths, out):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    argv = [str(model_dir), dtype, prompt, json.dumps(paths), str(out), json.dumps(PARTS)]
    proc = subprocess.run([sys.executable, "-c", ENGINE, *argv], env=env, capture_output=True, text=True, timeout=600)
    return proc, (json.loads(Path(out).read_text()) if proc.returncode == 0 else None)


def reference(world, proc, prompt, images, dtype):
    """transformers: prompt log-probs (None at position 0), greedy tokens and per-step top-2 margins."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(world.merged_dir, dtype=dtype, attn_implementation="sdpa")
    model = model.cuda().eval()
    inputs = proc(text=prompt, images=images, add_special_tokens=False, return_tensors="pt")
    inputs = {k: v.cuda() for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        logits = model(**inputs).logits.float()[0]
        ids = inputs["input_ids"][0]
        lps = torch.log_softmax(logits[:-1], -1).gather(1, ids[1:, None])[:, 0]
        gen = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    margins = [float(s[0].float().topk(2).values.diff().abs()) for s in gen.scores]
    return ids.tolist(), [None] + lps.tolist(), gen.sequences[0, ids.numel():].tolist(), margins


def until_eos(tokens, model_dir):
    """Tokens up to and including the first end-of-sequence token (both engines stop there)."""
    from transformers import GenerationConfig

    eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    k = next((i for i, t in enumerate(tokens) if t in eos), None)
    return tokens if k is None else tokens[: k + 1]


def text_positions_after_first_image(ids, image_token_id):
    first = ids.index(image_token_id)
    return [i for i in range(first + 1, len(ids)) if ids[i] != image_token_id]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_vllm_matches_transformers_and_keeps_the_image_mask(setup, tmp_path, dtype):
    world, root, images, paths, prompt, proc = setup
    ids, want_lp, want_tokens, margins = reference(world, proc, prompt, images, getattr(torch, dtype))
    assert ids.count(world.image_token_id) == 4 * 4 + 6 * 5

    p, got = run_vllm(world.merged_dir, dtype, prompt, paths, tmp_path / "vllm.json")
    assert got is not None, p.stderr[-4000:]
    assert got["prompt_ids"] == ids  # vLLM's placeholder expansion = VoRAProcessor's
    # an OpenAI chat request with the same parts renders the same prompt (images kept between the text) and answers
    # the same
    assert got["chat_prompt_ids"] == ids and got["chat_tokens"] == got["tokens"]
    causal_dir = variant(world, root, "causal", attention_mode="causal", is_mm_prefix_lm=False)
    p, causal = run_vllm(causal_dir, dtype, prompt, paths, tmp_path / "causal.json")
    assert causal is not None, p.stderr[-4000:]

    got["tokens"], want_tokens = until_eos(got["tokens"], world.merged_dir), until_eos(want_tokens, world.merged_dir)
    pos = text_positions_after_first_image(ids, world.image_token_id)
    err = torch.tensor([got["prompt_logprobs"][i] - want_lp[i] for i in pos]).abs()
    mask_effect = torch.tensor([causal["prompt_logprobs"][i] - want_lp[i] for i in pos]).abs()
    assert mask_effect.mean() > 0.05, "serving causally should change the log-probs (is the mask tested at all?)"
    if dtype == "float32":
        assert err.max() <= 2e-3, (float(err.max()), float(mask_effect.mean()))
        assert got["tokens"] == want_tokens
    else:
        assert err.mean() <= 0.05 and err.mean() <= 0.1 * mask_effect.mean(), (float(err.mean()),
                                                                               float(mask_effect.mean()))
        k = next((i for i, (a, b) in enumerate(zip(got["tokens"], want_tokens)) if a != b), None)
        assert k is None or margins[k] < 0.25, (k, got["tokens"], want_tokens, margins)


def test_vllm_refuses_a_bidirectional_model_without_the_flag(setup, tmp_path):
    world, root, images, paths, prompt, _ = setup
    no_flag = variant(world, root, "no_flag", is_mm_prefix_lm=False)
    p, got = run_vllm(no_flag, "bfloat16", prompt, paths, tmp_path / "x.json")
    assert got is None and "ImageMaskError" in p.stderr and "is_mm_prefix_lm: true" in p.stderr, p.stderr[-4000:]
