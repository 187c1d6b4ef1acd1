"""One training conversation → ``input_ids``, ``labels``, ``pixel_values``, ``image_grid_hw``.

The one owner of the way from a conversation to tokens: messages are normalised, images bound to their
placeholders and opened, the chat template rendered and the assistant turns labelled here, once. ``vora.data``
reads records and hands them on; the processor that ships in checkpoints only renders and tokenizes for inference.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .collator import IGNORE_INDEX
from .model.processing_vora import VoRAProcessor, normalize_messages, open_image


class SampleError(ValueError):
    """A training sample that cannot be used; ``reason`` is one of ``vora.data.SKIP_REASONS``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def encode_conversation(
    processor: VoRAProcessor,
    messages: list[dict],
    images: list | None = None,
    max_length: int | None = None,
    chat_template: str | None = None,
    *,
    image_root: str | None = None,
    field: str = "messages",
    images_field: str = "images",
) -> dict[str, Any]:
    """Encode one training conversation.

    ``messages``: ``[{"role": "system"|"user"|"assistant", "content": str | parts}]`` (LLaVA ``from``/``value``
    accepted; see ``normalize_messages``). ``images``: images or references to them (paths relative to
    ``image_root``, bytes, ``{"bytes", "path"}``; see ``open_image``); image content parts without an image take
    them in order, the rest follow the images the parts carry. Placeholders are kept where the text has them; with
    none at all, they are put before the first user turn's text (``"<image>\\n" * n``). Labels are −100 except the
    tokens of assistant turns (their content and end-of-turn token, trailing whitespace excluded).

    ``max_length``: a sample whose image tokens alone exceed it raises ``images_exceed_max_length``; a longer
    one is cut after its last assistant turn that fits (``counts["truncated"] = 1``); if even the first
    assistant turn does not fit it is cut at ``max_length`` (moved back before an image run it would split).

    ``field`` / ``images_field`` name the record fields in error messages. Returns ``input_ids`` [L], ``labels``
    [L], ``pixel_values`` [P, 3*p*p], ``image_grid_hw`` [N, 2] (images cut off by truncation are dropped), ``counts``
    {"truncated": 0|1}. Raises :class:`SampleError`; the checks that need no image come before any image is opened.
    """
    msgs, refs = bind_images(messages, images, processor.image_token, field, images_field)
    opened = [_open(ref, image_root, name) for ref, name in refs]
    pv_list, grids = [], []
    for im, (_, name) in zip(opened, refs):
        try:
            pv, g = processor.image_processor.process_one(im)
        except (ValueError, TypeError, OSError) as e:
            raise SampleError("bad_image", f"{name}: {e}") from e
        pv_list.append(pv)
        grids.append(g)
    n_img_tokens = [gh * gw for gh, gw in grids]
    if max_length is not None and sum(n_img_tokens) > max_length:
        raise SampleError(
            "images_exceed_max_length",
            f"{len(grids)} images need {sum(n_img_tokens)} tokens > max_length={max_length}",
        )

    ids, labels, img_starts, turn_ends = _tokens_and_labels(processor, msgs, n_img_tokens, chat_template)

    truncated = 0
    if max_length is not None and len(ids) > max_length:
        truncated = 1
        cut = _cut_point(labels, turn_ends, img_starts, n_img_tokens, max_length)
        ids, labels = ids[:cut], labels[:cut]
        keep = sum(1 for s in img_starts if s < cut)
        pv_list, grids = pv_list[:keep], grids[:keep]

    dim = 3 * processor.image_processor.patch_size**2
    pixel_values = (pv_list[0] if len(pv_list) == 1 else torch.cat(pv_list, 0)) if pv_list else torch.zeros(0, dim)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "pixel_values": pixel_values,
        "image_grid_hw": torch.tensor(grids, dtype=torch.long).reshape(-1, 2),
        "counts": {"truncated": truncated},
    }


