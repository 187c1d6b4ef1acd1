"""The frozen ViT teacher of VoRA's distillation: loading (transformers or timm), its patch geometry, and its block
features aligned with the student's patches; plus the patch-embedding initialisation copied from it.

The teacher is truncated after its last distilled block, always in eval mode without grad, and sees the student's
pixels renormalised with its own mean/std.
"""

import json
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel

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

    def __init__(self, model: nn.Module, backend: str, blocks: list[int], image_size, patch_size, width: int,
                 mean, std, source: str = ""):
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
    def from_pretrained(cls, source: str, blocks: list[int] | None = None, backend: str = "transformers",
                        timm_model: str | None = None, timm_kwargs: dict | None = None, dtype=None):
        """`source`: a local dir / hub id (transformers) or a weights file (timm, with `timm_model`).
        `blocks=None` keeps every block (used to read the depth before the layer map is known)."""
        if backend == "transformers":
            return cls._from_transformers(source, blocks, dtype)
        if backend == "timm":
            return cls._from_timm(source, blocks, timm_model, timm_kwargs or {}, dtype)
        raise ValueError(f"distill.backend: {backend!r} is not one of ['transformers', 'timm']")

    @classmethod
    def _from_transformers(cls, source, blocks, dtype):
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
        teacher = cls(model, "transformers", blocks or list(range(1, depth + 1)), config.image_size,
                      config.patch_size, config.hidden_size, mean, std, source)
        teacher._depth = depth
        return teacher

    @classmethod
    def _from_timm(cls, source, blocks, timm_model, timm_kwargs, dtype):
        import timm  # optional: only timm teachers need it

        if not timm_model:
            raise ValueError("distill.timm_model: the timm architecture name is required with backend 'timm'")
        overlay = {"file": source} if source else None
        model = timm.create_model(timm_model, pretrained=bool(source), pretrained_cfg_overlay=overlay, num_classes=0,
                                  **timm_kwargs)
        if not hasattr(model, "forward_intermediates") or not hasattr(model, "patch_embed"):
            raise ValueError(f"teacher {timm_model}: timm model has no patch grid / forward_intermediates")
        depth = len(model.blocks)
        if blocks:
            _check_blocks(blocks, depth, timm_model)
            model.prune_intermediate_layers([b - 1 for b in blocks], prune_norm=True, prune_head=True)
        if dtype is not None:
            model.to(dtype)
        cfg = model.pretrained_cfg
        teacher = cls(model, "timm", blocks or list(range(1, depth + 1)), model.patch_embed.img_size,
                      model.patch_embed.patch_size, model.embed_dim, cfg["mean"], cfg["std"], f"{timm_model}:{source}")
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
            feats = self.model.forward_intermediates(x, indices=[b - 1 for b in self.blocks], intermediates_only=True,
                                                     output_fmt="NCHW")
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

    def features_for(self, pixel_values: torch.Tensor, grid: list[tuple[int, int]], patch_size: int, mean,
                     std) -> dict[int, torch.Tensor]:
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
            x = x.view(len(members), gh, gw, 3, p, p).permute(0, 3, 1, 4, 2, 5)
            x = (x.reshape(len(members), 3, gh * p, gw * p) * std + mean).clamp(0, 1)
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
        logger.warning("teacher %s has no preprocessor_config.json: using %s's usual mean/std", source,
                       config.model_type)
        return DEFAULT_MEAN_STD[config.model_type]
    raise ValueError(f"teacher {source}: no preprocessor_config.json with image_mean/image_std and no default for "
                     f"{config.model_type!r}")


def init_patch_embed_from_teacher(vision_embed: nn.Module, teacher: Teacher) -> list[str]:
    """Copy the teacher's patch conv (and its post-patch RMSNorm / position grid where present and
    shaped alike) into VoRA's patch embedding. Returns what was copied; raises if the conv can't be."""
    conv = next((m for m in teacher.model.modules()
                 if isinstance(m, nn.Conv2d) and m.in_channels == 3 and m.kernel_size == m.stride), None)
    ours = vision_embed.conv
    if conv is None or conv.weight.shape != ours.weight.shape:
        shape = None if conv is None else tuple(conv.weight.shape)
        raise ValueError(f"patch embedding init: teacher patch conv {shape} does not fit VoRA's "
                         f"{tuple(ours.weight.shape)} (check model.patch_size and model.vision_embed_dim)")
    copied = ["conv.weight"]
    with torch.no_grad():
        ours.weight.copy_(conv.weight)
        if conv.bias is not None:
            ours.bias.copy_(conv.bias)
            copied.append("conv.bias")
        else:
            ours.bias.zero_()
        # AIMv2 normalises patches with an RMSNorm right after the conv.
        norm = getattr(getattr(teacher.model, "embeddings", None), "rms_norm", None)
        if getattr(norm, "weight", None) is not None and norm.weight.shape == vision_embed.norm.weight.shape:
            vision_embed.norm.weight.copy_(norm.weight)
            copied.append("norm.weight")
        pos = _teacher_position_grid(teacher)
        if pos is not None and pos.shape[1] == vision_embed.position.shape[1]:
            g = vision_embed.position.shape[-2:]
            pos = F.interpolate(pos.float(), size=g, mode="bicubic", align_corners=False)
            vision_embed.position.copy_(pos.to(vision_embed.position.dtype))
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
