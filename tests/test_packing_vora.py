"""Packing with images through the VoRA model: per-sample losses of a packed batch equal those unpacked."""

import numpy as np
import pytest
import torch
from transformers import Qwen2Config

from tests.helpers_data import build_processor, make_image
from tests.tiny import per_sample_loss_sums
from vora import VoRAConfig, VoRAForCausalLM
from vora.collator import VoRACollator
from vora.conversation import encode_conversation


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_image_samples_match_unpacked(tmp_path, attn):
    proc = build_processor(tmp_path, "chatml", patch_size=14, min_pixels=14 * 14, max_pixels=56 * 56)
    rng = np.random.default_rng(0)
    samples = []
    for i in range(5):
        n_img = i % 3  # 0, 1 or 2 images per sample
        sizes = [(int(rng.integers(1, 4)) * 14, int(rng.integers(1, 4)) * 14) for _ in range(n_img)]
        images = [make_image(h, w, seed=10 * i + k) for k, (h, w) in enumerate(sizes)]
        user = "<image>" * n_img + " what is here"
        turns = [{"role": "user", "content": user}, {"role": "assistant", "content": "a red fox"}]
        samples.append(encode_conversation(proc, turns, images))
    torch.manual_seed(0)
    text = Qwen2Config(vocab_size=len(proc.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    config = VoRAConfig(text_config=text, image_token_id=proc.image_token_id, patch_size=14, vision_embed_dim=16,
                        position_grid=4)
    config._attn_implementation = attn
    model = VoRAForCausalLM(config).eval()
    model.set_attn_implementation(attn)
    lens = [len(s["input_ids"]) for s in samples]
    col = VoRACollator(proc.pad_token_id, max_length=sum(lens[:3]), packing=True)
    rows = col.pack(lens)
    assert any(len(r) > 1 for r in rows)
    order = [i for r in rows for i in r]
    with torch.no_grad():
        packed = col(samples)
        assert packed["image_grid_hw"].shape[0] == sum(i % 3 for i in range(5))
        got = per_sample_loss_sums(model(**packed).logits, packed["labels"], packed["attention_mask"])
        ref = []
        for i in order:
            single = VoRACollator(proc.pad_token_id)([samples[i]])
            ref.append(per_sample_loss_sums(model(**single).logits, single["labels"], single["attention_mask"]))
        ref = torch.cat(ref)
    assert (ref > 0).all()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
