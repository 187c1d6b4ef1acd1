"""Attention kernels and VoRA's image mask.

* No kernel may drop the mask: flash_attention_* (transformers' `flash_attention_mask` ignores mask functions),
  hub kernels and paged variants are refused at recipe validation, at `from_llm` / `from_pretrained` /
  `set_attn_implementation`, in `vora-generate`, and at run time in `build_attention_masks`.
* The flex_attention fast path: our `BlockMask` (`vora.model.mask.flex_block_mask`, built at tile granularity) equals
  the token-loop dense reference of tests/tiny.py, through the real flex kernel too.
"""

import re

import pytest
import torch
from transformers import Qwen2Config
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from tests.helpers_data import MINIMAL_RECIPE as MINIMAL
from tests.helpers_data import write_recipe as write
from tests.tiny import IMAGE_TOKEN_ID, P, build, dense_reference_mask, make_batch, reference_logits
from vora import VoRAForCausalLM
from vora.config import ConfigError, load_recipe
from vora.model.mask import build_attention_masks, image_block_ids

MASK_DROPPING = ["flash_attention_2", "flash_attention_3", "kernels-community/flash-attn2", "paged|sdpa"]
REFUSED = "cannot express VoRA's attention mask"




def one_image_row():
    """The issue's reproduction: text, one 2×2 image, text."""
    ids, attention_mask, _, grid = make_batch([[2, (2, 2), 2]], "right")
    config = Qwen2Config(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    embeds = torch.zeros(*ids.shape, 16)
    return config, embeds, attention_mask, image_block_ids(ids, IMAGE_TOKEN_ID, grid)


# ---------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("impl", MASK_DROPPING)
def test_issue_reproduction_is_refused_at_run_time(impl):
    config, embeds, attention_mask, blocks = one_image_row()
    config._attn_implementation = "sdpa"
    mask = build_attention_masks(config, embeds, attention_mask, None, None, blocks, packed=False)
    assert mask.dtype == torch.bool and mask[0, 0, 2, 5]  # sdpa: the first image token sees the last one
    config._attn_implementation = impl
    with pytest.raises(ValueError, match=f"attn_implementation: '{re.escape(impl)}' {REFUSED}.*use 'flex_attention'"):
        build_attention_masks(config, embeds, attention_mask, None, None, blocks, packed=False)
    # Packing alone (causal images) needs the mask too.
    with pytest.raises(ValueError, match=REFUSED):
        build_attention_masks(config, embeds, attention_mask, None, torch.arange(6)[None], None, packed=True)


def test_a_kernel_whose_mask_interface_returns_nothing_is_an_error(monkeypatch):
    """Second line of defence: even for an allowed name, a missing mask never means 'run causally'."""
    config, embeds, attention_mask, blocks = one_image_row()
    config._attn_implementation = "sdpa"
    monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "sdpa", lambda **kwargs: None)
    with pytest.raises(RuntimeError, match="returned no full_attention mask for attn_implementation='sdpa'"):
        build_attention_masks(config, embeds, attention_mask, None, None, blocks, packed=False)


def test_model_construction_refuses_mask_dropping_kernels(llm_dir, tmp_path):
    kw = dict(image_token_id=IMAGE_TOKEN_ID, patch_size=P, vision_embed_dim=16, position_grid=4)
    with pytest.raises(ValueError, match=f"attn_implementation: 'flash_attention_2' {REFUSED}"):
        VoRAForCausalLM.from_llm(llm_dir, attn_implementation="flash_attention_2", **kw)
    model = VoRAForCausalLM.from_llm(llm_dir, attn_implementation="sdpa", **kw)
    with pytest.raises(ValueError, match=f"'kernels-community/flash-attn2' {REFUSED}"):
        model.set_attn_implementation("kernels-community/flash-attn2")
    assert model.language_model.config._attn_implementation == "sdpa"  # unchanged
    model.save_pretrained(tmp_path / "vora")
    from transformers import AutoModelForCausalLM

    for load in (VoRAForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=f"'flash_attention_2' {REFUSED}"):
            load(tmp_path / "vora", attn_implementation="flash_attention_2")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "vora", attn_implementation="flex_attention")
    assert again.language_model.config._attn_implementation == "flex_attention"


