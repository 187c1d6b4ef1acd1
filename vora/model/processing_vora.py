"""VoRA processor: tokenizer + :class:`VoRAImageProcessor`.

Copied verbatim into merged checkpoints (``trust_remote_code``): imports only torch, numpy, PIL, transformers
and, relatively, ``.image_processing_vora``.

* ``processor(images=..., text=...)`` — inference: each ``<image>`` placeholder in the text becomes a run of
  exactly ``gh*gw`` ``<image>`` tokens for its image (no begin/end tokens).
* ``processor.apply_chat_template(messages, ...)`` — OpenAI-style messages with ``{"type": "image", "image": ...}``
  content parts; images in the messages go to the image processor.
* ``processor.encode_conversation(messages, images, max_length=...)`` — training: ``input_ids``, ``labels``
  (−100 except assistant turns, end-of-turn token included), ``pixel_values``, ``image_grid_hw``, ``counts``.
  Raises :class:`VoRASampleError` (with a ``reason``) for samples that cannot be used.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.tokenization_utils_base import AddedToken

from .image_processing_vora import VoRAImageProcessor

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100

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


class VoRASampleError(ValueError):
    """A training sample that cannot be encoded. ``reason`` is a short machine-readable key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _load_image(obj: Any) -> Any:
    """An image given in a message part: PIL / array / tensor as is; a local path is opened."""
    if isinstance(obj, (Image.Image, np.ndarray, torch.Tensor)):
        return obj
    if isinstance(obj, dict):
        for key in ("bytes", "path"):
            if obj.get(key):
                return _load_image(obj[key])
        raise ValueError(f"image dict without 'bytes' or 'path': {sorted(obj)}")
    if isinstance(obj, (bytes, bytearray)):
        import io

        img = Image.open(io.BytesIO(obj))
        img.load()
        return img
    if isinstance(obj, str):
        path = obj[len("file://") :] if obj.startswith("file://") else obj
        if "://" in path:
            raise ValueError(f"remote image URLs are not fetched: {obj}")
        img = Image.open(os.path.expanduser(path))
        img.load()
        return img
    raise TypeError(f"unsupported image object {type(obj).__name__}")


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
            raise VoRASampleError("bad_conversation", f"message {i} is not an object")
        raw_role = msg.get("role") if msg.get("role") is not None else msg.get("from")
        role = ROLE_ALIASES.get(str(raw_role).lower()) if raw_role is not None else None
        if role is None:
            raise VoRASampleError("bad_conversation", f"message {i} has unknown role {raw_role!r}")
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
                    raise VoRASampleError("bad_conversation", f"message {i} has a content part that is not an object")
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
                    raise VoRASampleError("bad_conversation", f"message {i} has a content part of type {ptype!r}")
            text = "".join(pieces)
        else:
            raise VoRASampleError("bad_conversation", f"message {i} content is {type(content).__name__}")
        out.append({"role": role, "content": text})
    return out, images


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
        from transformers import AutoTokenizer

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

    def render(self, messages: list[dict], add_generation_prompt: bool = False, chat_template: str | None = None, **kw) -> str:
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
        tok_kwargs = dict(add_special_tokens=add_special_tokens, padding=padding, return_tensors=return_tensors, **kwargs)
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
        batched = isinstance(conversation, (list, tuple)) and len(conversation) > 0 and isinstance(conversation[0], (list, tuple))
        convs = list(conversation) if batched else [conversation]
        prompts, all_images = [], []
        for conv in convs:
            msgs, imgs = normalize_messages(conv, self.image_token)
            if any(im is None for im in imgs):
                raise ValueError("an image content part carries no image (use {'type': 'image', 'image': <PIL image>})")
            all_images.extend(_load_image(im) for im in imgs)
            prompts.append(self.render(msgs, add_generation_prompt=add_generation_prompt, chat_template=chat_template, **kwargs))
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

    # ----------------------------------------------------------- training
    def encode_conversation(
        self,
        messages: list[dict],
        images: list | None = None,
        max_length: int | None = None,
        chat_template: str | None = None,
    ) -> dict[str, Any]:
        """Encode one training conversation.

        ``messages``: ``[{"role": "system"|"user"|"assistant", "content": str | parts}]`` (LLaVA ``from``/``value``
        accepted). ``images``: loaded images in order of their placeholders; images given as content parts are
        appended to them in order. Placeholders are kept where the text has them; with none at all, they are put
        before the first user turn's text (``"<image>\\n" * n``). Labels are −100 except the tokens of assistant
        turns (their content and end-of-turn token, trailing whitespace excluded).

        ``max_length``: a sample whose image tokens alone exceed it raises ``images_exceed_max_length``; a longer
        one is cut after its last assistant turn that fits (``counts["truncated"] = 1``); if even the first
        assistant turn does not fit it is cut at ``max_length`` (moved back before an image run it would split).

        Returns ``input_ids`` [L], ``labels`` [L], ``pixel_values`` [P, 3*p*p], ``image_grid_hw`` [N, 2] (images
        cut off by truncation are dropped), ``counts`` {"truncated": 0|1}. Raises :class:`VoRASampleError`.
        """
        msgs, part_images = normalize_messages(messages, self.image_token)
        given = list(images or [])
        if any(im is None for im in part_images):
            # Parts that only mark a position take the given images in order.
            if len(given) < sum(im is None for im in part_images) :
                raise VoRASampleError(
                    "placeholder_mismatch",
                    f"{sum(im is None for im in part_images)} image parts without an image but {len(given)} images given",
                )
            it = iter(given)
            part_images = [next(it) if im is None else im for im in part_images]
            given = list(it)
        all_images = [_load_image(im) for im in part_images] + given if part_images else given
        if not msgs:
            raise VoRASampleError("bad_conversation", "empty conversation")
        if not any(m["role"] == "assistant" for m in msgs):
            raise VoRASampleError("no_assistant_turn", "conversation has no assistant turn")
        if msgs[0]["role"] == "assistant":
            raise VoRASampleError("bad_conversation", "conversation starts with an assistant turn")

        n_ph = sum(m["content"].count(self.image_token) for m in msgs)
        if n_ph == 0 and all_images:
            first_user = next((i for i, m in enumerate(msgs) if m["role"] == "user"), None)
            if first_user is None:
                raise VoRASampleError("placeholder_mismatch", "images given but the conversation has no user turn")
            msgs[first_user] = dict(msgs[first_user], content=(self.image_token + "\n") * len(all_images) + msgs[first_user]["content"])
            n_ph = len(all_images)
        if n_ph != len(all_images):
            raise VoRASampleError(
                "placeholder_mismatch", f"{n_ph} {self.image_token} placeholders but {len(all_images)} images"
            )

        # Image grids first: a sample whose images alone exceed max_length is rejected before any work.
        pv_list, grids = [], []
        for k, im in enumerate(all_images):
            try:
                pv, g = self.image_processor.process_one(im)
            except (ValueError, TypeError, OSError) as e:
                raise VoRASampleError("bad_image", f"image {k}: {e}") from e
            pv_list.append(pv)
            grids.append(g)
        n_img_tokens = [gh * gw for gh, gw in grids]
        if max_length is not None and sum(n_img_tokens) > max_length:
            raise VoRASampleError(
                "images_exceed_max_length",
                f"{len(grids)} images need {sum(n_img_tokens)} tokens > max_length={max_length}",
            )

        full, spans, turn_ends = self._assistant_char_spans(msgs, chat_template)
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids: list[int] = enc["input_ids"]
        offsets = enc["offset_mapping"]
        mask = _overlap_mask(offsets, spans)
        # Map char positions of turn ends (after assistant turns) to token positions.
        starts = [s for s, _ in offsets]
        ends_tok = [int(np.searchsorted(np.asarray(starts), c, side="left")) for c in turn_ends]

        n_tok_ph = sum(1 for t in ids if t == self.image_token_id)
        if n_tok_ph != len(grids):
            raise VoRASampleError(
                "placeholder_mismatch",
                f"the rendered conversation has {n_tok_ph} image tokens but {len(grids)} images "
                "(does the chat template add or drop placeholders?)",
            )

        # Expand placeholders; keep a map old→new positions for turn ends.
        out_ids, out_lab, img_starts = [], [], []
        new_pos = []
        k = 0
        for t, m in zip(ids, mask):
            new_pos.append(len(out_ids))
            if t == self.image_token_id:
                img_starts.append(len(out_ids))
                out_ids.extend([t] * n_img_tokens[k])
                out_lab.extend([IGNORE_INDEX] * n_img_tokens[k])
                k += 1
            else:
                out_ids.append(t)
                out_lab.append(t if m else IGNORE_INDEX)
        new_pos.append(len(out_ids))
        turn_end_tok = [new_pos[e] for e in ends_tok]

        truncated = 0
        L = len(out_ids)
        if max_length is not None and L > max_length:
            truncated = 1
            fitting = [e for e in turn_end_tok if e <= max_length and any(l != IGNORE_INDEX for l in out_lab[:e])]
            if fitting:
                cut = max(fitting)
            else:
                cut = max_length
                for s, n in zip(img_starts, n_img_tokens):
                    if s < cut < s + n:
                        cut = s
                if not any(l != IGNORE_INDEX for l in out_lab[:cut]):
                    raise VoRASampleError(
                        "no_labels_after_truncation",
                        f"{L} tokens > max_length={max_length} and no assistant token fits",
                    )
            out_ids, out_lab = out_ids[:cut], out_lab[:cut]
            keep = sum(1 for s in img_starts if s < cut)
            pv_list, grids = pv_list[:keep], grids[:keep]

        dim = 3 * self.image_processor.patch_size**2
        return {
            "input_ids": torch.tensor(out_ids, dtype=torch.long),
            "labels": torch.tensor(out_lab, dtype=torch.long),
            "pixel_values": (pv_list[0] if len(pv_list) == 1 else torch.cat(pv_list, 0)) if pv_list else torch.zeros(0, dim),
            "image_grid_hw": torch.tensor(grids, dtype=torch.long).reshape(-1, 2),
            "counts": {"truncated": truncated},
        }

    def _assistant_char_spans(self, msgs: list[dict], chat_template: str | None):
        """Render the conversation and find, by incremental prefix rendering, the character span of every
        assistant turn (``[start of content, end of turn)``, trailing whitespace excluded) and the end of each
        assistant turn in the full text."""
        def render(ms, gen=False):
            try:
                return self.render(ms, add_generation_prompt=gen, chat_template=chat_template)
            except Exception as e:  # jinja raise_exception(...) in templates, e.g. roles that must alternate
                raise VoRASampleError("template_error", f"chat template failed: {type(e).__name__}: {e}") from e

        full = render(msgs)
        spans, ends = [], []
        search_from = 0
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prefix = render(msgs[:i], gen=True)
            upto = render(msgs[: i + 1])
            if full.startswith(upto) and upto.startswith(prefix) and len(prefix) >= search_from:
                start, end_turn = len(prefix), len(upto)
            else:
                # Template is not prefix-stable (e.g. rewrites earlier turns): find the content itself.
                start = full.find(m["content"], search_from) if m["content"] else -1
                if start < 0:
                    raise VoRASampleError(
                        "template_error", f"cannot locate assistant turn {i} in the rendered conversation"
                    )
                end_turn = start + len(m["content"])
                eot = self._end_of_turn_string(chat_template)
                if eot and full.startswith(eot, end_turn):
                    end_turn += len(eot)
            # The labelled span ends with the end-of-turn token (text the template adds after it, such as a
            # newline or an end-of-conversation footer, is not something the model generates); templates without
            # a known end-of-turn string keep the whole turn up to its trailing whitespace.
            seg = full[start:end_turn]
            eot = self._end_of_turn_string(chat_template)
            cut = seg.find(eot, len(m["content"]) if seg.startswith(m["content"]) else 0) if eot else -1
            end = start + (cut + len(eot) if cut >= 0 else len(seg.rstrip()))
            spans.append((start, end))
            ends.append(end_turn)
            search_from = end_turn
        return full, spans, ends

    def _end_of_turn_string(self, chat_template: str | None = None) -> str | None:
        tmpl = self.get_chat_template(chat_template)
        for cand in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
            if cand in tmpl:
                return cand
        return self.tokenizer.eos_token


def _overlap_mask(offsets, spans) -> list[bool]:
    """True for every token whose character range overlaps one of the (sorted) spans."""
    mask = [False] * len(offsets)
    j = 0
    for t, (s, e) in enumerate(offsets):
        while j < len(spans) and s >= spans[j][1]:
            j += 1
        if j == len(spans):
            break
        if e > spans[j][0] and e > s:
            mask[t] = True
    return mask


# Saved processors carry this file (and image_processing_vora.py) plus an ``auto_map``, so that
# ``AutoProcessor.from_pretrained(dir, trust_remote_code=True)`` works without the vora package.
VoRAProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["VoRAProcessor", "VoRASampleError", "normalize_messages", "IMAGE_TOKEN", "CHATML_TEMPLATE"]
