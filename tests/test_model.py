"""VoRAForCausalLM: image placement, the attention pattern on every kernel, errors."""

import pytest
import torch

from tests.tiny import IMAGE_TOKEN_ID, ROWS, P, build, make_batch, reference_logits
from vora import VoRAConfig, VoRAForCausalLM
from vora.model.mask import image_block_ids


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("attn", ["eager", "sdpa", "flex_attention"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_mask_matches_dense_reference(llm_dirs, arch, attn, padding_side):
    if attn == "flex_attention" and arch == "llama":
        pytest.skip("flex compiles for ~20 s on CPU; one architecture is enough for the kernel")
    model = build(llm_dirs[arch], attn)
    assert model.language_model.config._attn_implementation == attn  # the kernel under test is really used
    batch = make_batch(ROWS, padding_side)
    input_ids, attention_mask, pixel_values, image_grid_hw = batch
    with torch.no_grad():
        got = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                    image_grid_hw=image_grid_hw).logits
        want = reference_logits(model, *batch)
    valid = attention_mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-4, rtol=1e-4)
    # The reference is not vacuous: a purely causal mask gives different logits at image tokens.
    with torch.no_grad():
        causal = reference_logits(model, *batch, bidirectional=False)
    assert (causal[valid] - want[valid]).abs().max() > 1e-3


def test_causal_mode_is_plain_causal(llm_dirs):
    model = build(llm_dirs["qwen2"], "sdpa", mode="causal")
    batch = make_batch(ROWS, "right")
    with torch.no_grad():
        got = model(input_ids=batch[0], attention_mask=batch[1], pixel_values=batch[2], image_grid_hw=batch[3]).logits
        want = reference_logits(model, *batch, bidirectional=False)
    valid = batch[1].bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_rows_match_dense_reference(llm_dirs, attn):
    """Packed samples (segment ids in attention_mask, restarting position ids) never see each other."""
    model = build(llm_dirs["llama"], attn)
    input_ids, _, pixel_values, image_grid_hw = make_batch([[2, (2, 2), 3, (1, 2), (1, 1), 4, 3]], "right")
    # segments: tokens 0..8 sample 1 (text, image 2x2, text), 9..12 sample 2 (image 1x2, image 1x1 ... )
    seg = torch.tensor([[1] * 9 + [2] * 3 + [3] * 7])
    seg[0, -2:] = 0  # trailing padding
    position_ids = torch.cat([torch.arange(9), torch.arange(3), torch.arange(7)]).unsqueeze(0)
    with torch.no_grad():
        got = model(input_ids=input_ids, attention_mask=seg, position_ids=position_ids,
                    pixel_values=pixel_values, image_grid_hw=image_grid_hw).logits
        want = reference_logits(model, input_ids, seg, pixel_values, image_grid_hw, position_ids=position_ids)
    valid = seg.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-4, rtol=1e-4)


def test_image_block_ids_keep_adjacent_images_apart():
    ids = torch.tensor([[5, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 5],
                        [IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 5, 5, 5]])
    grid = torch.tensor([[1, 2], [1, 1], [2, 1]])
    assert image_block_ids(ids, IMAGE_TOKEN_ID, grid).tolist() == [[-1, 0, 0, 1, -1], [2, 2, -1, -1, -1]]


def test_images_land_at_their_placeholders(llm_dirs):
    model = build(llm_dirs["qwen2"])
    input_ids, _, pixel_values, image_grid_hw = make_batch(ROWS, "right")
    embeds, is_image = model.embed_inputs(input_ids, pixel_values, image_grid_hw)
    want = model.vision_embed(pixel_values, image_grid_hw)
    torch.testing.assert_close(embeds[is_image], want)
    text = model.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
    torch.testing.assert_close(embeds[~is_image], text[~is_image])


def test_patch_embedding_equals_conv_on_the_image(llm_dirs):
    """The patchified matmul is the documented Conv2d(k=p, s=p) → RMSNorm → +interpolated grid → Linear."""
    model = build(llm_dirs["qwen2"])
    pe = model.vision_embed
    image = torch.randn(1, 3, 3 * P, 5 * P)
    patches = image.unfold(2, P, P).unfold(3, P, P)  # 1,3,gh,gw,p,p
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * P * P)
    got = pe(patches, torch.tensor([[3, 5]]))
    x = pe.conv(image).flatten(2).transpose(1, 2)[0]
    pos = torch.nn.functional.interpolate(pe.position, size=(3, 5), mode="bicubic", align_corners=False)
    want = pe.proj(pe.norm(x) + pos[0].flatten(1).t())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_placeholder_count_mismatch_is_a_clear_error(llm_dirs):
    model = build(llm_dirs["qwen2"])
    input_ids, attention_mask, pixel_values, image_grid_hw = make_batch(ROWS, "right")
    with pytest.raises(ValueError, match="placeholders and images disagree"):
        # the last image (1x1) is missing from the images while its placeholder is in the text
        model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values[:-1],
              image_grid_hw=image_grid_hw[:-1])
    with pytest.raises(ValueError, match="placeholders and images disagree"):
        model(input_ids=input_ids, attention_mask=attention_mask)


def test_config_roundtrip_and_bad_values(tmp_path, llm_dirs):
    model = build(llm_dirs["llama"])
    model.save_pretrained(tmp_path / "vora")
    again = VoRAForCausalLM.from_pretrained(tmp_path / "vora").eval()
    batch = make_batch(ROWS, "left")
    kw = dict(input_ids=batch[0], attention_mask=batch[1], pixel_values=batch[2], image_grid_hw=batch[3])
    with torch.no_grad():
        torch.testing.assert_close(again(**kw).logits, model(**kw).logits)
    with pytest.raises(ValueError, match="attention_mode"):
        VoRAConfig(text_config=model.config.text_config, attention_mode="full")
