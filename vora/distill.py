"""Block-wise distillation from a frozen ViT into the first K blocks of the LLM.

For each distilled pair (LLM block s, ViT block t): head = RMSNorm → Linear(LLM width → ViT width,
no bias) on the LLM's output of block s at the image's token positions; loss = mean over that image's
tokens of 1 − cos(head(h), teacher block t); block loss = mean over the batch's images; distillation
loss = mean over blocks; total = LM cross-entropy + λ · distillation loss.

Only the distilled blocks are captured (forward hooks, no `output_hidden_states` for every layer), the
teacher is truncated after its last distilled block and runs without grad in eval mode on the same
pixels, renormalised with its own mean/std.
"""

import json
import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .lora import decoder_layers

logger = logging.getLogger(__name__)

# Used only when a teacher directory has no preprocessor config.
DEFAULT_MEAN_STD = {
    "clip_vision_model": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "aimv2_vision_model": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip_vision_model": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "siglip2_vision_model": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def _as_pair(x) -> tuple[int, int]:
    return (int(x), int(x)) if isinstance(x, int) else (int(x[0]), int(x[1]))


class Teacher(nn.Module):
    """A frozen ViT returning grid features of the requested blocks (1-based block outputs)."""

    def __init__(self, model: nn.Module, backend: str, blocks: list[int], image_size, patch_size, width: int, mean, std, source: str = ""):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.backend = backend
        self.blocks = sorted(set(blocks))
        self.image_size = _as_pair(image_size)
        self.patch_size = _as_pair(patch_size)
        self.grid = (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])
        self.width = width
        self.source = source
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        # Always eval: dropout / stochastic depth off whatever the trainer does.
        return super().train(False)

    @property
    def depth(self) -> int:
        return self._depth

    # --- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, source: str, blocks: list[int] | None = None, backend: str = "transformers", timm_model: str | None = None, timm_kwargs: dict | None = None, dtype=None):
        """`source`: a local dir / hub id (transformers) or a weights file (timm, with `timm_model`).
        `blocks=None` keeps every block (used to read the depth before the layer map is known)."""
        if backend == "transformers":
            teacher = cls._from_transformers(source, blocks, dtype)
        elif backend == "timm":
            teacher = cls._from_timm(source, blocks, timm_model, timm_kwargs or {}, dtype)
        else:
            raise ValueError(f"distill.backend: {backend!r} is not one of ['transformers', 'timm']")
        return teacher

    @classmethod
    def _from_transformers(cls, source, blocks, dtype):
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(source)
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model = AutoModel.from_pretrained(source, **kwargs)
        if hasattr(config, "vision_config"):  # a full CLIP/SigLIP model: keep its vision tower only
            model, config = model.vision_model, config.vision_config
        for key in ("image_size", "patch_size", "hidden_size", "num_hidden_layers"):
            if getattr(config, key, None) is None:
                raise ValueError(f"teacher {source}: config has no {key!r}; it is not a ViT with a patch grid")
        layers = _find_block_list(model, config.num_hidden_layers)
        if layers is None:
            raise ValueError(f"teacher {source}: cannot find its {config.num_hidden_layers} encoder blocks")
        depth = config.num_hidden_layers
        if blocks:
            _check_blocks(blocks, depth, source)
            # Blocks after the last distilled one are never needed: drop them (compute and memory).
            keep = max(blocks)
            del layers[keep:]
            config.num_hidden_layers = keep
        mean, std = _mean_std_transformers(source, config)
        teacher = cls(model, "transformers", blocks or list(range(1, depth + 1)), config.image_size, config.patch_size, config.hidden_size, mean, std, source)
        teacher._depth = depth
        return teacher

    @classmethod
    def _from_timm(cls, source, blocks, timm_model, timm_kwargs, dtype):
        import timm

        if not timm_model:
            raise ValueError("distill.timm_model: the timm architecture name is required with backend 'timm'")
        overlay = {"file": source} if source else None
        model = timm.create_model(timm_model, pretrained=bool(source), pretrained_cfg_overlay=overlay, num_classes=0, **timm_kwargs)
        if not hasattr(model, "forward_intermediates") or not hasattr(model, "patch_embed"):
            raise ValueError(f"teacher {timm_model}: timm model has no patch grid / forward_intermediates")
        depth = len(model.blocks)
        if blocks:
            _check_blocks(blocks, depth, timm_model)
            model.prune_intermediate_layers([b - 1 for b in blocks], prune_norm=True, prune_head=True)
        if dtype is not None:
            model.to(dtype)
        cfg = model.pretrained_cfg
        image_size = model.patch_embed.img_size
        teacher = cls(model, "timm", blocks or list(range(1, depth + 1)), image_size, model.patch_embed.patch_size, model.embed_dim, cfg["mean"], cfg["std"], f"{timm_model}:{source}")
        teacher._depth = depth
        return teacher

    # --- forward -------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        """images: [N, 3, H, W] in [0, 1] at the teacher's size → {block: [N, width, gh, gw]}."""
        dtype = next(self.model.parameters()).dtype
        x = ((images.float() - self.mean) / self.std).to(dtype)
        gh, gw = self.grid
        if self.backend == "timm":
            feats = self.model.forward_intermediates(x, indices=[b - 1 for b in self.blocks], intermediates_only=True, output_fmt="NCHW")
            return dict(zip(self.blocks, feats))
        hidden = self.model(pixel_values=x, output_hidden_states=True).hidden_states
        out = {}
        for b in self.blocks:
            h = hidden[b]  # hidden_states[0] is the embedding output, [b] block b's output
            prefix = h.shape[1] - gh * gw  # CLS and register tokens come first
            if prefix < 0:
                raise ValueError(f"teacher {self.source}: {h.shape[1]} tokens cannot hold a {gh}x{gw} patch grid")
            out[b] = h[:, prefix:].transpose(1, 2).reshape(h.shape[0], h.shape[2], gh, gw)
        return out

    def features_for(self, pixel_values: torch.Tensor, grid: list[tuple[int, int]], patch_size: int, mean, std) -> dict[int, torch.Tensor]:
        """Teacher features aligned with the student's patches: {block: [P, width]} in pixel_values' order.

        The teacher sees the same pixels: un-patchify, undo the student normalisation, resize to the
        teacher's input size; its feature grid is then interpolated to each image's student grid. `grid` is host
        ints (no device read-back); images of equal grid are un-patchified, resized and interpolated together.
        """
        p = patch_size
        # Non-blocking: a blocking host → device copy waits for the device's queue (here: nothing to wait for yet).
        mean = torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1).to(pixel_values.device, non_blocking=True)
        std = torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1).to(pixel_values.device, non_blocking=True)
        offsets, groups = [0], {}
        for i, (gh, gw) in enumerate(grid):
            offsets.append(offsets[-1] + gh * gw)
            groups.setdefault((gh, gw), []).append(i)
        images, order = [], []
        for (gh, gw), members in groups.items():
            rows = [pixel_values[offsets[i] : offsets[i + 1]] for i in members]
            x = (torch.cat(rows) if len(rows) > 1 else rows[0]).float()
            x = x.view(len(members), gh, gw, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(len(members), 3, gh * p, gw * p)
            x = (x * std + mean).clamp(0, 1)
            images.append(F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False, antialias=True))
            order += members
        # self.forward, not self(...): DeepSpeed ZeRO-3's module hooks reject dict outputs with int keys.
        feats = self.forward(torch.cat(images).clamp(0, 1) if len(images) > 1 else images[0].clamp(0, 1))
        # Features come out in group order; `restore` puts the images' patch rows back in pixel_values' order.
        restore = None
        if order != sorted(order):
            starts = {i: 0 for i in order}
            pos = 0
            for i in order:
                starts[i] = pos
                pos += offsets[i + 1] - offsets[i]
            index = [starts[i] + k for i in range(len(grid)) for k in range(offsets[i + 1] - offsets[i])]
            restore = torch.tensor(index).to(pixel_values.device, non_blocking=True)  # no wait on the device
        out = {}
        for b, f in feats.items():
            parts, start = [], 0
            for (gh, gw), members in groups.items():
                fg = f[start : start + len(members)].float()
                start += len(members)
                if (gh, gw) != tuple(fg.shape[-2:]):
                    fg = F.interpolate(fg, size=(gh, gw), mode="bilinear", align_corners=False)
                parts.append(fg.flatten(2).transpose(1, 2).reshape(-1, fg.shape[1]))
            rows = torch.cat(parts) if len(parts) > 1 else parts[0]
            out[b] = rows if restore is None else rows.index_select(0, restore)
        return out