def test_recipe_validation_names_the_key(tmp_path):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError) as e:
        load_recipe(path, ["model.attn_implementation=flash_attention_2"])
    assert f"command line: model.attn_implementation: 'flash_attention_2' {REFUSED}" in str(e.value)
    assert "use 'flex_attention'" in str(e.value)
    with pytest.raises(ConfigError, match=f"x.yaml: model.attn_implementation: 'flash_attention_2' {REFUSED}"):
        load_recipe(write(tmp_path, MINIMAL.replace("llm}", "llm, attn_implementation: flash_attention_2}")))
    # Causal images without packing need no mask beyond padding: allowed. Packing keeps samples apart: refused.
    load_recipe(path, ["model.attn_implementation=flash_attention_2", "model.attention_mode=causal"])
    with pytest.raises(ConfigError, match="model.attn_implementation"):
        load_recipe(path, ["model.attn_implementation=flash_attention_2", "model.attention_mode=causal",
                           "data.packing=true"])


def test_flex_recipes_bucket_rows_to_whole_tiles(tmp_path):
    """With flex_attention, rows are padded to a multiple of 128 (one compiled shape per bucket) unless set."""
    from types import SimpleNamespace

    from vora.build import build_collator

    path = write(tmp_path, MINIMAL)
    flex = load_recipe(path, ["model.attn_implementation=flex_attention", "data.packing=true"])
    assert flex.data.pad_to_multiple_of == 128 and flex.to_dict()["data"]["pad_to_multiple_of"] == 128
    collator = build_collator(flex, SimpleNamespace(pad_token_id=0, patch_size=14, image_token_id=1))
    assert collator.pad_to_multiple_of == 128 and collator.packing
    batch = collator([{"input_ids": torch.arange(3, 203), "labels": torch.arange(3, 203)}])
    assert batch["input_ids"].shape == (1, 256)
    assert load_recipe(path, ["model.attn_implementation=sdpa"]).data.pad_to_multiple_of is None
    explicit = load_recipe(path, ["model.attn_implementation=flex_attention", "data.pad_to_multiple_of=64"])
    assert explicit.data.pad_to_multiple_of == 64
    with pytest.raises(ConfigError, match="data.pad_to_multiple_of: expected >= 1"):
        load_recipe(path, ["data.pad_to_multiple_of=0"])


def test_vora_generate_refuses_before_loading(llm_dir, tmp_path):
    from PIL import Image

    from vora.generate import main as generate_main

    model = VoRAForCausalLM.from_llm(llm_dir, image_token_id=IMAGE_TOKEN_ID, patch_size=P, vision_embed_dim=16,
                                     position_grid=4)
    model.save_pretrained(tmp_path / "vora")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    argv = ["--model", str(tmp_path / "vora"), "--image", str(tmp_path / "a.png"), "--prompt", "x",
            "--attn-implementation", "flash_attention_2"]
    with pytest.raises(SystemExit, match=f"vora-generate: error: --attn-implementation: 'flash_attention_2' {REFUSED}"):
        generate_main(argv)


# ---------------------------------------------------------------------------------------------------- flex BlockMask
def dense_from_block_mask(block_mask, L):
    """Token-level [B, 1, L, L] mask that flex applies: full tiles as they are, partial tiles through mask_mod,
    everything else off. Uses only public BlockMask API (to_dense per tile kind) and create_mask."""
    from torch.nn.attention.flex_attention import BlockMask, create_mask

    b = block_mask.BLOCK_SIZE[0]
    partial = BlockMask.from_kv_blocks(block_mask.kv_num_blocks, block_mask.kv_indices, BLOCK_SIZE=b).to_dense()
    full = BlockMask.from_kv_blocks(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, BLOCK_SIZE=b).to_dense()

    def tokens(tiles):
        return tiles.bool().repeat_interleave(b, -2).repeat_interleave(b, -1)[..., :L, :L]

    by_mod = create_mask(block_mask.mask_mod, block_mask.kv_num_blocks.shape[0], 1, L, L, device="cpu")
    return tokens(full) | (tokens(partial) & by_mod), tokens(full), tokens(partial)


