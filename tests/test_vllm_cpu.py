"""vLLM's own front end on a merged model, without a GPU: the plugin registers the model, vLLM reads the image-mask
flag from config.json, vLLM's multimodal processor (our VoRAMultiModalProcessor) turns a chat prompt with two
images into exactly VoRAProcessor's token ids, pixels, grids and one placeholder range per image, and an OpenAI chat
request with images and text in any order renders VoRAProcessor's prompt. Skips without
vLLM (no CPU wheel on PyPI: README "Serve" says how this was run); the engine run is tests/test_vllm_cuda.py."""

import json
import shutil

import pytest
import torch

vllm = pytest.importorskip("vllm")

from transformers import AutoProcessor  # noqa: E402

from tests.helpers_data import make_image  # noqa: E402
from tests.vora_world import build_world  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # what every vLLM process does first: our entry point registers VoRAForCausalLM
    return build_world(tmp_path_factory.mktemp("vllm_world"))


def model_config(path):
    from vllm.config import ModelConfig

    return ModelConfig(model=str(path), tokenizer=str(path), dtype="float32")


def test_engine_reads_the_image_mask_flag(world, tmp_path):
    mc = model_config(world.merged_dir)
    assert mc.is_multimodal_model and mc.architectures == ["VoRAForCausalLM"]
    assert mc.is_mm_prefix_lm
    causal = tmp_path / "causal"
    shutil.copytree(world.merged_dir, causal)
    cfg = json.loads((causal / "config.json").read_text())
    cfg["is_mm_prefix_lm"] = False
    (causal / "config.json").write_text(json.dumps(cfg))
    assert not model_config(causal).is_mm_prefix_lm


def test_vllm_processor_expands_images_like_vora_processor(world):
    from vllm.multimodal import MULTIMODAL_REGISTRY

    processor = MULTIMODAL_REGISTRY.create_processor(model_config(world.merged_dir))
    ours = AutoProcessor.from_pretrained(world.merged_dir)
    images = [make_image(12, 16, seed=1), make_image(31, 20, seed=2)]  # 3x4 and 8x5 patches after the resize
    conv = [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "compare"},
                                         {"type": "image", "image": images[1]}]}]
    prompt = ours.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    want = ours(text=prompt, images=images, add_special_tokens=False)

    out = processor(prompt, processor.info.parse_mm_data({"image": images}))
    assert out["prompt_token_ids"] == want["input_ids"][0].tolist()
    items = out["mm_kwargs"]["image"]
    grids = torch.stack([item["image_grid_hw"].data for item in items])
    assert torch.equal(grids, want["image_grid_hw"])
    pixels = torch.cat([item["pixel_values"].data for item in items])
    torch.testing.assert_close(pixels, want["pixel_values"], atol=0, rtol=0)
    # one placeholder range per image, exactly on its run of image tokens (vLLM's bidirectional spans)
    ids = want["input_ids"][0]
    img = world.image_token_id
    starts = [i for i in range(len(ids)) if ids[i] == img and (i == 0 or ids[i - 1] != img)]
    ranges = [(p.offset, p.length) for p in out["mm_placeholders"]["image"]]
    assert ranges == [(s, int(g.prod())) for s, g in zip(starts, grids)]
    assert processor.info.get_mm_max_tokens_per_item(4096, {"image": 1}) == {"image": 64}


def data_url(image):
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("order", ["image first", "interleaved"])
def test_openai_chat_request_renders_like_vora_processor(world, order):
    """What `vllm serve` does with an OpenAI chat request whose images are data URLs (vllm/renderers/hf.py::
    HfRenderer.render_messages: parse_chat_messages, then the chat template): the merged template takes content
    parts, vLLM detects that and passes them in order, so the prompt is VoRAProcessor's — with several images and
    text before them too (a string-only template would get every image moved to the front)."""
    from vllm.renderers.chat_utils import parse_chat_messages
    from vllm.renderers.hf import resolve_chat_template_content_format, safe_apply_chat_template
    from vllm.tokenizers.registry import cached_tokenizer_from_config

    mc = model_config(world.merged_dir)
    tokenizer = cached_tokenizer_from_config(mc)
    images = [make_image(12, 16, seed=1), make_image(31, 20, seed=2)]
    if order == "image first":
        images = images[:1]
        parts = [("image", 0), ("text", "What is in the image?")]
    else:
        parts = [("text", "Compare"), ("image", 0), ("text", "with"), ("image", 1), ("text", "- which is larger?")]
    request = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(images[v])}} if kind == "image"
        else {"type": "text", "text": v} for kind, v in parts]}]
    fmt = resolve_chat_template_content_format(None, None, "auto", tokenizer, model_config=mc)
    assert fmt == "openai"
    conversation, mm_data, _ = parse_chat_messages(request, mc, content_format=fmt)
    prompt = safe_apply_chat_template(mc, tokenizer, conversation, tokenize=False, add_generation_prompt=True)

    ours = AutoProcessor.from_pretrained(world.merged_dir)
    local = [{"role": "user", "content": [
        {"type": "image", "image": images[v]} if kind == "image" else {"type": "text", "text": v}
        for kind, v in parts]}]
    want = ours.apply_chat_template(local, tokenize=False, add_generation_prompt=True)
    assert prompt == want and prompt.count("<image>") == len(images)
    assert len(mm_data["image"]) == len(images)
    # and the images reach the multimodal processor in prompt order: same ids and pixels as ours
    from vllm.multimodal import MULTIMODAL_REGISTRY

    processor = MULTIMODAL_REGISTRY.create_processor(mc)
    out = processor(prompt, processor.info.parse_mm_data({"image": mm_data["image"]}))
    ref = ours(text=want, images=images, add_special_tokens=False)
    assert out["prompt_token_ids"] == ref["input_ids"][0].tolist()
    pixels = torch.cat([item["pixel_values"].data for item in out["mm_kwargs"]["image"]])
    torch.testing.assert_close(pixels, ref["pixel_values"], atol=0, rtol=0)
