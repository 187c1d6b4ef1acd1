"""Device → host reads on the training hot path are counted and pinned.

On CPU nothing syncs, so every Python-level way a tensor's value reaches the host (`.item()`, `.tolist()`,
`bool()` / `int()` / `float()` / `index()`, `nonzero`, `.cpu()`, `.numpy()`) is counted while one
`VoRAForTraining` step (forward + backward, images + teacher) runs on a collated batch. On CUDA the same step runs
under `torch.cuda.set_sync_debug_mode("error")`.
"""

import pytest
import torch

from tests.tiny import IMAGE_TOKEN_ID
from tests.tiny import TRAINING_P as P
from tests.tiny import TRAINING_SAMPLES as SAMPLES
from tests.tiny import build_for_training as build
from vora.collator import VoRACollator


@pytest.fixture(scope="module")
def dirs(llm_dirs, teacher_dir):
    return {"llm": llm_dirs["qwen2"], "clip": teacher_dir}


READS = ["item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy"]


@pytest.fixture
def count_reads(monkeypatch):
    calls = []

    def counting(name, original):
        def wrapper(self, *args, **kwargs):
            calls.append(name)
            return original(self, *args, **kwargs)

        return wrapper

    def start():
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
        monkeypatch.setattr(torch, "nonzero", counting("torch.nonzero", torch.nonzero))
        return calls

    return start


def collate(kind, packing=False):
    col = VoRACollator(0, max_length=64 if packing else None, packing=packing, patch_size=P,
                       image_token_id=IMAGE_TOKEN_ID)
    return col(SAMPLES[kind])


# aten ops that read a device value back to the host on CUDA (what `.item()`, `bool()`, `nonzero`, `masked_select`,
# `repeat_interleave` without output_size … dispatch to), including those autograd runs inside backward.
SYNC_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero", "aten::masked_select",
            "aten::unique", "aten::_unique2", "aten::unique_consecutive", "aten::equal"}


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_training_step_with_images_reads_nothing_back(dirs, count_reads, packing):
    model = build(dirs["llm"], dirs["clip"])
    batch = collate("images", packing)
    model(**batch).loss.backward()  # warm-up: lazy initialisation is not the hot path
    calls = count_reads()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = model(**batch)
        out.loss.backward()
    assert calls == [], f"host reads in a training step: {calls}"
    ops = sorted({e.key for e in prof.key_averages()} & SYNC_OPS)
    assert ops == [], f"ops that sync on CUDA in a training step (forward or backward): {ops}"


def test_hand_built_batch_still_checks_placeholders_on_the_device(dirs, count_reads):
    """Without the collator's host geometry the model reads the grid back and checks the placeholder count (the
    user-facing guard): the pinned count shows that path is the only one that syncs."""
    model = build(dirs["llm"], dirs["clip"])
    batch = collate("images")
    del batch["image_grid_list"], batch["num_label_tokens"]
    calls = count_reads()
    model(**batch).loss.backward()
    assert len(calls) > 0
    bad = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_ID, 5))
    with pytest.raises(ValueError, match="image placeholders and images disagree"):
        model(**bad)


def test_collator_checks_placeholders_on_the_cpu():
    s = dict(SAMPLES["images"][0])
    s["input_ids"] = s["input_ids"].clone()
    s["input_ids"][s["input_ids"] == IMAGE_TOKEN_ID] = 7  # images without their placeholder tokens
    with pytest.raises(ValueError, match=r"sample 1 of the batch has 0 '<image>' tokens but its image grids have 6"):
        VoRACollator(0, patch_size=P, image_token_id=IMAGE_TOKEN_ID)([SAMPLES["text"][0], s])
    # Without image_token_id the collator cannot check, so it does not vouch for the geometry.
    assert "image_grid_list" not in VoRACollator(0, patch_size=P)([s])


@pytest.mark.gpu
def test_training_step_does_not_sync_on_cuda(dirs):
    model = build(dirs["llm"], dirs["clip"]).cuda()
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in collate("images").items()}
    model(**batch).loss.backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(**batch).loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
