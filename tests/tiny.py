"""The tiny-model kit for model / mask / LoRA / distillation tests: tiny random-init LLMs and ViT teachers saved
with save_pretrained and loaded back with from_pretrained (the path a user's real checkpoint takes), hand-made
batches in the model's contract, and the independent dense reference for VoRA's attention mask. Nothing is
downloaded. The shared directories are session fixtures in tests/conftest.py (`tiny_dirs`)."""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from tests.vora_world import make_batch as make_world_batch
from tests.vora_world import save_llm
from vora import VoRAForCausalLM
from vora.collator import IGNORE_INDEX
from vora.distill import VoRAForTraining
from vora.lora import add_lora
from vora.teacher import Teacher

VOCAB = 96
IMAGE_TOKEN_ID = 100  # beyond the LLM vocabulary on purpose: VoRA must not need an embedding row
P = 2  # patch size of the model tests
TRAINING_P = 4  # patch size of the training-step tests (chunked loss, host syncs)
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # VoRA's image normalisation in the distillation tests
TEACHER_MEAN, TEACHER_STD = (0.45, 0.45, 0.4), (0.27, 0.26, 0.28)  # the teacher's (preprocessor_config.json)


def save_tiny_llm(path, arch="qwen2", seed=0, vocab=VOCAB, **kwargs) -> str:
    return str(save_llm(Path(path), arch, vocab, seed=seed, **kwargs))


def save_teacher(path, kind="clip", image_size=8, patch=2, width=16, layers=3):
    torch.manual_seed(3)
    common = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=2,
                  image_size=image_size, patch_size=patch)
    if kind == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(**common))
    elif kind == "siglip":
        model = SiglipVisionModel(SiglipVisionConfig(**common))
    elif kind == "dinov2":
        model = Dinov2Model(Dinov2Config(**common))
    model.save_pretrained(path)
    with open(f"{path}/preprocessor_config.json", "w") as f:
        json.dump({"image_mean": TEACHER_MEAN, "image_std": TEACHER_STD}, f)
    return str(path)


# ---------------------------------------------------------------- the model tests (patch size P)
ROWS = [
    [3, (2, 2), (1, 3), 4],  # two touching images of different sizes: separate blocks
    [7],  # text only
    [2, (2, 3), 2, (1, 1), 1],  # two images, text between
]


def make_batch(rows, padding_side, seed=0):
    """rows: list of lists of items, each an int (that many text tokens) or (h, w) (an image grid).
    Returns input_ids, attention_mask, pixel_values, image_grid_hw built in the documented contract."""
    b = make_world_batch(rows, padding_side, IMAGE_TOKEN_ID, VOCAB, p=P, seed=seed, low=3)
    return b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_hw"]


def dense_reference_mask(input_ids, attention_mask, image_grid_hw, bidirectional=True):
    """Independent reference: Python loops over tokens, a boolean [B, 1, L, L] mask."""
    B, L = input_ids.shape
    sizes = [int(h * w) for h, w in image_grid_hw.tolist()]
    image_of = [[-1] * L for _ in range(B)]
    j, used = 0, 0
    for b in range(B):
        for t in range(L):
            if int(input_ids[b, t]) == IMAGE_TOKEN_ID:
                image_of[b][t] = j
                used += 1
                if used == sizes[j]:
                    j, used = j + 1, 0
    allowed = torch.zeros(B, 1, L, L, dtype=torch.bool)
    for b in range(B):
        for q in range(L):
            for k in range(L):
                seg_q, seg_k = int(attention_mask[b, q]), int(attention_mask[b, k])
                if seg_q == 0 or seg_k == 0 or seg_q != seg_k:
                    continue
                same_image = bidirectional and image_of[b][q] >= 0 and image_of[b][q] == image_of[b][k]
                allowed[b, 0, q, k] = k <= q or same_image
    return allowed


def reference_logits(model, input_ids, attention_mask, pixel_values, image_grid_hw, position_ids=None,
                     bidirectional=True):
    allowed = dense_reference_mask(input_ids, attention_mask, image_grid_hw, bidirectional)
    embeds, _ = model.embed_inputs(input_ids, pixel_values, image_grid_hw)
    float_mask = torch.zeros(allowed.shape, dtype=embeds.dtype).masked_fill(~allowed, torch.finfo(embeds.dtype).min)
    previous = model.language_model.config._attn_implementation
    model.language_model.set_attn_implementation("eager")
    try:
        out = model.language_model(inputs_embeds=embeds, attention_mask=float_mask, position_ids=position_ids)
    finally:
        model.language_model.set_attn_implementation(previous)
    return out.logits


def build(path, attn="sdpa", mode="bidirectional"):
    torch.manual_seed(1)
    return VoRAForCausalLM.from_llm(
        path, image_token_id=IMAGE_TOKEN_ID, attn_implementation=attn, patch_size=P,
        vision_embed_dim=16, position_grid=4, attention_mode=mode, dtype=torch.float32,
    ).eval()


def per_sample_loss_sums(logits, labels, attention_mask):
    """Sum of next-token CE per (row, segment), ordered by row then segment."""
    lp = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), reduction="none",
                         ignore_index=IGNORE_INDEX).view(labels.shape[0], -1)
    seg = attention_mask[:, 1:]
    out = []
    for r in range(labels.shape[0]):
        for s in range(1, int(attention_mask[r].max()) + 1):
            out.append(lp[r][seg[r] == s].sum())
    return torch.stack(out)


# ---------------------------------------------------------------- training steps (patch size TRAINING_P)
def build_for_training(llm_dir, teacher_dir=None, full_llm=False):
    torch.manual_seed(0)
    vora = VoRAForCausalLM.from_llm(llm_dir, image_token_id=IMAGE_TOKEN_ID, patch_size=TRAINING_P, vision_embed_dim=16,
                                    position_grid=4, dtype=torch.float32)
    if full_llm:
        vora.language_model.requires_grad_(True)
    else:
        add_lora(vora, num_layers=2, rank=4)
        with torch.no_grad():  # B ≠ 0, so LoRA A gets a gradient too
            for n, p in vora.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    teacher = Teacher.from_pretrained(teacher_dir, blocks=[1, 3]) if teacher_dir else None
    pairs = [(1, 1), (2, 3)] if teacher else None
    # A chunk of 5 rows: every batch below spans several chunks and a ragged last one.
    return VoRAForTraining(vora, teacher, pairs, weight=0.7, image_mean=MEAN, image_std=STD, ce_chunk_size=5).train()


def training_sample(items, seed):
    """items: ints (that many text tokens, all labels) and (gh, gw) image grids → one dataset sample."""
    g = torch.Generator().manual_seed(seed)
    ids, labels, pixels, grids = [], [], [], []
    for item in items:
        if isinstance(item, int):
            t = torch.randint(3, VOCAB, (item,), generator=g).tolist()
            ids += t
            labels += t
        else:
            n = item[0] * item[1]
            ids += [IMAGE_TOKEN_ID] * n
            labels += [-100] * n
            pixels.append(torch.randn(n, 3 * TRAINING_P * TRAINING_P, generator=g))
            grids.append(item)
    out = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
    if pixels:
        out["pixel_values"] = torch.cat(pixels)
        out["image_grid_hw"] = torch.tensor(grids)
    return out


TRAINING_SAMPLES = {
    "images": [training_sample([3, (2, 3), 5], 0), training_sample([2, (3, 1), 4, (2, 2), 3], 1),
               training_sample([7], 2)],
    "text": [training_sample([9], 3), training_sample([4], 4)],
}
