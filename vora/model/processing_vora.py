"""VoRA processor: tokenizer + :class:`VoRAImageProcessor`, for inference.

Copied verbatim into merged checkpoints (``trust_remote_code``): imports only torch, numpy, PIL, transformers
and, relatively, ``.image_processing_vora``.

* ``processor(images=..., text=...)``: each ``<image>`` placeholder in the text becomes a run of exactly
  ``gh*gw`` ``<image>`` tokens for its image (no begin/end tokens).
* ``processor.apply_chat_template(messages, ...)``: OpenAI-style messages with ``{"type": "image", "image": ...}``
  content parts; images in the messages go to the image processor.

Training labels (conversation → ``input_ids``/``labels``) are not shipped: see ``vora.conversation``.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import load_image
from transformers.processing_utils import ProcessorMixin
from transformers.tokenization_utils_base import AddedToken

from .image_processing_vora import VoRAImageProcessor

IMAGE_TOKEN = "<image>"

# Used when neither the processor nor the tokenizer has a chat template (e.g. a base LLM).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")

ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "system": "system",
}


def open_image(image: Any, image_root: str | None = None) -> Any:
    """One image reference → an image the image processor takes (the one opener, for inference and training).

    PIL images, arrays and tensors are returned as they are. Bytes and ``{"bytes", "path"}`` dicts (🤗 ``Image``
    feature) are decoded, and a local path (``file://`` allowed, relative to ``image_root`` when given) is opened,
    with transformers' ``load_image`` (EXIF orientation applied, RGB). Remote URLs are never fetched.

    Raises ``FileNotFoundError`` when there is nothing to open (no such file, a URL, an empty reference), ``ValueError``
    for data PIL cannot decode and ``TypeError`` for other values; the message names the path.
    """
    if isinstance(image, (Image.Image, np.ndarray, torch.Tensor)):
        return image
    if isinstance(image, dict):
        if image.get("bytes"):
            return open_image(image["bytes"])
        if image.get("path"):
            return open_image(image["path"], image_root)
        raise FileNotFoundError("image entry without bytes or path")
    if isinstance(image, (bytes, bytearray)):
        try:
            return load_image(Image.open(io.BytesIO(image)))
        except Exception as e:  # PIL raises many types
            raise ValueError(f"undecodable image bytes ({len(image)} B): {e}") from e
    if isinstance(image, str):
        if "://" in image and not image.startswith("file://"):
            raise FileNotFoundError(f"remote image {image} (URLs are not fetched)")
        path = os.path.expanduser(image.removeprefix("file://"))
        if image_root and not os.path.isabs(path):
            path = os.path.join(image_root, path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image not found: {path}")
        try:
            return load_image(path)
        except Exception as e:
            raise ValueError(f"cannot read image {path}: {e}") from e
    if image is None:
        raise FileNotFoundError("null image reference")
    raise TypeError(f"unsupported image value of type {type(image).__name__}")


def _part_image(part: dict) -> Any:
    """The image object of an image content part, or None when the part only marks a position."""
    for key in ("image", "path", "url", "image_url"):
        val = part.get(key)
        if val is None:
            continue
        if isinstance(val, dict) and "url" in val:
            val = val["url"]
        return val
    return None


def normalize_messages(messages: list[dict], image_token: str = IMAGE_TOKEN) -> tuple[list[dict], list]:
    """OpenAI-style / LLaVA-style messages → ``[{"role", "content": str}]`` with ``image_token`` placeholders,
    plus the image objects found in content parts (in order; ``None`` for parts that carry no image).

    Content may be a string or a list of parts ``{"type": "text", "text": ...}`` /
    ``{"type": "image", "image": ...}`` (also ``image_url``). An image part followed by text is separated from
    it by a newline, as in LLaVA's ``"<image>\\n..."``.
    """
    out, images = [], []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"message {i} is not an object")
        raw_role = msg.get("role") if msg.get("role") is not None else msg.get("from")
        role = ROLE_ALIASES.get(str(raw_role).lower()) if raw_role is not None else None
        if role is None:
            raise ValueError(f"message {i} has unknown role {raw_role!r}")
        content = msg.get("content") if msg.get("content") is not None else msg.get("value")
        if content is None:
            content = ""
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            pieces: list[str] = []
            prev_image = False
            for part in content:
                if isinstance(part, str):
                    part = {"type": "text", "text": part}
                if not isinstance(part, dict):
                    raise ValueError(f"message {i} has a content part that is not an object")
                ptype = part.get("type")
                if ptype in ("image", "image_url"):
                    pieces.append(image_token)
                    images.append(_part_image(part))
                    prev_image = True
                elif ptype == "text" or (ptype is None and "text" in part):
                    t = part.get("text") or ""
                    if prev_image and t and not t[0].isspace():
                        pieces.append("\n")
                    pieces.append(t)
                    prev_image = False
                else:
                    raise ValueError(f"message {i} has a content part of type {ptype!r}")
            text = "".join(pieces)
        else:
            raise ValueError(f"message {i} content is {type(content).__name__}")
        out.append({"role": role, "content": text})
    return out, images


CONTENT_PARTS_MARK = "{#- vora: content parts rendered as normalize_messages renders them -#}"


def with_content_parts(template: str, image_token: str = IMAGE_TOKEN) -> str:
    """``template`` preceded by a Jinja prologue that turns list content (OpenAI-style parts, as serving engines
    pass them) into the string :func:`normalize_messages` makes: ``image_token`` per image part, a newline
    between an image and text that follows it, texts concatenated. String content passes through, so prompts
    rendered from strings are unchanged. Why: vLLM renders chat requests with the tokenizer's template and, for a
    template that only takes strings, puts every image first; for this one it passes the parts in order, so a
    chat request renders exactly as ``VoRAProcessor.apply_chat_template`` does. Idempotent."""
    if template.startswith(CONTENT_PARTS_MARK):
        return template
    image = json.dumps(image_token)  # a valid Jinja string literal
    prologue = (
        "{%- set vora_ns = namespace(messages=[]) -%}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is string or message['content'] is none -%}"
        "{%- set vora_ns.messages = vora_ns.messages + [message] -%}"
        "{%- else -%}"
        "{%- set parts_ns = namespace(text='', after_image=false) -%}"
        "{%- for part in message['content'] -%}"
        "{%- if part is string -%}{%- set part = {'type': 'text', 'text': part} -%}{%- endif -%}"
        "{%- if part['type'] in ['image', 'image_url'] -%}"
        "{%- set parts_ns.text = parts_ns.text + " + image + " -%}{%- set parts_ns.after_image = true -%}"
        "{%- elif part['type'] == 'text' or (part['type'] is not defined and part['text'] is defined) -%}"
        "{%- set text = part['text'] or '' -%}"
        "{%- if parts_ns.after_image and text and not text[0].isspace() -%}"
        "{%- set parts_ns.text = parts_ns.text + '\\n' -%}"
        "{%- endif -%}"
        "{%- set parts_ns.text = parts_ns.text + text -%}{%- set parts_ns.after_image = false -%}"
        "{%- else -%}"
        "{{- raise_exception('VoRA: unsupported content part type ' ~ part['type'] ~ ' (use text or image)') -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set vora_ns.messages = vora_ns.messages + [dict(message, content=parts_ns.text)] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set messages = vora_ns.messages -%}\n"
    )
    return CONTENT_PARTS_MARK + prologue + template


class VoRAProcessor(ProcessorMixin):
    r"""Tokenizer + :class:`VoRAImageProcessor`. ``<image>`` is a special token of the tokenizer (added when
    missing; then the LLM's embedding matrix must be resized to ``len(processor.tokenizer)``)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = IMAGE_TOKEN
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self._ensure_special_tokens()

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        """Load the sub-processors without going through ``AutoImageProcessor`` (which does not know the VoRA
        image processor unless it is registered): the image processor from the ``image_processor`` entry of
        ``processor_config.json`` (or from ``preprocessor_config.json``), the tokenizer with ``AutoTokenizer``."""
        ip_names = set(VoRAImageProcessor.valid_kwargs.__annotations__) | {
            "patch_size", "min_pixels", "max_pixels", "image_mean", "image_std", "do_resize", "max_aspect_ratio"
        }
        ip_overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in ip_names}
        ip_cfg = (processor_dict or {}).get("image_processor")
        if isinstance(ip_cfg, dict):
            cfg = {k: v for k, v in ip_cfg.items() if k not in ("auto_map", "image_processor_type")}
            image_processor = VoRAImageProcessor(**{**cfg, **ip_overrides})
        else:
            image_processor = VoRAImageProcessor.from_pretrained(pretrained_model_name_or_path, **ip_overrides)
        tok_kwargs = {k: v for k, v in kwargs.items() if k not in ("processor_dict",)}
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **tok_kwargs)
        return [image_processor, tokenizer]

    # ------------------------------------------------------------ tokens
    def _ensure_special_tokens(self):
        tok = self.tokenizer
        new = []
        if tok.convert_tokens_to_ids(self.image_token) in (None, tok.unk_token_id):
            new.append(self.image_token)
        if self._template_source() == "fallback":
            for t in CHATML_SPECIAL_TOKENS:
                if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id):
                    new.append(t)
        if new:
            tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in new], special_tokens=True)
        self.image_token_id = tok.convert_tokens_to_ids(self.image_token)
        if tok.pad_token_id is None:
            # A pad id is needed for batching; use the end-of-sequence token as most chat LLMs do.
            if tok.eos_token is not None:
                tok.pad_token = tok.eos_token

    @property
    def pad_token_id(self) -> int | None:
        return self.tokenizer.pad_token_id

    @property
    def patch_size(self) -> int:
        return self.image_processor.patch_size

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_grid_hw"]

    # ---------------------------------------------------------- templates
    def _template_source(self) -> str:
        if isinstance(self.chat_template, str) and self.chat_template:
            return "processor"
        if getattr(self.tokenizer, "chat_template", None):
            return "tokenizer"
        return "fallback"

    def get_chat_template(self, chat_template: str | None = None) -> str:
        """Template used: the argument, else the processor's, else the tokenizer's, else ChatML."""
        if chat_template:
            return chat_template
        src = self._template_source()
        if src == "processor":
            return self.chat_template
        if src == "tokenizer":
            tmpl = self.tokenizer.chat_template
            if isinstance(tmpl, dict):
                tmpl = tmpl.get("default") or next(iter(tmpl.values()))
            return tmpl
        return CHATML_TEMPLATE

    def render(
        self, messages: list[dict], add_generation_prompt: bool = False, chat_template: str | None = None, **kw
    ) -> str:
        """Render string-content messages with the chat template (no tokenization)."""
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.get_chat_template(chat_template),
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **kw,
        )

    # ---------------------------------------------------------- inference
    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        padding_side: str | None = None,
        add_special_tokens: bool = True,
        **kwargs,
    ) -> BatchFeature:
        """Tokenize ``text`` (with ``<image>`` placeholders) and process ``images`` (flat list in order of
        appearance over all texts, or one list per text). Each placeholder is expanded to ``gh*gw`` image
        tokens. Returns ``input_ids``, ``attention_mask`` and, when images are given, ``pixel_values`` and
        ``image_grid_hw``."""
        if text is None:
            raise ValueError("VoRAProcessor needs text (use processor.image_processor for images alone)")
        texts = [text] if isinstance(text, str) else list(text)
        n_placeholders = [t.count(self.image_token) for t in texts]
        image_out = None
        grid: list[tuple[int, int]] = []
        if images is not None:
            image_out = self.image_processor(images, return_tensors="pt")
            grid = [tuple(g) for g in image_out["image_grid_hw"].tolist()]
        if sum(n_placeholders) != len(grid):
            raise ValueError(
                f"the text has {sum(n_placeholders)} {self.image_token} placeholders but {len(grid)} images were given"
            )
        expanded, k = [], 0
        for t in texts:
            pieces = t.split(self.image_token)
            buf = [pieces[0]]
            for piece in pieces[1:]:
                gh, gw = grid[k]
                k += 1
                buf.append(self.image_token * (gh * gw))
                buf.append(piece)
            expanded.append("".join(buf))
        tok_kwargs = dict(
            add_special_tokens=add_special_tokens, padding=padding, return_tensors=return_tensors, **kwargs
        )
        if padding_side is not None:
            tok_kwargs["padding_side"] = padding_side
        enc = self.tokenizer(expanded if len(expanded) > 1 or not isinstance(text, str) else expanded[0], **tok_kwargs)
        data = dict(enc)
        if image_out is not None:
            if return_tensors == "pt" or return_tensors is None:
                data.update(pixel_values=image_out["pixel_values"], image_grid_hw=image_out["image_grid_hw"])
            else:
                data.update({k2: v.numpy() for k2, v in image_out.items()})
        return BatchFeature(data=data, tensor_type=None)

    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors: str | None = None,
        padding_side: str | None = None,
        **kwargs,
    ):
        """Render OpenAI-style messages (content parts ``{"type": "image", "image": PIL|array|path}`` and
        ``{"type": "text", "text": ...}``). ``tokenize=False`` → the prompt string(s); ``tokenize=True`` → the
        processor's output for the prompt(s) and the images found in the messages (a ``BatchFeature`` when
        ``return_dict``, else ``input_ids``)."""
        batched = (
            isinstance(conversation, (list, tuple)) and len(conversation) > 0
            and isinstance(conversation[0], (list, tuple))
        )
        convs = list(conversation) if batched else [conversation]
        prompts, all_images = [], []
        for conv in convs:
            msgs, imgs = normalize_messages(conv, self.image_token)
            if any(im is None for im in imgs):
                raise ValueError("an image content part carries no image (use {'type': 'image', 'image': <PIL image>})")
            all_images.extend(open_image(im) for im in imgs)
            prompts.append(
                self.render(msgs, add_generation_prompt=add_generation_prompt, chat_template=chat_template, **kwargs)
            )
        if not tokenize:
            return prompts if batched else prompts[0]
        out = self(
            images=all_images or None,
            text=prompts if batched else prompts[0],
            return_tensors=return_tensors or "pt",
            padding_side=padding_side,
            add_special_tokens=False,
        )
        if return_tensors is None:
            # Mirror the tokenizer: lists when no tensor type was asked for (images stay tensors).
            out = BatchFeature({k: (v.tolist() if k in ("input_ids", "attention_mask") else v) for k, v in out.items()})
            if not batched:
                out["input_ids"] = out["input_ids"][0]
                out["attention_mask"] = out["attention_mask"][0]
        return out if return_dict else out["input_ids"]


# Saved processors carry this file (and image_processing_vora.py) plus an ``auto_map``, so that
# ``AutoProcessor.from_pretrained(dir, trust_remote_code=True)`` works without the vora package.
VoRAProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "VoRAProcessor", "normalize_messages", "with_content_parts", "open_image", "IMAGE_TOKEN", "CHATML_TEMPLATE",
]
