"""VoRA image processor: native-aspect resize to multiples of the patch size, normalise, patchify.

Copied verbatim into merged checkpoints (``trust_remote_code``): imports only torch, numpy, PIL and
transformers.

Output of ``__call__``:

* ``pixel_values``  ``[P, 3*p*p]`` float32: the patches of all images concatenated in input order. Each patch
  is ``image[:, r*p:(r+1)*p, c*p:(c+1)*p].reshape(-1)`` (flatten order channel, row, col) and the patches of
  one image are row-major over its grid.
* ``image_grid_hw`` ``[N, 2]`` long: (grid rows, grid cols) per image; ``P = sum(gh * gw)``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs

# CLIP / AIMv2 normalisation constants.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

MAX_ASPECT_RATIO = 200.0


class VoRAImagesKwargs(ImagesKwargs, total=False):
    patch_size: int
    min_pixels: int
    max_pixels: int
    max_aspect_ratio: float


def smart_resize(
    height: int,
    width: int,
    patch_size: int = 14,
    min_pixels: int = 56 * 56,
    max_pixels: int = 448 * 448,
    max_aspect_ratio: float = MAX_ASPECT_RATIO,
) -> tuple[int, int]:
    """Target (height, width) for an image: multiples of ``patch_size``, area in ``[min_pixels, max_pixels]``.

    Each side is rounded to the nearest multiple of ``patch_size`` (at least one patch); if the area is then
    out of bounds both sides are scaled by the same factor (floor when shrinking, ceil when growing), so the
    aspect ratio is kept to within one patch. Raises ``ValueError`` for empty images and for aspect ratios
    above ``max_aspect_ratio``.
    """
    p = int(patch_size)
    if height < 1 or width < 1:
        raise ValueError(f"image of size {height}x{width} (HxW) is empty")
    ratio = max(height, width) / min(height, width)
    if ratio > max_aspect_ratio:
        raise ValueError(
            f"image of size {height}x{width} (HxW) has aspect ratio {ratio:.1f}, above the limit "
            f"{max_aspect_ratio:g}"
        )
    if min_pixels > max_pixels or max_pixels < p * p:
        raise ValueError(f"bad pixel bounds min_pixels={min_pixels}, max_pixels={max_pixels} for patch {p}")
    h = max(p, round(height / p) * p)
    w = max(p, round(width / p) * p)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(p, math.floor(height / beta / p) * p)
        w = max(p, math.floor(width / beta / p) * p)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = max(p, math.ceil(height * beta / p) * p)
        w = max(p, math.ceil(width * beta / p) * p)
    # One side clamped at a single patch can still leave the area out of bounds for very thin images: shrink
    # or grow the long side alone (the short side is already one patch / the long side is the only freedom).
    while h * w > max_pixels and max(h, w) > p:
        if h >= w:
            h -= p
        else:
            w -= p
    if h * w < min_pixels and h * w + p * min(h, w) <= max_pixels:
        while h * w < min_pixels:
            if h >= w:
                h += p
            else:
                w += p
    if not (min_pixels <= h * w <= max_pixels):
        raise ValueError(
            f"image of size {height}x{width} (HxW) cannot be resized to multiples of {p} with an area in "
            f"[{min_pixels}, {max_pixels}]"
        )
    return h, w


def _to_chw_float(image: Any) -> tuple[torch.Tensor | None, Image.Image | None]:
    """Return (float tensor [3,H,W] in [0,1], None) or (None, PIL RGB image) for uint8 data."""
    if isinstance(image, Image.Image):
        return None, image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, torch.Tensor):
        arr = image.detach().cpu()
        is_torch = True
    elif isinstance(image, np.ndarray):
        arr = image
        is_torch = False
    else:
        raise TypeError(f"unsupported image type {type(image).__name__}; use PIL.Image, numpy.ndarray or torch.Tensor")
    if arr.ndim == 2:
        arr = arr[None] if is_torch else arr[:, :, None]
        channels_first = is_torch
    elif arr.ndim == 3:
        # torch tensors are CHW by convention, numpy arrays HWC; accept either when unambiguous.
        if is_torch:
            channels_first = arr.shape[0] in (1, 3, 4) or arr.shape[-1] not in (1, 3, 4)
        else:
            channels_first = arr.shape[-1] not in (1, 3, 4) and arr.shape[0] in (1, 3, 4)
    else:
        raise ValueError(f"image array must have 2 or 3 dimensions, got shape {tuple(arr.shape)}")
    t = arr if is_torch else torch.from_numpy(np.array(arr) if not arr.flags.writeable else np.ascontiguousarray(arr))
    if not channels_first:
        t = t.permute(2, 0, 1)
    c = t.shape[0]
    if c == 1:
        t = t.expand(3, -1, -1)
    elif c == 4:
        t = t[:3]
    elif c != 3:
        raise ValueError(f"image must have 1, 3 or 4 channels, got shape {tuple(arr.shape)}")
    if t.dtype == torch.uint8:
        # uint8: resize through PIL (same path as PIL inputs).
        return None, Image.fromarray(t.permute(1, 2, 0).contiguous().numpy(), mode="RGB")
    if not torch.is_floating_point(t):
        raise ValueError(f"integer images must be uint8, got {t.dtype}")
    return t.float().contiguous(), None


class VoRAImageProcessor(BaseImageProcessor):
    r"""Resize each image (aspect ratio kept) to sides that are multiples of ``patch_size`` with an area in
    ``[min_pixels, max_pixels]``, normalise with ``image_mean``/``image_std`` and cut it into patches.

    Inputs: PIL images (any mode, converted to RGB), uint8 numpy arrays (HWC) / torch tensors (CHW), or float
    arrays/tensors already scaled to [0, 1]. uint8 data is resized with PIL bicubic; float data with torch
    bicubic (antialiased).
    """

    model_input_names = ["pixel_values", "image_grid_hw"]
    valid_kwargs = VoRAImagesKwargs

    def __init__(
        self,
        patch_size: int = 14,
        min_pixels: int = 56 * 56,
        max_pixels: int = 448 * 448,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        do_resize: bool = True,
        max_aspect_ratio: float = MAX_ASPECT_RATIO,
        **kwargs,
    ):
        kwargs.pop("image_processor_type", None)
        super().__init__(**kwargs)
        self.patch_size = int(patch_size)
        self.min_pixels = int(min_pixels)
        self.max_pixels = int(max_pixels)
        self.image_mean = [float(x) for x in image_mean]
        self.image_std = [float(x) for x in image_std]
        self.do_resize = bool(do_resize)
        self.max_aspect_ratio = float(max_aspect_ratio)
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std need 3 values")
        if self.min_pixels > self.max_pixels or self.max_pixels < self.patch_size**2:
            raise ValueError(
                f"bad pixel bounds min_pixels={self.min_pixels}, max_pixels={self.max_pixels} for patch "
                f"{self.patch_size}"
            )

    # ------------------------------------------------------------------ sizes
    def get_resize_size(self, height: int, width: int) -> tuple[int, int]:
        """Target (height, width) in pixels for an input of ``height`` x ``width``."""
        if not self.do_resize:
            p = self.patch_size
            if height % p or width % p:
                raise ValueError(
                    f"image of size {height}x{width} (HxW) is not a multiple of patch_size={p} and do_resize=False"
                )
            return height, width
        return smart_resize(
            height, width, self.patch_size, self.min_pixels, self.max_pixels, self.max_aspect_ratio
        )

    def get_grid_hw(self, height: int, width: int) -> tuple[int, int]:
        """(grid rows, grid cols) the processor will produce for an input of ``height`` x ``width``."""
        h, w = self.get_resize_size(height, width)
        return h // self.patch_size, w // self.patch_size

    # ------------------------------------------------------------- processing
    def _resize_hwc(self, image: Any) -> tuple[torch.Tensor, bool]:
        """One image → (resized tensor [H, W, 3], is_uint8). uint8 data stays 0..255; float data is in [0, 1]."""
        t, pil = _to_chw_float(image)
        if pil is not None:
            w0, h0 = pil.size
            h, w = self.get_resize_size(h0, w0)
            if (h, w) != (h0, w0):
                pil = pil.resize((w, h), resample=Image.Resampling.BICUBIC)
            return torch.from_numpy(np.array(pil, dtype=np.uint8)), True
        h0, w0 = t.shape[-2:]
        h, w = self.get_resize_size(h0, w0)
        if (h, w) != (h0, w0):
            t = F.interpolate(t[None], size=(h, w), mode="bicubic", align_corners=False, antialias=True)[0]
            t = t.clamp_(0.0, 1.0)
        return t.permute(1, 2, 0), False

    def process_one(self, image: Any) -> tuple[torch.Tensor, tuple[int, int]]:
        """One image → (patches ``[gh*gw, 3*p*p]``, (gh, gw))."""
        x, is_uint8 = self._resize_hwc(image)
        std = torch.tensor(self.image_std, dtype=torch.float32)
        mean = torch.tensor(self.image_mean, dtype=torch.float32)
        # (x / 255 - mean) / std as one multiply-add on the contiguous HWC layout (channels last → broadcast).
        scale = 1.0 / (std * 255.0) if is_uint8 else 1.0 / std
        x = torch.addcmul(-mean / std, x.float(), scale)
        p = self.patch_size
        h, w, _ = x.shape
        gh, gw = h // p, w // p
        pv = x.reshape(gh, p, gw, p, 3).permute(0, 2, 4, 1, 3).reshape(gh * gw, 3 * p * p)
        return pv, (gh, gw)

    def preprocess(self, images: Any, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        if kwargs:
            # Per-call overrides of the processor's own parameters (e.g. max_pixels=...).
            unknown = set(kwargs) - set(VoRAImagesKwargs.__annotations__)
            if unknown:
                raise TypeError(f"unexpected arguments for VoRAImageProcessor: {sorted(unknown)}")
            params = {k: v for k, v in self.to_dict().items() if k != "image_processor_type"}
            params.update({k: v for k, v in kwargs.items() if v is not None})
            return type(self)(**params).preprocess(images, return_tensors=return_tensors)
        flat = _flatten_images(images)
        patches, grids = [], []
        for img in flat:
            pv, g = self.process_one(img)
            patches.append(pv)
            grids.append(g)
        dim = 3 * self.patch_size**2
        pixel_values = torch.cat(patches, 0) if patches else torch.zeros(0, dim)
        image_grid_hw = torch.tensor(grids, dtype=torch.long).reshape(-1, 2)
        data = {"pixel_values": pixel_values, "image_grid_hw": image_grid_hw}
        if return_tensors in (None, "pt"):
            return BatchFeature(data=data)
        if return_tensors == "np":
            return BatchFeature(data={k: v.numpy() for k, v in data.items()})
        raise ValueError(f"return_tensors={return_tensors!r} is not supported (use 'pt' or 'np')")

    def __call__(self, images: Any, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        for k in ("_processor_class",):
            d.pop(k, None)
        return d


def _flatten_images(images: Any) -> list:
    """A single image, a list of images or a list of lists of images → flat list (in order)."""
    if images is None:
        return []
    if isinstance(images, (Image.Image, np.ndarray, torch.Tensor)):
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            return list(images)
        return [images]
    out = []
    for x in images:
        out.extend(_flatten_images(x))
    return out


VoRAImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["VoRAImageProcessor", "smart_resize", "CLIP_MEAN", "CLIP_STD"]