def _check_blocks(blocks, depth, source):
    bad = [b for b in blocks if not 1 <= b <= depth]
    if bad:
        raise ValueError(f"distill.layer_map: teacher block(s) {bad} outside 1..{depth} of teacher {source}")


def _find_block_list(model: nn.Module, depth: int):
    for _, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == depth:
            return m
    return None


def _mean_std_transformers(source, config):
    path = os.path.join(source, "preprocessor_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            pp = json.load(f)
        if "image_mean" in pp and "image_std" in pp:
            return pp["image_mean"], pp["image_std"]
    if config.model_type in DEFAULT_MEAN_STD:
        logger.warning("teacher %s has no preprocessor_config.json: using %s's usual mean/std", source, config.model_type)
        return DEFAULT_MEAN_STD[config.model_type]
    raise ValueError(f"teacher {source}: no preprocessor_config.json with image_mean/image_std and no default for {config.model_type!r}")


def default_layer_map(num_blocks: int, teacher_depth: int) -> list[tuple[int, int]]:
    """LLM block k ↔ ViT block k when K equals the ViT depth (the paper: 24 ↔ 24); otherwise ViT blocks
    spread evenly, k ↔ round(k · T / K), so the last distilled LLM block meets the ViT's last block.

    Blocks are 1-based outputs: pair (k, t) compares the LLM's block-k output with the ViT's
    block-t output (HF `hidden_states[k]` vs the ViT's `hidden_states[t]`, index 0 being embeddings).
    """
    if num_blocks < 1:
        raise ValueError(f"distill.num_blocks: expected >= 1, got {num_blocks}")
    return [(k, max(1, round(k * teacher_depth / num_blocks))) for k in range(1, num_blocks + 1)]


def init_patch_embed_from_teacher(vision_embed: nn.Module, teacher: Teacher) -> list[str]:
    """Copy the teacher's patch conv (and its post-patch RMSNorm / position grid where present and
    shaped alike) into VoRA's patch embedding. Returns what was copied; raises if the conv can't be."""
    conv = next((m for m in teacher.model.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3 and m.kernel_size == m.stride), None)
    ours = vision_embed.conv
    if conv is None or conv.weight.shape != ours.weight.shape:
        shape = None if conv is None else tuple(conv.weight.shape)
        raise ValueError(f"patch embedding init: teacher patch conv {shape} does not fit VoRA's {tuple(ours.weight.shape)} (check model.patch_size and model.vision_embed_dim)")
    copied = ["conv.weight"]
    with torch.no_grad():
        ours.weight.copy_(conv.weight)
        if conv.bias is not None:
            ours.bias.copy_(conv.bias)
            copied.append("conv.bias")
        else:
            ours.bias.zero_()
        # AIMv2 normalises patches with an RMSNorm right after the conv.
        emb = getattr(teacher.model, "embeddings", None)
        norm = getattr(emb, "rms_norm", None)
        if norm is not None and getattr(norm, "weight", None) is not None and norm.weight.shape == vision_embed.norm.weight.shape:
            vision_embed.norm.weight.copy_(norm.weight)
            copied.append("norm.weight")
        pos = _teacher_position_grid(teacher)
        if pos is not None and pos.shape[1] == vision_embed.position.shape[1]:
            g = vision_embed.position.shape[-2:]
            vision_embed.position.copy_(F.interpolate(pos.float(), size=g, mode="bicubic", align_corners=False).to(vision_embed.position.dtype))
            copied.append("position")
    return copied


def _teacher_position_grid(teacher: Teacher):
    """The teacher's patch position embeddings as [1, D, gh, gw], prefix tokens dropped, or None."""
    gh, gw = teacher.grid
    for name, value in list(teacher.model.named_parameters()) + list(teacher.model.named_buffers()):
        if "pos" not in name or value.dim() not in (2, 3):
            continue
        table = value.reshape(-1, value.shape[-1])
        if table.shape[0] >= gh * gw and table.shape[0] - gh * gw <= 8:
            grid = table[table.shape[0] - gh * gw :]
            return grid.t().reshape(1, -1, gh, gw)
    return None


def distill_heads(pairs, llm_width: int, teacher_width: int, eps: float = 1e-6) -> nn.ModuleList:
    return nn.ModuleList(nn.Sequential(nn.RMSNorm(llm_width, eps=eps), nn.Linear(llm_width, teacher_width, bias=False)) for _ in pairs)


def block_loss(student: torch.Tensor, teacher: torch.Tensor, image_index: torch.Tensor, n_images: int) -> torch.Tensor:
    """Mean over images of (mean over that image's tokens of 1 − cos)."""
    per_token = 1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)
    sums = torch.zeros(n_images, device=per_token.device).index_add_(0, image_index, per_token)
    counts = torch.zeros(n_images, device=per_token.device).index_add_(0, image_index, torch.ones_like(per_token))
    return (sums / counts).mean()


