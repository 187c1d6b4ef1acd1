"""Samples → the batch contract of DEVELOPERS.md (padding, optional greedy packing).

A sample is a dict with ``input_ids`` [L] long, ``labels`` [L] long, ``pixel_values`` [P, 3*p*p] and
``image_grid_hw`` [N, 2] (what ``vora.conversation.encode_conversation`` / ``VoRADataset`` return). ``None``
entries are samples the dataset skipped (already counted there, see ``vora.data``); they are dropped here.

Batch:

* ``input_ids`` [B, L] long, ``labels`` [B, L] long (−100 on padding)
* ``attention_mask`` [B, L] long: 0 on padding, else the segment id (1 unless packed; packed samples 1, 2, …)
* ``position_ids`` [B, L] long — only when packing: restart at 0 for each packed sample, 0 on padding
* ``pixel_values`` [P, 3*p*p] float and ``image_grid_hw`` [N, 2] long: all images of the batch in order of
  appearance (row-major over the batch, then position); ``[0, 3*p*p]`` / ``[0, 2]`` for text-only batches.
* ``num_label_tokens`` int and, with ``image_token_id``, ``image_grid_list`` (``image_grid_hw`` as a tuple of
  ``(gh, gw)`` int pairs): host-side geometry, plain Python so the Trainer leaves it on the host. The model sizes
  its gathers from them instead of reading the device back (see ``VoRAForTraining.forward``). ``image_grid_list``
  is only sent after each sample's ``<image>`` tokens were checked against its grids here, on the CPU copy.

If every sample of a batch was skipped, the collator returns a one-row, one-token batch (the pad token,
segment 1) with no label tokens, so that every rank still takes the step; the loss must treat zero label tokens
as contributing zero.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

IGNORE_INDEX = -100


class VoRACollator:
    """``VoRACollator(pad_token_id, padding_side="right", max_length=None, packing=False)``.

    * ``max_length``: without packing, samples longer than this raise (the dataset truncates, the collator
      never cuts); with packing, the capacity of a packed row (required).
    * ``packing``: first-fit greedy packing of the samples, in order, into rows of at most ``max_length``
      tokens. The first label of every packed sample is set to −100 (it is never predicted in the unpacked case
      either, since the model shifts labels), so no sample is trained to continue the previous one.
    * ``pad_to_multiple_of``: round the padded length up.
    * ``patch_size``: only used for the shape of an empty ``pixel_values`` when no sample gives one.
    * ``image_token_id``: check every sample's placeholder count against its image grids (a clear error naming
      the sample) and send ``image_grid_list``, which lets the model skip that check on the device.
    """

    def __init__(
        self,
        pad_token_id: int,
        padding_side: str = "right",
        max_length: int | None = None,
        packing: bool = False,
        pad_to_multiple_of: int | None = None,
        patch_size: int = 14,
        image_token_id: int | None = None,
    ):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if packing and not max_length:
            raise ValueError("packing needs max_length (the capacity of a packed row)")
        if pad_token_id is None:
            raise ValueError("pad_token_id is required")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.max_length = max_length
        self.packing = packing
        self.pad_to_multiple_of = pad_to_multiple_of
        self.patch_size = patch_size
        self.image_token_id = image_token_id

    # ------------------------------------------------------------------
    def pack(self, lengths: Sequence[int]) -> list[list[int]]:
        """First-fit: sample indices per row, each row's total length ≤ max_length, order kept within rows."""
        rows: list[list[int]] = []
        room: list[int] = []
        for i, n in enumerate(lengths):
            if n > self.max_length:
                raise ValueError(f"sample of {n} tokens exceeds max_length={self.max_length}")
            for r, free in enumerate(room):
                if n <= free:
                    rows[r].append(i)
                    room[r] -= n
                    break
            else:
                rows.append([i])
                room.append(self.max_length - n)
        return rows

    def __call__(self, samples: Sequence[dict[str, Any] | None]) -> dict[str, torch.Tensor]:
        kept = [s for s in samples if s is not None]
        dim = next((s["pixel_values"].shape[1] for s in kept if "pixel_values" in s), 3 * self.patch_size**2)
        if not kept:
            batch = {
                "input_ids": torch.full((1, 1), self.pad_token_id, dtype=torch.long),
                "attention_mask": torch.ones(1, 1, dtype=torch.long),
                "labels": torch.full((1, 1), IGNORE_INDEX, dtype=torch.long),
                "pixel_values": torch.zeros(0, dim),
                "image_grid_hw": torch.zeros(0, 2, dtype=torch.long),
            }
            return {**batch, **self.host_geometry(kept, batch)}
        lengths = [int(s["input_ids"].shape[0]) for s in kept]
        if self.packing:
            rows = self.pack(lengths)
        else:
            if self.max_length is not None:
                for n in lengths:
                    if n > self.max_length:
                        raise ValueError(f"sample of {n} tokens exceeds max_length={self.max_length}")
            rows = [[i] for i in range(len(kept))]

        row_len = [sum(lengths[i] for i in r) for r in rows]
        L = max(row_len)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            L = (L + m - 1) // m * m
        B = len(rows)
        input_ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros(B, L, dtype=torch.long)
        position_ids = torch.zeros(B, L, dtype=torch.long)
        pixel_values, grids = [], []
        for b, r in enumerate(rows):
            pos = L - row_len[b] if self.padding_side == "left" else 0
            for seg, i in enumerate(r, start=1):
                s, n = kept[i], lengths[i]
                input_ids[b, pos : pos + n] = s["input_ids"]
                lab = s["labels"].clone()
                if self.packing:
                    lab[0] = IGNORE_INDEX
                labels[b, pos : pos + n] = lab
                attention_mask[b, pos : pos + n] = seg
                position_ids[b, pos : pos + n] = torch.arange(n)
                pos += n
                if "pixel_values" in s and s["pixel_values"].shape[0]:
                    pixel_values.append(s["pixel_values"])
                    grids.append(s["image_grid_hw"])
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": torch.cat(pixel_values, 0) if pixel_values else torch.zeros(0, dim),
            "image_grid_hw": torch.cat(grids, 0).long() if grids else torch.zeros(0, 2, dtype=torch.long),
        }
        if self.packing:
            batch["position_ids"] = position_ids
        batch.update(self.host_geometry(kept, batch))
        return batch

    def host_geometry(self, kept, batch) -> dict:
        """Plain-Python facts about the batch, computed once here on the CPU (see the module docstring)."""
        out = {"num_label_tokens": int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())}
        if self.image_token_id is not None:
            for i, s in enumerate(kept):
                grid = s.get("image_grid_hw")
                want = 0 if grid is None else int((grid[:, 0] * grid[:, 1]).sum())
                got = int((s["input_ids"] == self.image_token_id).sum())
                if got != want:
                    raise ValueError(
                        f"collator: sample {i} of the batch has {got} '<image>' tokens but its image grids have {want} "
                        "patches; encode samples with VoRAProcessor so placeholders match the images"
                    )
            out["image_grid_list"] = tuple(tuple(int(x) for x in hw) for hw in batch["image_grid_hw"].tolist())
        return out


__all__ = ["VoRACollator", "IGNORE_INDEX"]
