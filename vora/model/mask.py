"""VoRA's attention pattern, expressed through transformers' own mask machinery.

Causal for text, bidirectional among the tokens of one image, never across images, packed samples or
padding. We compute per-token ids (which image, which packed segment) with vectorised tensor ops and hand
them to `transformers.masking_utils.create_causal_mask`, which turns them into what eager (float mask) and
sdpa (bool mask) want. For flex_attention we build the `BlockMask` ourselves at block granularity
(`flex_block_mask`): no [L, L] tensor, no compiled mask builder.

Kernels that cannot take an arbitrary mask (flash_attention_2/3/4, hub kernels, paged variants) are refused
(`check_attn_implementation`): transformers silently drops the mask for them and images would be attended
causally.

Copied into merged checkpoints (trust_remote_code): imports only torch and transformers.
"""

import inspect

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

# transformers 5.24 renamed the KV-cache argument `past_key_values` to `cache` (models, generate, masking_utils).
# Older 5.x releases stay in use where serving engines pin them (vLLM 0.33: transformers < 5.21), and a merged
# checkpoint must load there too: this is the one place that knows both names (modeling_vora.py imports it).
CACHE_KWARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"

# Attention implementations whose transformers mask interface honours a mask function, so they can express
# "bidirectional inside each image, causal elsewhere, nothing across packed samples or padding".
# flash_attention_2/3/4 get only a padding mask (or None), hub kernels and paged variants get None.
MASK_HONOURING_ATTENTION = ("flex_attention", "sdpa", "eager")

# flex_attention's tile (torch's default sparse block size): the granularity of `flex_block_mask`, and the
# multiple the collator pads rows to so that compiled kernels see few distinct shapes.
FLEX_BLOCK_SIZE = 128


def attn_implementation_problem(impl: str | None) -> str | None:
    """Why `impl` cannot express VoRA's mask (one line, with the fix), or None when it can. None as `impl`
    means transformers' default, sdpa."""
    if impl is None or impl in MASK_HONOURING_ATTENTION:
        return None
    return (
        f"{impl!r} cannot express VoRA's attention mask (bidirectional inside each image, nothing across packed "
        "samples): transformers drops the mask for it and images would be attended causally; use 'flex_attention' "
        "(the fast path on CUDA), 'sdpa' or 'eager'"
    )


def check_attn_implementation(impl, setting: str = "attn_implementation") -> None:
    """Raise a one-line ValueError naming `setting` when `impl` (a string, None, or a `{sub_config: impl}` dict
    as transformers accepts) cannot express VoRA's mask. Called wherever the mask is needed."""
    if isinstance(impl, dict):
        for key, value in impl.items():
            check_attn_implementation(value, f"{setting}[{key!r}]" if key else setting)
        return
    problem = attn_implementation_problem(impl)
    if problem:
        raise ValueError(f"{setting}: {problem}")


def image_block_ids(input_ids: torch.Tensor, image_token_id: int, image_grid_hw: torch.Tensor) -> torch.Tensor:
    """Per token: index of the image it belongs to, -1 for text. Shape of `input_ids`.

    Tokens are assigned by rank: the k-th image token of the flattened batch belongs to image j with
    cumsum(n)[j-1] <= k < cumsum(n)[j]. Deriving blocks from image sizes (not from contiguous runs) keeps
    two touching images apart. No host sync, no Python loop over tokens.
    """
    is_image = (input_ids == image_token_id).reshape(-1)
    rank = is_image.long().cumsum(0) - 1
    sizes = image_grid_hw[:, 0].long() * image_grid_hw[:, 1].long()
    ends = sizes.cumsum(0).to(input_ids.device)
    index = torch.searchsorted(ends, rank, right=True)
    return torch.where(is_image, index, torch.full_like(index, -1)).view_as(input_ids)


def segment_mask_function(segment_ids: torch.Tensor):
    """and-mask keeping packed samples apart: segment ids come from the 2-D attention mask (1, 2, … per
    packed sample, 0 for padding)."""

    def inner(batch_idx, head_idx, q_idx, kv_idx):
        return segment_ids[batch_idx, q_idx] == segment_ids[batch_idx, kv_idx]

    return inner