# --- LM loss at label positions only -----------------------------------------------------------------------

class _LinearCrossEntropy(torch.autograd.Function):
    """Σ over rows of CE(softcap(h Wᵀ + b), target), chunk by chunk, with the gradients w.r.t. `h` (and `W`, `b`
    when they train) computed in the same pass: a chunk's [rows, vocab] logits die with the chunk, backward only
    scales the stored gradients (no recomputation, no second lm_head call — see `chunked_lm_loss` for ZeRO-3).

    Dtypes follow the transformers path it replaces: logits in the weights' dtype, then fp32 for the softmax; the
    logit gradient is cast back to the weights' dtype for the two matmuls, as autograd does through `.float()`.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, softcap, grad_enabled):
        # needs_input_grad ignores no_grad mode (evaluation): the caller passes it.
        need_h, need_w = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        need_b = grad_enabled and bias is not None and ctx.needs_input_grad[2]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        for start in range(0, hidden.shape[0], chunk_size):
            h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
            logits = F.linear(h, weight, bias).float()
            if softcap:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if not (need_h or need_w or need_b):
                continue
            # dCE/dlogits = softmax − one-hot, built in place in the logits buffer.
            g = logits.sub_(lse[:, None]).exp_()
            g[torch.arange(len(t), device=g.device), t] -= 1
            if softcap:  # d(c·tanh(z/c))/dz = 1 − tanh²
                g.mul_(capped.mul_(capped).neg_().add_(1))
            g = g.to(weight.dtype)
            if need_h:
                grad_h[start : start + chunk_size] = g @ weight
            if need_w:
                grad_w += (g.t() @ h).float()
            if need_b:
                grad_b += g.float().sum(0)
        ctx.save_for_backward(*(x for x in (grad_h, grad_w, grad_b) if x is not None))
        ctx.has = (need_h, need_w, need_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        grads = [(next(saved) * grad_out).to(dtype) if need else None for need, dtype in zip(ctx.has, ctx.dtypes)]
        return *grads, None, None, None, None


def chunked_lm_loss(hidden, labels, lm_head: nn.Linear, num_items_in_batch, num_label_tokens: int | None = None,
                    softcap: float | None = None, chunk_size: int = 1024) -> torch.Tensor:
    """Σ token CE over label tokens / `num_items_in_batch` — transformers' `ForCausalLMLoss` with a sum reduction —
    from the final hidden states `[B, L, H]`, with `lm_head` logits computed only where a label is predicted
    (position t predicts labels[t + 1]; rows never wrap) and never for the whole vocabulary × sequence at once.

    `num_label_tokens` (host int, the count of labels[:, 1:] != -100, from the collator) sizes the gather without
    reading it back from the device; without it the positions come from `nonzero` (one host sync).
    """
    predicts = F.pad(labels[:, 1:] != -100, (0, 1), value=False).flatten()
    if num_label_tokens is None:
        positions = predicts.nonzero().squeeze(1)
    else:
        positions = torch.nonzero_static(predicts, size=int(num_label_tokens)).squeeze(1)
    h = hidden.flatten(0, 1).index_select(0, positions)
    targets = labels.flatten().index_select(0, positions + 1)
    weight, bias = lm_head.weight, lm_head.bias
    grad_enabled = torch.is_grad_enabled()
    if hasattr(weight, "ds_id"):
        # ZeRO-3 partitions the lm_head: gather it once per forward on every rank (the same collective count
        # everywhere, whatever each rank's label count); the loss needs no weight in backward. A weight that is
        # already gathered (tied to the embedding, still held by it) is used as it is and left to its holder.
        import deepspeed
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        params = [x for x in (weight, bias) if x is not None and x.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        with deepspeed.zero.GatheredParameters(params):
            total = _LinearCrossEntropy.apply(h, weight, bias, targets, chunk_size, softcap, grad_enabled)
    else:
        total = _LinearCrossEntropy.apply(h, weight, bias, targets, chunk_size, softcap, grad_enabled)
    return total / num_items_in_batch


# Logit transforms `chunked_lm_loss` does not apply (it knows lm_head + optional final soft-capping only).
_UNSUPPORTED_LOGIT_KEYS = ("logit_scale", "logits_scaling", "output_multiplier_scale")


@dataclass
class VoRALoss:
    loss: torch.Tensor
    lm_loss: torch.Tensor
    distill_loss: torch.Tensor
    block_losses: torch.Tensor  # [K], detached

    def __getitem__(self, key):  # the HF Trainer reads outputs["loss"]
        return getattr(self, key)

    def logs(self, pairs) -> dict[str, float]:
        out = {"lm_loss": float(self.lm_loss), "distill_loss": float(self.distill_loss)}
        out.update({f"distill_block_{s}": float(v) for (s, _), v in zip(pairs, self.block_losses)})
        return out


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
        self.weight = float(weight)
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
                raise ValueError("VoRAForTraining: the student's image_mean/image_std are needed to show the teacher the same pixels")
            self.distill_heads = distill_heads(self.pairs, text_config.hidden_size, teacher.width)
            self.distill_heads.to(vora.dtype)
        self.image_mean, self.image_std = image_mean, image_std

    @property
    def config(self):
        return self.vora.config

    def forward(self, input_ids, attention_mask=None, labels=None, pixel_values=None, image_grid_hw=None,
                position_ids=None, num_items_in_batch=None, image_grid_list=None, num_label_tokens=None,
                **kwargs) -> VoRALoss:
        """`image_grid_list` (image_grid_hw as host ints) and `num_label_tokens` (host int: label tokens after the
        shift) come from `VoRACollator`; with them the step reads nothing back from the device on the way. Without
        them (hand-built batches) they are read from the tensors, which costs host syncs but gives the same loss."""
        cfg = self.vora.config
        p = cfg.patch_size
        device = input_ids.device
        has_images = image_grid_hw is not None and image_grid_hw.shape[0] > 0
        if has_images:
            host_grid = image_grid_list if image_grid_list is not None else image_grid_hw.tolist()
            grid = [(int(h), int(w)) for h, w in host_grid]
            live = 1.0
        else:
            # A 1×1 dummy image feeds the patch embedding, teacher and heads (weight 0), so they run on every rank.
            grid = [(1, 1)]
            pixel_values = torch.zeros(1, 3 * p * p, device=device, dtype=self.vora.dtype)
            image_grid_hw = torch.ones(1, 2, dtype=torch.long, device=device)
            live = 0.0
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
        if labels is not None:
            # Sum over label tokens / their count, with the count clamped at 1: identical to the mean,
            # but a micro-batch whose samples were all skipped (no label tokens) gives 0, not NaN.
            if num_items_in_batch is None:
                num_items_in_batch = (labels[:, 1:] != -100).sum()
            num_items_in_batch = torch.as_tensor(num_items_in_batch, device=labels.device).clamp(min=1)
        try:
            if self.chunked_ce and labels is not None:
                hidden = self.vora.last_hidden_state(
                    **vora_inputs, attention_mask=attention_mask, position_ids=position_ids
                )
                lm_loss = chunked_lm_loss(
                    hidden, labels, self.vora.get_output_embeddings(), num_items_in_batch, num_label_tokens,
                    softcap=self.logit_softcap, chunk_size=self.ce_chunk_size,
                )
            else:
                out = self.vora(
                    **vora_inputs, attention_mask=attention_mask, position_ids=position_ids, labels=labels,
                    use_cache=False, num_items_in_batch=num_items_in_batch, logits_to_keep=0,
                )
                lm_loss = out.loss
        finally:
            for h in hooks:
                h.remove()
        zero = lm_loss.new_zeros(())

        if self.teacher is None:
            return VoRALoss(lm_loss + zero, lm_loss.detach(), zero.detach(), zero.new_zeros(0))

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
                raise RuntimeError("distillation captured hidden states without grad: use gradient checkpointing with use_reentrant=False")
            h = h.reshape(-1, h.shape[-1]).index_select(0, image_pos)
            losses.append(block_loss(head(h), teacher_feats[t], image_index, len(grid)))
        block_losses = torch.stack(losses)
        distill = block_losses.mean()
        total = lm_loss + zero + (self.weight * live) * distill
        return VoRALoss(total, lm_loss.detach(), (distill * live).detach(), (block_losses * live).detach())
