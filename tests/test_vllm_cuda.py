"""vLLM serves a merged VoRA model exactly like transformers, image mask included (CUDA + vLLM only; skips
elsewhere). One prompt with two images of 4x4 and 6x5 patches:

- float32: vLLM's prompt log-probs equal transformers' (|Δ| ≤ 2e-3 nats) and greedy tokens are identical;
- the same conversation sent as an OpenAI chat request (`LLM.chat`, data-URL images between text parts) gets the
  same prompt ids and greedy tokens as the processor's prompt;
- bfloat16: mean |Δ log-prob| ≤ 0.05 nats and ≤ 10 % of what serving causally changes; greedy tokens identical up
  to a step where transformers' top-2 logit margin is below 0.25 (a bf16 near-tie: logits here are ~10 in
  size, bf16 keeps ~3 significant digits);
- the same weights served causally (attention_mode: causal, is_mm_prefix_lm: false) differ — so the test can fail;
- a bidirectional model whose config.json lacks the flag is refused at model init with the image-mask message;
- `vllm serve MERGED_DIR` (the OpenAI server) answers a chat request with the two images as data URLs between text
  parts with the processor's prompt and transformers' greedy tokens (float32).

The engine runs and the transformers reference are in tests/vllm_engine.py (shared with the CPU engine test).
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.e2e]
pytest.importorskip("vllm")

from tests.vllm_engine import (  # noqa: E402
    chat_completion,
    reference,
    run_vllm,
    serving_world,
    text_positions_after_first_image,
    until_eos,
    variant,
    vllm_serve,
)

ENGINE = {"gpu_memory_utilization": 0.25, "limit_mm_per_prompt": {"image": 2}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_cuda")
    world, images, paths, prompt, proc = serving_world(root)
    return world, root, images, paths, prompt, proc


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_vllm_matches_transformers_and_keeps_the_image_mask(setup, tmp_path, dtype):
    world, root, images, paths, prompt, proc = setup
    ids, want_lp, want_tokens, margins = reference(world.merged_dir, proc, prompt, images, getattr(torch, dtype),
                                                   "cuda")
    assert ids.count(world.image_token_id) == 4 * 4 + 6 * 5

    log, got = run_vllm(world.merged_dir, dtype, prompt, paths, tmp_path / "vllm.json", engine=ENGINE)
    assert got is not None, log[-4000:]
    assert got["prompt_ids"] == ids  # vLLM's placeholder expansion = VoRAProcessor's
    # an OpenAI chat request with the same parts renders the same prompt (images kept between the text) and answers
    # the same
    assert got["chat_prompt_ids"] == ids and got["chat_tokens"] == got["tokens"]
    causal_dir = variant(world.merged_dir, root, "causal", attention_mode="causal", is_mm_prefix_lm=False)
    log, causal = run_vllm(causal_dir, dtype, prompt, paths, tmp_path / "causal.json", engine=ENGINE)
    assert causal is not None, log[-4000:]

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
    no_flag = variant(world.merged_dir, root, "no_flag", is_mm_prefix_lm=False)
    log, got = run_vllm(no_flag, "bfloat16", prompt, paths, tmp_path / "x.json", engine=ENGINE)
    assert got is None and "ImageMaskError" in log and "is_mm_prefix_lm: true" in log, log[-4000:]


def test_vllm_serve_answers_an_openai_chat_request_with_the_image_mask(setup, tmp_path):
    world, root, images, paths, prompt, proc = setup
    ids, _, want_tokens, _ = reference(world.merged_dir, proc, prompt, images, torch.float32, "cuda")
    args = ("--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--gpu-memory-utilization", "0.25",
            "--limit-mm-per-prompt", '{"image": 2}')
    with vllm_serve(world.merged_dir, tmp_path / "serve.log", *args) as url:
        answer = chat_completion(url, str(world.merged_dir), paths)
    assert answer["prompt_token_ids"] == ids
    got = until_eos(answer["choices"][0]["token_ids"], world.merged_dir)
    assert got == until_eos(want_tokens, world.merged_dir)
