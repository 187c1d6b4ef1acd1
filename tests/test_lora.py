"""LoRA via peft: exact no-op at init, scale 1, first N blocks only, no biases, clear errors."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.tiny import IMAGE_TOKEN_ID, ROWS, P, make_batch
from vora import VoRAForCausalLM
from vora.lora import add_lora, merge_lora, parameter_groups


def vora(llm_dir):
    torch.manual_seed(0)
    return VoRAForCausalLM.from_llm(llm_dir, image_token_id=IMAGE_TOKEN_ID, patch_size=P, vision_embed_dim=16,
                                    position_grid=4, dtype=torch.float32)


def test_step0_logits_equal_base_llm_on_text(llm_dir):
    base = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32).eval()
    model = vora(llm_dir)
    add_lora(model, num_layers=3, rank=8)
    model.eval()
    ids, mask, _, _ = make_batch([[9], [5]], "left")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   base(input_ids=ids, attention_mask=mask).logits)


def test_lora_layout_scale_and_trainables(llm_dir):
    model = vora(llm_dir)
    base_names = {n for n, _ in model.named_parameters()}
    add_lora(model, num_layers=2, rank=16)
    lora_modules = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    layers = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in lora_modules})
    assert layers == [0, 1]
    assert sorted({n.rsplit(".", 1)[-1] for n in lora_modules}) == sorted(["q_proj", "k_proj", "v_proj", "o_proj",
                                                                           "gate_proj", "up_proj", "down_proj"])
    for m in lora_modules.values():
        assert m.scaling["default"] == 1.0
        assert not any(p.abs().sum() for p in m.lora_B.parameters())  # B = 0: exact no-op
    # no new biases, no trainable base weight
    non_lora = {n.replace("base_model.model.", "",
                          1).replace(".base_layer.", ".") for n, _ in model.named_parameters() if "lora_" not in n}
    assert non_lora == base_names
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n.startswith("vision_embed.") for n in trainable)
    groups = parameter_groups(model)
    assert groups["lora"]["trainable"] == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert groups["patch_embed"]["trainable"] == sum(p.numel() for p in model.vision_embed.parameters())
    assert groups["llm"]["trainable"] == 0


def test_merge_equals_unmerged(llm_dir):
    model = vora(llm_dir)
    add_lora(model, num_layers=2, rank=4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    model.eval()
    batch = make_batch(ROWS, "left")
    kw = dict(input_ids=batch[0], attention_mask=batch[1], pixel_values=batch[2], image_grid_hw=batch[3])
    with torch.no_grad():
        before = model(**kw).logits
        merge_lora(model)
        after = model(**kw).logits
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    assert not any("lora_" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_layers=9, rank=4), "beyond the LLM depth"),
    (dict(num_layers=2, rank=4, targets=["q_proj", "qkv"]), "unknown target module 'qkv'"),
    (dict(num_layers=2, rank=2048), "lora.rank"),
])
def test_bad_lora_settings(llm_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        add_lora(vora(llm_dir), **kwargs)