def flex_block_mask(segment_ids: torch.Tensor, block_ids: torch.Tensor | None, block_size: int = FLEX_BLOCK_SIZE):
    """VoRA's mask as a flex_attention `BlockMask`, built from per-token ids without any [L, L] tensor.

    `segment_ids` [B, L]: 0 = padding, else the packed sample (all 1 unless packed). `block_ids` [B, L]: image
    index or -1 (None: no bidirectional images). Token q sees token k iff both are in the same segment (k not
    padding) and k <= q or both are tokens of the same image.

    Per tile of `block_size` × `block_size` tokens we only need each tile's min/max segment and image ids:
    a tile is *full* (the kernel skips the mask function) when both sides are one segment without padding and
    either every key precedes every query or both sides are one and the same image; it is *partial* (the mask
    function decides per token) when the two sides can share a segment and a pair can be allowed (keys not all
    after the queries, or a shared image); otherwise it is skipped. Full tiles are provably all-allowed and
    skipped tiles provably empty, so the result equals the token-level definition exactly.
    Cost: O(B·L) for the ids plus O(B·(L/block_size)²) for the tiles; no host sync.
    """
    from torch.nn.attention.flex_attention import BlockMask

    B, L = segment_ids.shape
    device = segment_ids.device
    n = (L + block_size - 1) // block_size
    pad = n * block_size - L
    # Padded to whole tiles (segment 0, no image): the kernel may read ids past L in the last tile.
    seg = torch.nn.functional.pad(segment_ids.long(), (0, pad), value=0)
    if block_ids is None:
        img = torch.full_like(seg, -1)
    else:
        img = torch.nn.functional.pad(block_ids.long(), (0, pad), value=-1)

    big = torch.iinfo(torch.long).max
    seg_t, img_t = seg.view(B, n, block_size), img.view(B, n, block_size)
    real = seg_t > 0
    s_min = torch.where(real, seg_t, big).amin(-1)  # [B, n]; tiles of padding only: min > max
    s_max = torch.where(real, seg_t, -1).amax(-1)
    is_img = img_t >= 0
    i_min = torch.where(is_img, img_t, big).amin(-1)
    i_max = torch.where(is_img, img_t, -1).amax(-1)
    one_segment = real.all(-1) & (s_min == s_max)  # no padding, one sample (the last tile holds padding if L % b)
    one_image = is_img.all(-1) & (i_min == i_max)

    q, k = (slice(None), slice(None), None), (slice(None), None, slice(None))  # [B, n_q, 1] vs [B, 1, n_kv]
    tile = torch.arange(n, device=device)
    keys_before = tile[None, None, :] < tile[None, :, None]  # every key of the tile precedes every query
    keys_not_after = tile[None, None, :] <= tile[None, :, None]
    share_segment = (s_min[q] <= s_max[k]) & (s_min[k] <= s_max[q])
    share_image = (i_min[q] <= i_max[k]) & (i_min[k] <= i_max[q])
    same_segment = one_segment[q] & one_segment[k] & (s_min[q] == s_min[k])
    same_image = one_image[q] & one_image[k] & (i_min[q] == i_min[k])
    full = same_segment & (keys_before | same_image)
    partial = share_segment & (keys_not_after | share_image) & ~full

    def ordered(tiles):  # dense [B, n, n] tile flags → (count, column indices, listed first) per query tile
        tiles = tiles.to(torch.int32)[:, None]  # one head: the mask is the same for every head
        order = torch.argsort(tiles, dim=-1, descending=True, stable=True)
        return tiles.sum(-1, dtype=torch.int32), order.to(torch.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        same_sample = (seg[b, q_idx] == seg[b, kv_idx]) & (seg[b, kv_idx] > 0)
        same_img = (img[b, q_idx] == img[b, kv_idx]) & (img[b, q_idx] >= 0)
        return same_sample & ((kv_idx <= q_idx) | same_img)

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=mask_mod,
                                    seq_lengths=(L, L))


def _is_prepared(mask) -> bool:
    """A mask the kernel will apply: a 4-D tensor or a BlockMask (not None, not the 2-D padding mask)."""
    if type(mask).__name__ == "BlockMask":
        return True
    return isinstance(mask, torch.Tensor) and mask.dim() == 4


def build_attention_masks(
    text_config,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache,
    position_ids: torch.Tensor | None,
    block_ids: torch.Tensor | None,
    packed: bool,
):
    """The prepared mask (or `{layer_type: mask}` mapping) that transformers decoders accept as
    `attention_mask`.

    `block_ids` (per-token image index or -1) makes each image bidirectional; `packed` adds the
    segment and-mask read from `attention_mask`'s values. Raises for a kernel that would drop the mask.
    """
    impl = text_config._attn_implementation
    check_attn_implementation(impl)
    if packed and attention_mask is None:
        raise ValueError("packed batches need the 2-D attention_mask that carries segment ids")
    kwargs = dict(
        config=text_config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        block_sequence_ids=block_ids,
        and_mask_function=segment_mask_function(attention_mask) if packed else None,
        **{CACHE_KWARG: cache},
    )
    layer_types = set(getattr(text_config, "layer_types", None) or ["full_attention"])
    masks = {}
    if "full_attention" in layer_types:
        if impl == "flex_attention" and cache is None:
            # Training / no-cache forward: our BlockMask (no dense mask, no compiled mask builder). With a cache
            # (generation) transformers sizes the mask against it.
            device = inputs_embeds.device
            seg = attention_mask
            if seg is None:  # no padding, one sample per row
                seg = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=device)
            masks["full_attention"] = flex_block_mask(seg.to(device), block_ids)
        else:
            masks["full_attention"] = create_causal_mask(**kwargs)
    if "sliding_attention" in layer_types:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
    unknown = layer_types - set(masks)
    if unknown:
        raise ValueError(f"VoRA does not know how to mask layer types {sorted(unknown)} of {text_config.model_type}")
    for layer_type, mask in masks.items():
        if not _is_prepared(mask):  # a mask was asked for: never fall back to plain causal attention silently
            raise RuntimeError(
                f"transformers returned no {layer_type} mask for attn_implementation={impl!r}: VoRA's image / packing "
                "mask would be dropped; use 'flex_attention', 'sdpa' or 'eager'"
            )
    # Decoders with one layer type (Llama) take a prepared 4-D mask / BlockMask as-is; only hybrid
    # ones (sliding + full) take the mapping.
    return masks if len(masks) > 1 else next(iter(masks.values()))