def bind_images(
    messages: Any, images: list | None, image_token: str, field: str = "messages", images_field: str = "images"
) -> tuple[list[dict], list[tuple[Any, str]]]:
    """Messages → (string-content messages with one ``image_token`` per image, ``[(image reference, field name)]``
    in placeholder order). Image parts without an image take ``images`` in order; the remaining ``images`` follow.
    Raises :class:`SampleError` for a conversation that cannot train (no image is opened here)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise SampleError("bad_conversation", f"field {field!r} is not a non-empty list")
    try:
        msgs, part_images = normalize_messages(messages, image_token)
    except ValueError as e:
        raise SampleError("bad_conversation", f"{field}: {e}") from e
    given = list(images or [])
    refs: list[tuple[Any, str]] = []
    taken = 0
    for k, im in enumerate(part_images):
        if im is not None:
            refs.append((im, f"{field} image part {k}"))
        elif taken < len(given):
            refs.append((given[taken], f"{images_field}[{taken}]"))
            taken += 1
        else:
            raise SampleError("placeholder_mismatch", f"{field}: more image parts than entries in {images_field!r}")
    refs += [(given[j], f"{images_field}[{j}]" if len(given) > 1 else images_field) for j in range(taken, len(given))]

    if not any(m["role"] == "assistant" for m in msgs):
        raise SampleError("no_assistant_turn", f"{field}: no assistant turn")
    if msgs[0]["role"] == "assistant":
        raise SampleError("bad_conversation", f"{field}: starts with an assistant turn")
    n_ph = sum(m["content"].count(image_token) for m in msgs)
    if n_ph == 0 and refs:
        first_user = next((i for i, m in enumerate(msgs) if m["role"] == "user"), None)
        if first_user is None:
            raise SampleError("placeholder_mismatch", f"{field}: images given but the conversation has no user turn")
        placeholders = (image_token + "\n") * len(refs)
        msgs[first_user] = dict(msgs[first_user], content=placeholders + msgs[first_user]["content"])
    elif n_ph != len(refs):
        raise SampleError("placeholder_mismatch", f"{field}: {n_ph} {image_token} placeholders but {len(refs)} images")
    return msgs, refs


def _open(ref: Any, image_root: str | None, name: str) -> Any:
    """``open_image`` with the skip reasons of the data pipeline and the field name in the message."""
    try:
        return open_image(ref, image_root)
    except FileNotFoundError as e:
        raise SampleError("image_missing", f"{name}: {e}") from e
    except (ValueError, TypeError, OSError) as e:
        raise SampleError("image_unreadable", f"{name}: {e}") from e


def _tokens_and_labels(processor: VoRAProcessor, msgs: list[dict], n_img_tokens: list[int], chat_template):
    """Render and tokenize ``msgs``, label the assistant spans and expand each ``<image>`` token to its image's run.
    Returns (ids, labels, start of each image run, end of each assistant turn), positions after expansion."""
    full, spans, turn_ends = _assistant_char_spans(processor, msgs, chat_template)
    enc = processor.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    offsets = enc["offset_mapping"]
    mask = _overlap_mask(offsets, spans)
    # Char positions of turn ends → token positions.
    starts = np.asarray([s for s, _ in offsets])
    ends_tok = [int(np.searchsorted(starts, c, side="left")) for c in turn_ends]

    image_id = processor.image_token_id
    n_tok_ph = sum(1 for t in ids if t == image_id)
    if n_tok_ph != len(n_img_tokens):
        raise SampleError(
            "placeholder_mismatch",
            f"the rendered conversation has {n_tok_ph} image tokens but {len(n_img_tokens)} images "
            "(does the chat template add or drop placeholders?)",
        )

    out_ids, out_lab, img_starts, new_pos = [], [], [], []
    k = 0
    for t, m in zip(ids, mask):
        new_pos.append(len(out_ids))
        if t == image_id:
            img_starts.append(len(out_ids))
            out_ids.extend([t] * n_img_tokens[k])
            out_lab.extend([IGNORE_INDEX] * n_img_tokens[k])
            k += 1
        else:
            out_ids.append(t)
            out_lab.append(t if m else IGNORE_INDEX)
    new_pos.append(len(out_ids))
    return out_ids, out_lab, img_starts, [new_pos[e] for e in ends_tok]


def _cut_point(labels: list[int], turn_ends: list[int], img_starts: list[int], n_img_tokens: list[int],
               max_length: int) -> int:
    """Where a sample longer than ``max_length`` is cut: after its last assistant turn that fits, else at
    ``max_length`` moved back before an image run it would split."""
    fitting = [e for e in turn_ends if e <= max_length and any(x != IGNORE_INDEX for x in labels[:e])]
    if fitting:
        return max(fitting)
    cut = max_length
    for s, n in zip(img_starts, n_img_tokens):
        if s < cut < s + n:
            cut = s
    if not any(x != IGNORE_INDEX for x in labels[:cut]):
        raise SampleError(
            "no_labels_after_truncation", f"{len(labels)} tokens > max_length={max_length} and no assistant token fits"
        )
    return cut


def _assistant_char_spans(processor: VoRAProcessor, msgs: list[dict], chat_template: str | None):
    """Render the conversation and find, by incremental prefix rendering, the character span of every
    assistant turn (``[start of content, end of turn)``, trailing whitespace excluded) and the end of each
    assistant turn in the full text."""

    def render(ms, gen=False):
        try:
            return processor.render(ms, add_generation_prompt=gen, chat_template=chat_template)
        except Exception as e:  # jinja raise_exception(...) in templates, e.g. roles that must alternate
            raise SampleError("template_error", f"chat template failed: {type(e).__name__}: {e}") from e

    full = render(msgs)
    eot = _end_of_turn_string(processor, chat_template)
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
                raise SampleError("template_error", f"cannot locate assistant turn {i} in the rendered conversation")
            end_turn = start + len(m["content"])
            if eot and full.startswith(eot, end_turn):
                end_turn += len(eot)
        # The labelled span ends with the end-of-turn token (text the template adds after it, such as a
        # newline or an end-of-conversation footer, is not something the model generates); templates without
        # a known end-of-turn string keep the whole turn up to its trailing whitespace.
        seg = full[start:end_turn]
        cut = seg.find(eot, len(m["content"]) if seg.startswith(m["content"]) else 0) if eot else -1
        end = start + (cut + len(eot) if cut >= 0 else len(seg.rstrip()))
        spans.append((start, end))
        ends.append(end_turn)
        search_from = end_turn
    return full, spans, ends


def _end_of_turn_string(processor: VoRAProcessor, chat_template: str | None = None) -> str | None:
    tmpl = processor.get_chat_template(chat_template)
    for cand in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        if cand in tmpl:
            return cand
    return processor.tokenizer.eos_token


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


__all__ = ["encode_conversation", "bind_images", "SampleError"]
