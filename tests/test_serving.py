"""Serving support that runs without vLLM or a GPU: the config fields vora-merge writes for vLLM (and that the
transformers load is unchanged by them), image token counts (= the processor's placeholder expansion), the
checkpoint's weight names as vLLM's model class splits them, the placeholder-id mapping, the refusal to serve
without the image mask, and the plugin / entry-point wiring. The vLLM run itself is tests/test_vllm_cuda.py."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoProcessor, GenerationConfig

import vora  # noqa: F401  (registers the Auto classes)
from merge_tools.merge import inference_config
from tests.helpers_data import make_image
from tests.vora_world import ROWS, P, build_world, make_batch
from vora import VoRAConfig, VoRAPatchEmbed
from vora.integrations import serving
from vora.integrations.serving import AttentionLayerInfo, ImageMaskError, check_image_mask
from vora.model.image_processing_vora import VoRAImageProcessor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("serve_world"))


# ------------------------------------------------------------------------------------------------
# chat template: content parts in order (what vLLM passes for a chat request with images)
# ------------------------------------------------------------------------------------------------
IMG = {"type": "image"}  # how vLLM hands an image part to the template (no pixels)
PART_CONVERSATIONS = [
    [{"role": "user", "content": [IMG, {"type": "text", "text": "What is in the image?"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "Look:"}, IMG, {"type": "text", "text": "and"}, IMG,
                                  {"type": "text", "text": " which is red?"}]}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [IMG, IMG, "both?"]},
     {"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
     {"role": "user", "content": [{"type": "text", "text": "and now"}, IMG]}],
    [{"role": "user", "content": [IMG, {"type": "text", "text": "\nalready on a new line"}]}],
]


def with_pixels(conversation, image):
    return [{**m, "content": [{**p, "image": image} if p == IMG else p for p in m["content"]]}
            if isinstance(m["content"], list) else m for m in conversation]


@pytest.mark.parametrize("k", range(len(PART_CONVERSATIONS)))
def test_merged_chat_template_renders_content_parts_like_the_processor(world, k):
    """The merged tokenizer's template, given content parts as vLLM's chat front end passes them, renders exactly
    the prompt VoRAProcessor.apply_chat_template makes (normalize_messages in Python + the LLM's template)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world.merged_dir)
    ours = AutoProcessor.from_pretrained(world.merged_dir)
    conv = PART_CONVERSATIONS[k]
    got = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    want = ours.apply_chat_template(with_pixels(conv, make_image(12, 16, seed=1)), add_generation_prompt=True)
    assert got == want and "<image>" in got


def test_merged_chat_template_is_the_llms_for_strings(world):
    """String content renders as with the base LLM's own template; the prologue is added once; unknown part types
    are refused by name."""
    from transformers import AutoTokenizer

    from vora.model.processing_vora import with_content_parts

    merged, base = AutoTokenizer.from_pretrained(world.merged_dir), AutoTokenizer.from_pretrained(world.tok_dir)
    conv = [{"role": "system", "content": "s"}, {"role": "user", "content": "<image>\nhi"},
            {"role": "assistant", "content": "ok"}]
    for gen in (False, True):
        assert (merged.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
                == base.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen))
    assert merged.chat_template != base.chat_template
    assert with_content_parts(merged.chat_template) == merged.chat_template
    with pytest.raises(Exception, match="unsupported content part type audio"):
        merged.apply_chat_template([{"role": "user", "content": [{"type": "audio"}]}], tokenize=False)


