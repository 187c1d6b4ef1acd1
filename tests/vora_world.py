"""A small but complete VoRA world for merge / serving tests, built locally (nothing downloaded):

tokenizer with '<image>' and a chat template → tiny base LLM directory (weights + tokenizer) → VoRA
model with LoRA (non-zero B) and a trained-looking patch embedding → training checkpoint
(`vora.checkpoint.save_trainable`, processor included) → merged directory (`merge_tools.merge.merge`).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from merge_tools.merge import merge
from tests.helpers_data import build_tokenizer, make_image
from vora import VoRAForCausalLM
from vora.checkpoint import save_trainable
from vora.lora import add_lora, merge_lora
from vora.model.image_processing_vora import VoRAImageProcessor
from vora.model.processing_vora import VoRAProcessor

P = 4  # patch size
LORA_LAYERS = 2
LORA_RANK = 8


@dataclass
class World:
    root: Path
    tok_dir: Path
    llm_dir: Path
    ckpt_dir: Path
    merged_dir: Path
    image_token_id: int
    vocab: int
    unmerged: object  # VoRAForCausalLM with peft LoRA (fp32, eval)
    processor: object
    summary: dict = field(default_factory=dict)

    def reference_merged(self):
        """peft's in-memory merge_and_unload of the unmerged model."""
        model = copy.deepcopy(self.unmerged)
        merge_lora(model)
        return model.eval()


def llm_config(arch: str, vocab: int, layers=4, hidden=64, tie=False):
    common = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tie,
    )
    configs = {"qwen2": Qwen2Config, "llama": LlamaConfig}
    if arch not in configs:
        raise ValueError(f"arch must be one of {sorted(configs)}, got {arch!r}")
    return configs[arch](**common)


def save_llm(path: Path, arch: str, vocab: int, tokenizer=None, tie=False, seed=0, **kw) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(llm_config(arch, vocab, tie=tie, **kw))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def build_world(root: Path, arch="qwen2", tie=False, merge_dtype="float32", max_shard_size="60KB", hidden=64) -> World:
    root = Path(root)
    tok = build_tokenizer(str(root / "tok"), "chatml", with_image_token=True)
    image_token_id = tok.convert_tokens_to_ids("<image>")
    vocab = len(tok) + 8  # like real LLMs: a few unused embedding rows
    llm_dir = save_llm(root / "llm", arch, vocab, tokenizer=tok, tie=tie, hidden=hidden)  # 4 heads: head dim hidden/4
    torch.manual_seed(1)
    model = VoRAForCausalLM.from_llm(
        str(llm_dir), image_token_id=image_token_id, patch_size=P, vision_embed_dim=16, position_grid=4,
        min_pixels=4 * P * P, max_pixels=64 * P * P, dtype=torch.float32,
    )
    add_lora(model, num_layers=LORA_LAYERS, rank=LORA_RANK)
    with torch.no_grad():  # as if trained: B non-zero, patch embedding moved
        for n, p in model.named_parameters():
            if "lora_B" in n or n.startswith("vision_embed."):
                p.add_(torch.randn_like(p) * 0.2)
    model.eval()
    ip = VoRAImageProcessor(patch_size=P, min_pixels=4 * P * P, max_pixels=64 * P * P)
    processor = VoRAProcessor(image_processor=ip, tokenizer=tok)
    heads = torch.nn.ModuleList([torch.nn.Linear(hidden, 16, bias=False) for _ in range(2)])
    ckpt_dir = save_trainable(
        model, root / "checkpoint-10", base_llm=str(llm_dir), teacher="timm/aimv2-tiny", recipe={"lr": 2e-4},
        processor=processor, heads=heads,
    )
    merged_dir = root / "merged"
    summary = merge(ckpt_dir, merged_dir, dtype=merge_dtype, max_shard_size=max_shard_size, log=lambda m: None)
    return World(root, root / "tok", llm_dir, ckpt_dir, merged_dir, image_token_id, vocab, model, processor, summary)


def make_batch(rows, padding_side: str, image_token_id: int, vocab: int, p: int = P, seed=0, low=8):
    """rows: lists of items, each an int (that many random text tokens) or (gh, gw) (an image grid).
    Returns input_ids, attention_mask, pixel_values, image_grid_hw in the batch contract."""
    g = torch.Generator().manual_seed(seed)
    seqs, grids = [], []
    for row in rows:
        ids = []
        for item in row:
            if isinstance(item, int):
                t = torch.randint(low, vocab, (item,), generator=g)
                ids += torch.where(t == image_token_id, torch.full_like(t, low), t).tolist()
            else:
                grids.append(item)
                ids += [image_token_id] * (item[0] * item[1])
        seqs.append(ids)
    L = max(map(len, seqs))
    input_ids = torch.zeros(len(seqs), L, dtype=torch.long)
    attention_mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for b, ids in enumerate(seqs):
        sl = slice(0, len(ids)) if padding_side == "right" else slice(L - len(ids), L)
        input_ids[b, sl] = torch.tensor(ids)
        attention_mask[b, sl] = 1
    n = sum(h * w for h, w in grids)
    pixel_values = torch.randn(n, 3 * p * p, generator=g)
    image_grid_hw = torch.tensor(grids, dtype=torch.long).reshape(-1, 2)
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                image_grid_hw=image_grid_hw)


ROWS = [
    [3, (2, 2), (1, 3), 4],  # two touching images
    [2, (2, 3), 2, (1, 1), 1],  # two images with text between
    [5],  # text only (left-padded the most)
]


def images():
    """Three small PIL images of different sizes (grids differ)."""
    return [make_image(12, 16, seed=1), make_image(20, 8, seed=2), make_image(16, 16, seed=3)]