CASES = {
    "text_only_right_padding": ([[7], [3]], "right", None),
    "one_image_left_padding": ([[3, (2, 2), 4], [5]], "left", None),
    "two_adjacent_images": ([[3, (2, 2), (1, 3), 4], [2, (1, 1), (3, 1)]], "right", None),
    "two_images_left_padding": ([[2, (2, 3), 2, (1, 1), 1], [6]], "left", None),
    # one row: sample 1 = 9 tokens (text, 2×2 image, text), 2 = 3 (1×2 image, text), 3 = 5 (1×1 image, text), pad 2
    "packed_rows_with_images": ([[2, (2, 2), 3, (1, 2), 1, (1, 1), 4, 2]], "right", [9, 3, 5]),
}


def case_batch(name):
    rows, side, segments = CASES[name]
    ids, attention_mask, pixels, grid = make_batch(rows, side)
    if segments:
        seg = torch.cat([torch.full((n,), s + 1) for s, n in enumerate(segments)])
        attention_mask = torch.nn.functional.pad(seg, (0, ids.shape[1] - len(seg)))[None]
    return ids, attention_mask, pixels, grid


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("block_size", [1, 3, 4, 8, 128])
def test_flex_block_mask_equals_dense_reference(name, block_size):
    from vora.model.mask import flex_block_mask

    ids, attention_mask, _, grid = case_batch(name)
    want = dense_reference_mask(ids, attention_mask, grid)
    block_mask = flex_block_mask(attention_mask, image_block_ids(ids, IMAGE_TOKEN_ID, grid), block_size=block_size)
    got, full, partial = dense_from_block_mask(block_mask, ids.shape[1])
    assert torch.equal(got, want)
    assert not (full & ~want).any()  # full tiles skip mask_mod: they must be all-allowed
    assert not (want & ~(full | partial)).any()  # skipped tiles must be empty
    if block_size == 1 and name == "text_only_right_padding":
        assert full.any() and (~(full | partial)).any()  # tiles are really classified, not all partial


def test_flex_block_mask_through_the_flex_kernel():
    """The real flex_attention (eager) with our BlockMask equals sdpa with the dense reference mask."""
    from torch.nn.attention.flex_attention import flex_attention

    from vora.model.mask import flex_block_mask

    ids, attention_mask, _, grid = case_batch("packed_rows_with_images")
    want_mask = dense_reference_mask(ids, attention_mask, grid)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, ids.shape[1], 8, generator=g) for _ in range(3))
    valid = attention_mask[0].bool()
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=want_mask)
    for block_size in (4, 8):  # flex on CPU accepts any tile; several tiles exercise full/partial/skipped
        block_mask = flex_block_mask(attention_mask, image_block_ids(ids, IMAGE_TOKEN_ID, grid), block_size)
        got = flex_attention(q, k, v, block_mask=block_mask)
        torch.testing.assert_close(got[:, :, valid], want[:, :, valid], atol=1e-5, rtol=1e-5)


def test_flex_block_mask_has_no_quadratic_tensor():
    """64 K tokens: a dense bool mask would be 4 GiB; the BlockMask holds (L/128)² tile indices and O(L) ids."""
    from vora.model.mask import flex_block_mask

    L = 1 << 16
    seg = torch.ones(1, L, dtype=torch.long)
    blocks = torch.full((1, L), -1, dtype=torch.long)
    blocks[0, 1000:1576] = 0  # one 24×24 image
    bm = flex_block_mask(seg, blocks)
    n = L // 128
    assert bm.kv_indices.shape == (1, 1, n, n) and bm.seq_lengths == (L, L)
    assert int(bm.full_kv_num_blocks.sum()) > n * (n - 1) // 2 - 2 * n  # below the diagonal: full tiles


def test_flex_model_logits_equal_dense_reference_on_packed_rows(llm_dir):
    """The whole model on flex_attention (compiled by transformers; ~20 s on CPU) equals eager with the dense
    reference mask, on packed samples with images and trailing padding."""
    model = build(llm_dir, "flex_attention")
    assert model.language_model.config._attn_implementation == "flex_attention"
    ids, seg, pixels, grid = case_batch("packed_rows_with_images")
    position_ids = torch.cat([torch.arange(n) for n in CASES["packed_rows_with_images"][2]])
    position_ids = torch.nn.functional.pad(position_ids, (0, ids.shape[1] - len(position_ids)))[None]
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=seg, position_ids=position_ids, pixel_values=pixels,
                    image_grid_hw=grid).logits
        want = reference_logits(model, ids, seg, pixels, grid, position_ids=position_ids)
    valid = seg.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-4, rtol=1e-4)
