"""VoRA's attention pattern, expressed through transformers' own mask machinery.

Causal for text, bidirectional among the tokens of one image, never across images, packed samples or
padding. We only compute per-token ids (which image, which packed segment) with vectorised tensor ops
and hand them to `transformers.masking_utils.create_causal_mask`, which turns them into whatever the
attention kernel wants (None / bool tensor for sdpa, float for eager, BlockMask for flex_attention).

Copied into merged checkpoints (trust_remote_code): imports only torch and transformers.
"""

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask


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
    segment and-mask read from `attention_mask`'s values.
    """
    if packed and attention_mask is None:
        raise ValueError("packed batches need the 2-D attention_mask that carries segment ids")
    kwargs = dict(
        config=text_config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        cache=cache,
        position_ids=position_ids,
        block_sequence_ids=block_ids,
        and_mask_function=segment_mask_function(attention_mask) if packed else None,
    )
    layer_types = set(getattr(text_config, "layer_types", None) or ["full_attention"])
    masks = {}
    if "full_attention" in layer_types:
        masks["full_attention"] = create_causal_mask(**kwargs)
    if "sliding_attention" in layer_types:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
    unknown = layer_types - set(masks)
    if unknown:
        raise ValueError(f"VoRA does not know how to mask layer types {sorted(unknown)} of {text_config.model_type}")
    # Decoders with one layer type (Llama) take a prepared 4-D mask / BlockMask as-is; only hybrid
    # ones (sliding + full) take the mapping.
    return masks if len(masks) > 1 else next(iter(masks.values()))
