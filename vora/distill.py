"""VoRA's training objective: LM cross-entropy + block-wise distillation from a frozen ViT (vora/teacher.py) into
the first K blocks of the LLM.

For each distilled pair (LLM block s, ViT block t): head = RMSNorm → Linear(LLM width → ViT width, no bias) on the
LLM's output of block s at the image's token positions; block loss = mean over images of (mean over that image's
tokens of 1 − cos(head(h), teacher block t)). `objective` adds it up: LM + λ · mean over blocks, each normalised by
the counts of the optimizer step it is given. Only the distilled blocks are captured (forward hooks, no
`output_hidden_states` for every layer).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from .chunked_ce import chunked_lm_loss
from .lora import decoder_layers
from .teacher import Teacher, init_patch_embed_from_teacher  # noqa: F401  (README imports both from here)

# Logit transforms `chunked_lm_loss` does not apply (it knows lm_head + optional final soft-capping only).
_UNSUPPORTED_LOGIT_KEYS = ("logit_scale", "logits_scaling", "output_multiplier_scale")


def default_layer_map(num_blocks: int, teacher_depth: int) -> list[tuple[int, int]]:
    """LLM block k ↔ ViT block k when K equals the ViT depth (the paper: 24 ↔ 24); otherwise ViT blocks
    spread evenly, k ↔ round(k · T / K), so the last distilled LLM block meets the ViT's last block.

    Blocks are 1-based outputs: pair (k, t) compares the LLM's block-k output with the ViT's
    block-t output (HF `hidden_states[k]` vs the ViT's `hidden_states[t]`, index 0 being embeddings).
    """
    if num_blocks < 1:
        raise ValueError(f"distill.num_blocks: expected >= 1, got {num_blocks}")
    return [(k, max(1, round(k * teacher_depth / num_blocks))) for k in range(1, num_blocks + 1)]


def distill_heads(pairs, llm_width: int, teacher_width: int, eps: float = 1e-6) -> nn.ModuleList:
    return nn.ModuleList(
        nn.Sequential(nn.RMSNorm(llm_width, eps=eps), nn.Linear(llm_width, teacher_width, bias=False)) for _ in pairs
    )


def block_loss(student: torch.Tensor, teacher: torch.Tensor, image_index: torch.Tensor, n_images: int) -> torch.Tensor:
    """Mean over images of (mean over that image's tokens of 1 − cos)."""
    per_token = 1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)
    sums = torch.zeros(n_images, device=per_token.device).index_add_(0, image_index, per_token)
    counts = torch.zeros(n_images, device=per_token.device).index_add_(0, image_index, torch.ones_like(per_token))
    return (sums / counts).mean()


@dataclass
class VoRATrainingOutput(ModelOutput):
    """The objective (`loss`) and its parts, detached: `lm_loss`, `distill_loss` and `block_losses` ([K], one per
    distilled block; empty without a teacher)."""

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    distill_loss: torch.Tensor | None = None
    block_losses: torch.Tensor | None = None

    def logs(self, pairs) -> dict[str, float]:
        out = {"lm_loss": float(self.lm_loss), "distill_loss": float(self.distill_loss)}
        out.update({f"distill_block_{s}": float(v) for (s, _), v in zip(pairs, self.block_losses)})
        return out


def objective(lm_sum: torch.Tensor, block_losses: torch.Tensor | None, weight: float, *, images: int,
              num_label_tokens, num_images: float | None = None) -> VoRATrainingOutput:
    """One micro-batch's share of the optimizer step's loss:

        loss = lm_sum / num_label_tokens + λ · images / num_images · mean over blocks of block_losses

    `lm_sum`: Σ token cross-entropy over the micro-batch's label tokens; `block_losses`: [K], each the mean over the
    micro-batch's `images` images (None: no teacher). `num_label_tokens`, `num_images`: the step's label tokens and
    images (all micro-batches; in training divided by the ranks whose gradients are averaged), so the summed
    gradient is the step objective's whatever the split; `num_images=None`: the micro-batch is the step. A count of
    0 label tokens gives an LM loss of 0, not NaN.
    """
    lm = lm_sum / torch.as_tensor(num_label_tokens, device=lm_sum.device).clamp(min=1)
    zero = lm.new_zeros(())
    if block_losses is None:
        return VoRATrainingOutput(lm + zero, lm.detach(), zero.detach(), zero.new_zeros(0))
    # A text-only micro-batch runs the heads on a dummy image (see VoRAForTraining): in the graph with weight 0.
    live = 1.0 if images else 0.0
    if num_images is None:
        scale = weight
    else:
        scale = weight * images / num_images if num_images > 0 else 0.0
    distill = block_losses.mean()
    total = lm + zero + (scale * live) * distill
    return VoRATrainingOutput(total, lm.detach(), (distill * live).detach(), (block_losses * live).detach())


class VoRAForTraining(nn.Module):
    """The module handed to the trainer: VoRA (with LoRA) + frozen teacher + distillation heads.

    Every step runs every module — patch embedding, teacher, heads — even on text-only micro-batches
    (on a 1×1 dummy image, with weight 0), so all DeepSpeed ranks execute the same modules and ZeRO-3
    never waits on a rank that skipped one. The LM loss is unaffected by the dummy path.

    `chunked_ce` (default): the LM loss comes from the decoder's hidden states at label positions only
    (`chunked_lm_loss`); otherwise from transformers' full-vocabulary logits at every position (the reference).
    """

    def __init__(self, vora, teacher: Teacher | None = None, pairs: list[tuple[int, int]] | None = None,
                 weight: float = 1.0, image_mean=None, image_std=None, chunked_ce: bool = True,
                 ce_chunk_size: int = 1024):
        super().__init__()
        self.vora = vora
        self.teacher = teacher
        self.pairs = list(pairs or [])
        self.weight = float(weight)  # λ
        self.chunked_ce = bool(chunked_ce)
        self.ce_chunk_size = int(ce_chunk_size)
        text_config = vora.config.text_config
        self.logit_softcap = getattr(text_config, "final_logit_softcapping", None)
        if self.chunked_ce:
            odd = [k for k in _UNSUPPORTED_LOGIT_KEYS if getattr(text_config, k, None) not in (None, 1, 1.0)]
            if odd:
                raise ValueError(
                    f"model.chunked_ce: {text_config.model_type} transforms its logits ({', '.join(odd)}), which the "
                    "chunked LM loss does not reproduce; set model.chunked_ce: false"
                )
        if teacher is not None:
            if not self.pairs:
                raise ValueError("distill.layer_map: no (LLM block, ViT block) pairs")
            depth = text_config.num_hidden_layers
            bad = [s for s, _ in self.pairs if not 1 <= s <= depth]
            if bad:
                raise ValueError(f"distill.layer_map: LLM block(s) {bad} outside 1..{depth}")
            missing = sorted({t for _, t in self.pairs} - set(teacher.blocks))
            if missing:
                raise ValueError(f"distill.layer_map: teacher was loaded without block(s) {missing}")
            if image_mean is None or image_std is None:
                raise ValueError("VoRAForTraining: the student's image_mean/image_std are needed to show the teacher "
                                 "the same pixels")
            self.distill_heads = distill_heads(self.pairs, text_config.hidden_size, teacher.width)
            self.distill_heads.to(vora.dtype)
        self.image_mean, self.image_std = image_mean, image_std

    @property
    def config(self):
        return self.vora.config

    def forward(self, input_ids, attention_mask=None, labels=None, pixel_values=None, image_grid_hw=None,
                position_ids=None, num_items_in_batch=None, num_images_in_batch=None, image_grid_list=None,
                num_label_tokens=None, **kwargs) -> VoRATrainingOutput:
        """The `objective` of this micro-batch. `num_items_in_batch` / `num_images_in_batch`: the label tokens /
        images its loss is normalised by (the trainer passes the step's; default: this micro-batch's own).

        `image_grid_list` (image_grid_hw as host ints) and `num_label_tokens` (host int: label tokens after the
        shift) come from `VoRACollator`; with them the step reads nothing back from the device on the way. Without
        them (hand-built batches) they are read from the tensors, which costs host syncs but gives the same loss."""
        cfg = self.vora.config
        p = cfg.patch_size
        device = input_ids.device
        has_images = image_grid_hw is not None and image_grid_hw.shape[0] > 0
        if has_images:
            host_grid = image_grid_list if image_grid_list is not None else image_grid_hw.tolist()
            grid = [(int(h), int(w)) for h, w in host_grid]
        else:
            # A 1×1 dummy image feeds the patch embedding, teacher and heads (weight 0), so they run on every rank.
            grid = [(1, 1)]
            pixel_values = torch.zeros(1, 3 * p * p, device=device, dtype=self.vora.dtype)
            image_grid_hw = torch.ones(1, 2, dtype=torch.long, device=device)
        n_patches = sum(h * w for h, w in grid)

        # The teacher depends on the pixels only: queue it before the LLM, so the host never waits on the LLM.
        teacher_feats = None
        if self.teacher is not None:
            teacher_feats = self.teacher.features_for(pixel_values, grid, p, self.image_mean, self.image_std)

        captured: dict[int, torch.Tensor] = {}
        hooks = []
        if self.teacher is not None:
            layers = decoder_layers(self.vora.language_model)
            for s, _ in self.pairs:
                def hook(_module, _args, output, s=s):
                    captured[s] = output[0] if isinstance(output, tuple) else output
                hooks.append(layers[s - 1].register_forward_hook(hook))
        if has_images:
            # Only the collator's image_grid_list vouches for the placeholders (it checked them on the CPU); a grid
            # read back here does not, so then the model checks them on the device.
            vora_inputs = dict(input_ids=input_ids, pixel_values=pixel_values, image_grid_hw=image_grid_hw,
                               image_grid_list=image_grid_list)
        else:
            # The dummy image enters through the patch embedding exactly where real images do — inside the VoRA
            # forward, right after the token embedding — with weight 0: every rank calls the same modules in the
            # same order, which DeepSpeed ZeRO-3 requires (it gathers parameters in its recorded module order and
            # checks that all ranks agree).
            def add_dummy_image(_module, _args, embeds):
                dummy = self.vora.vision_embed(pixel_values, image_grid_hw, grid)
                return embeds + 0.0 * dummy.sum().to(embeds.dtype)

            hooks.append(self.vora.language_model.get_input_embeddings().register_forward_hook(add_dummy_image))
            vora_inputs = dict(input_ids=input_ids)
        try:
            if self.chunked_ce:
                hidden = self.vora.last_hidden_state(
                    **vora_inputs, attention_mask=attention_mask, position_ids=position_ids
                )
                lm_sum = chunked_lm_loss(hidden, labels, self.vora.get_output_embeddings(), num_label_tokens,
                                         softcap=self.logit_softcap, chunk_size=self.ce_chunk_size)
            else:
                # transformers divides its summed loss by num_items_in_batch: by 1, it is the sum.
                lm_sum = self.vora(
                    **vora_inputs, attention_mask=attention_mask, position_ids=position_ids, labels=labels,
                    use_cache=False, num_items_in_batch=1, logits_to_keep=0,
                ).loss
        finally:
            for h in hooks:
                h.remove()
        if num_items_in_batch is None:
            num_items_in_batch = (labels[:, 1:] != -100).sum()
        counts = dict(images=len(grid) if has_images else 0, num_label_tokens=num_items_in_batch,
                      num_images=num_images_in_batch)
        if self.teacher is None:
            return objective(lm_sum, None, self.weight, **counts)

        # Image token positions and each one's image, sized from host ints: no read-back of the device.
        if has_images:
            is_image = (input_ids == cfg.image_token_id).flatten()
            image_pos = torch.nonzero_static(is_image, size=n_patches).squeeze(1)
            sizes = image_grid_hw[:, 0] * image_grid_hw[:, 1]
            image_index = torch.repeat_interleave(torch.arange(len(grid), device=device), sizes, output_size=n_patches)
        else:
            image_pos = torch.zeros(1, dtype=torch.long, device=device)
            image_index = torch.zeros(1, dtype=torch.long, device=device)
        # One head per distilled block (different weights and widths of captured states): a loop of K small
        # matmuls; stacking them into a bmm would save launches, not FLOPs, at the cost of clarity.
        losses = []
        for head, (s, t) in zip(self.distill_heads, self.pairs):
            h = captured[s]
            if self.training and torch.is_grad_enabled() and not h.requires_grad:
                raise RuntimeError("distillation captured hidden states without grad: use gradient checkpointing "
                                   "with use_reentrant=False")
            h = h.reshape(-1, h.shape[-1]).index_select(0, image_pos)
            losses.append(block_loss(head(h), teacher_feats[t], image_index, len(grid)))
        return objective(lm_sum, torch.stack(losses), self.weight, **counts)