# ------------------------------------------------------------------------------------------------
# config.json
# ------------------------------------------------------------------------------------------------
REMOTE = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
batch = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(**batch).logits
out = model.generate(**batch, max_new_tokens=5, do_sample=False, generation_config=model.generation_config)
torch.save({"logits": logits, "tokens": out, "flag": model.config.is_mm_prefix_lm}, sys.argv[3])
"""


@pytest.mark.e2e
def test_merged_config_has_vllm_fields_and_transformers_load_is_unchanged(world, tmp_path):
    cfg = json.loads((world.merged_dir / "config.json").read_text())
    assert cfg["is_mm_prefix_lm"] is True
    assert cfg["architectures"] == ["VoRAForCausalLM"]
    assert "is_mm_prefix_lm" not in cfg["text_config"]  # the vLLM model class sets it on the LLM at init
    # The transformers load users run without the vora package (remote code, as lmms-eval's built-in model and the
    # demo do) still loads and gives the in-memory merge's logits and greedy tokens.
    batch = make_batch(ROWS, "left", world.image_token_id, world.vocab)
    torch.save(batch, tmp_path / "batch.pt")
    subprocess.run([sys.executable, "-c", REMOTE, str(world.merged_dir), str(tmp_path / "batch.pt"),
                    str(tmp_path / "out.pt")], check=True, cwd=tmp_path)
    got = torch.load(tmp_path / "out.pt")
    assert got["flag"] is True
    want = world.reference_merged()
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(got["logits"][valid], want(**batch).logits[valid], atol=1e-4, rtol=1e-5)
    kw = dict(max_new_tokens=5, do_sample=False, generation_config=GenerationConfig.from_pretrained(world.merged_dir))
    assert torch.equal(got["tokens"], want.generate(**batch, **kw))


def test_causal_models_do_not_ask_for_the_image_mask(world):
    causal = VoRAConfig.from_pretrained(world.merged_dir, attention_mode="causal")
    assert serving.vllm_config_fields(causal)["is_mm_prefix_lm"] is False
    assert inference_config(causal).is_mm_prefix_lm is False
    assert inference_config(VoRAConfig.from_pretrained(world.merged_dir)).is_mm_prefix_lm is True


def test_text_architectures(world):
    config = VoRAConfig.from_pretrained(world.merged_dir)
    assert serving.text_architectures(config.text_config) == ["Qwen2ForCausalLM"]
    config.text_config.architectures = None
    assert serving.text_architectures(config.text_config) == ["Qwen2ForCausalLM"]  # from the model type


# ------------------------------------------------------------------------------------------------
# images → tokens
# ------------------------------------------------------------------------------------------------
SIZES = [(12, 16), (20, 8), (3, 3), (31, 33), (200, 40), (40, 300), (64, 64), (7, 90)]


def test_token_counts_equal_the_processors_placeholder_expansion(world):
    config = VoRAConfig.from_pretrained(world.merged_dir)
    pre = json.loads((world.merged_dir / "preprocessor_config.json").read_text())
    ip = serving.image_processor_for(config, pre)
    fallback = serving.image_processor_for(config, None)  # no preprocessor_config.json: the sizes in config.json
    sizes = lambda x: (x.patch_size, x.min_pixels, x.max_pixels)  # noqa: E731
    assert sizes(ip) == sizes(fallback)
    with pytest.raises(ValueError, match="patch_size=14 but config.json has patch_size=4"):
        serving.image_processor_for(config, {**pre, "patch_size": 14})
    proc = AutoProcessor.from_pretrained(world.merged_dir)
    for k, (h, w) in enumerate(SIZES):
        img = make_image(h, w, seed=k)
        out = proc(text="a <image> b", images=[img])
        n_tokens = int((out["input_ids"] == world.image_token_id).sum())
        assert serving.num_image_tokens(ip, img.width, img.height) == n_tokens, (h, w)
        # the engine's pixels are the processor's pixels
        ours = ip(images=[img], return_tensors="pt")
        assert torch.equal(ours["pixel_values"], out["pixel_values"])
        assert torch.equal(ours["image_grid_hw"], out["image_grid_hw"])


@pytest.mark.parametrize(
    "kwargs,want",
    [
        (dict(patch_size=14), (32, 32)),  # the default 448² → 1024 tokens
        (dict(patch_size=P, min_pixels=4 * P * P, max_pixels=64 * P * P), (8, 8)),  # tests/vora_world.py
        (dict(patch_size=14, min_pixels=14 * 14, max_pixels=7 * 14 * 14), (1, 7)),  # prime budget: a strip
        (dict(patch_size=14, min_pixels=14 * 14, max_pixels=14 * 14 * 10 + 50), (2, 5)),
    ],
)
def test_largest_grid_bounds_every_image(kwargs, want):
    ip = VoRAImageProcessor(**kwargs)
    gh, gw = serving.largest_grid(ip)
    assert (gh, gw) == want
    p = ip.patch_size
    assert ip.get_grid_hw(gh * p, gw * p) == (gh, gw)  # the dummy image vLLM profiles with is kept as is
    g = torch.Generator().manual_seed(0)
    for h, w in torch.randint(1, 60 * p, (300, 2), generator=g).tolist():
        if max(h, w) / min(h, w) <= ip.max_aspect_ratio:
            assert serving.num_image_tokens(ip, w, h) <= gh * gw, (h, w)


# ------------------------------------------------------------------------------------------------
# weights
# ------------------------------------------------------------------------------------------------
def test_weight_names_split_into_the_stock_llm_and_the_patch_embedding(world):
    index = json.loads((world.merged_dir / "model.safetensors.index.json").read_text())
    parts = {"language_model": set(), "vision_embed": set()}
    for name in index["weight_map"]:
        component, inner = serving.split_checkpoint_key(name)
        parts[component].add(inner)
    config = VoRAConfig.from_pretrained(world.merged_dir)
    # vLLM's Qwen2ForCausalLM.load_weights takes the stock transformers names (model.*, lm_head.*)
    with torch.device("meta"):
        stock = AutoModelForCausalLM.from_config(config.text_config)
        patch = VoRAPatchEmbed(config)
    assert parts["language_model"] == set(stock.state_dict())
    assert parts["vision_embed"] == set(dict(patch.named_parameters()))
    serving.check_vision_keys(parts["vision_embed"], set(dict(patch.named_parameters())))
    with pytest.raises(ValueError, match="missing \\['position'\\]"):
        serving.check_vision_keys(parts["vision_embed"] - {"position"}, set(dict(patch.named_parameters())))


def test_training_checkpoint_tensors_are_refused(world):
    for name in load_file(str(world.ckpt_dir / "vora_trainable.safetensors")):
        if name.startswith("distill_heads."):
            with pytest.raises(ValueError, match="run vora-merge"):
                serving.split_checkpoint_key(name)
    adapter = load_file(str(world.ckpt_dir / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="run vora-merge"):
        serving.split_checkpoint_key(next(iter(adapter)))
    with pytest.raises(ValueError, match="not a merged VoRA checkpoint"):
        serving.split_checkpoint_key("model.layers.0.mlp.up_proj.weight")


def test_out_of_vocabulary_image_token_is_looked_up_as_a_valid_id(world):
    config = VoRAConfig.from_pretrained(world.merged_dir)
    emb = torch.nn.Embedding(config.text_config.vocab_size, 4)
    oov = config.text_config.vocab_size + 3  # as when '<image>' was added to the tokenizer only
    ids = torch.tensor([[5, oov, oov, 7]])
    with pytest.raises(IndexError):
        emb(ids)
    safe = serving.safe_input_ids(ids, oov)
    assert safe.tolist() == [[5, 0, 0, 7]]
    torch.testing.assert_close(emb(safe)[0, [0, 3]], emb(torch.tensor([5, 7])))


# ------------------------------------------------------------------------------------------------
# refuse to serve without the image mask
# ------------------------------------------------------------------------------------------------
def layers(uses=True, supports=True, n=2):
    return [AttentionLayerInfo(f"model.layers.{i}.self_attn.attn", "FLASH_ATTN", uses, supports) for i in range(n)]


GOOD = dict(attention_mode="bidirectional", engine_mm_prefix=True, images_enabled=True, chunked_mm_input=False)


def test_image_mask_check_accepts_a_correct_engine():
    check_image_mask(**GOOD, layers=layers())
    check_image_mask(**{**GOOD, "engine_mm_prefix": False, "images_enabled": False}, layers=layers(False, False))
    check_image_mask(**{**GOOD, "attention_mode": "causal", "engine_mm_prefix": False}, layers=layers(False, False))


@pytest.mark.parametrize(
    "change,layer_kw,match",
    [
        (dict(engine_mm_prefix=False), dict(uses=False), "lacks 'is_mm_prefix_lm: true'"),
        (dict(chunked_mm_input=True), {}, "--disable-chunked-mm-input"),
        ({}, dict(supports=False), "2 of 2 attention layers .* ignores the image mask"),
        ({}, dict(uses=False), "built without the image mask"),
        ({}, dict(n=0), "no attention layers"),
        (dict(attention_mode="causal"), {}, "trained with causal attention"),
    ],
)
def test_image_mask_check_refuses_wrong_serving(change, layer_kw, match):
    with pytest.raises(ImageMaskError, match=match):
        check_image_mask(**{**GOOD, **change}, layers=layers(**layer_kw))


def test_image_mask_refusal_names_the_backend_before_the_chunking_flag_and_fits_the_device():
    # vLLM's CPU platform builds every layer with the mask flag on CPU_ATTN, which cannot keep it, and runs chunked
    # prefill: the refusal must say that no flag helps there, not ask for --disable-chunked-mm-input first.
    cpu_layers = [AttentionLayerInfo("model.layers.0.self_attn.attn", "CPU_ATTN", True, False)]
    with pytest.raises(ImageMaskError, match=r"backend CPU_ATTN.*no CPU attention backend.*GPU.*limit-mm-per-prompt"):
        check_image_mask(**{**GOOD, "chunked_mm_input": True}, layers=cpu_layers, device_type="cpu")
    with pytest.raises(ImageMaskError, match=r"backend FLASH_ATTN.*--attention-backend TRITON_ATTN"):
        check_image_mask(**{**GOOD, "chunked_mm_input": True}, layers=layers(supports=False), device_type="cuda")


# ------------------------------------------------------------------------------------------------
# packaging
# ------------------------------------------------------------------------------------------------
def test_entry_points_and_extras_are_declared():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    eps = project["entry-points"]
    assert eps["vllm.general_plugins"] == {"vora": "vora.integrations.vllm_plugin:register"}
    assert eps["lmms_eval.models"] == {"vora": "vora.integrations.lmms_eval_model:manifest"}
    extras = project["optional-dependencies"]
    assert any(d.startswith("vllm") for d in extras["serve"]) and any(d.startswith("lmms-eval") for d in extras["eval"])
    from vora.integrations import vllm_plugin

    module, cls = vllm_plugin.MODEL_CLASS.split(":")
    assert f"class {cls}(" in (ROOT / (module.replace(".", "/") + ".py")).read_text()


@pytest.mark.e2e
def test_vora_imports_without_the_engines():
    code = (
        "import sys, vora, merge_tools.merge, vora.integrations.serving, vora.integrations.vllm_plugin, "
        "examples.demo.export_lmms_task; "
        "bad = [m for m in ('vllm', 'lmms_eval') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
