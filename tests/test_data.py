"""Data pipeline: image processor, processor, dataset formats, bad samples, collator and packing."""

from __future__ import annotations

import ast
import glob
import io
import json
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.helpers_data import build_tokenizer, make_image, save_image, write_jsonl
from tests.tiny import per_sample_loss_sums
from vora.collator import IGNORE_INDEX, VoRACollator
from vora.config import SourceSpec
from vora.conversation import SampleError, encode_conversation
from vora.data import VoRADataset
from vora.model.image_processing_vora import CLIP_MEAN, CLIP_STD, VoRAImageProcessor, smart_resize
from vora.model.processing_vora import VoRAProcessor

P = 14
EOT = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", None: "<|im_end|>"}


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tok")


def _proc(tok_dir, template="chatml", **ip):
    tok = build_tokenizer(str(tok_dir / f"t_{template}"), template)
    return VoRAProcessor(
        image_processor=VoRAImageProcessor(**{"min_pixels": 14 * 14, "max_pixels": 56 * 56, **ip}), tokenizer=tok
    )


@pytest.fixture(scope="module")
def proc(tok_dir):
    return _proc(tok_dir, "chatml")


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "cache")


def _turns(user: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def _llava(human: str, gpt: str) -> list[dict]:
    return [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]


# --------------------------------------------------------------------------- image processor
@pytest.mark.parametrize("patch", [14, 16])
def test_smart_resize_rules(patch):
    rng = np.random.default_rng(0)
    min_px, max_px = (patch * 4) ** 2, (patch * 32) ** 2
    sizes = [(int(h), int(w)) for h, w in rng.integers(8, 3000, size=(300, 2)) if max(h, w) / min(h, w) <= 20]
    sizes += [(1, 1), (patch, patch), (448, 448), (211, 422), (10000, 10000), (5, 90), (3000, 150)]
    for H, W in sizes:
        h, w = smart_resize(H, W, patch, min_px, max_px)
        assert h % patch == 0 and w % patch == 0 and h >= patch and w >= patch, (H, W, h, w)
        assert min_px <= h * w <= max_px, (H, W, h, w)
        # Aspect ratio kept within a patch: one scale factor s gives both sides to within p.
        lo = max((h - patch) / H, (w - patch) / W)
        hi = min((h + patch) / H, (w + patch) / W)
        assert lo <= hi, (H, W, h, w)
        if min_px <= H * W and round(H / patch) * round(W / patch) * patch**2 <= max_px and H >= patch and W >= patch:
            # In bounds already: each side is just rounded to the nearest multiple.
            assert (h, w) == (round(H / patch) * patch, round(W / patch) * patch)


def test_smart_resize_examples_and_errors():
    assert smart_resize(211, 422, 14, 14 * 14, 10**7) == (210, 420)  # the authors' example
    assert smart_resize(448, 448, 14, 56 * 56, 448 * 448) == (448, 448)
    assert smart_resize(896, 896, 14, 56 * 56, 448 * 448) == (448, 448)
    h, w = smart_resize(20, 20, 14, 56 * 56, 448 * 448)
    assert h * w >= 56 * 56 and h == w
    with pytest.raises(ValueError, match=r"30x9000"):
        smart_resize(30, 9000, 14, 56 * 56, 448 * 448)
    with pytest.raises(ValueError, match="empty"):
        smart_resize(0, 10, 14)
    with pytest.raises(ValueError):
        VoRAImageProcessor(min_pixels=1000, max_pixels=100)


def test_patch_order_matches_conv_and_unfold():
    ip = VoRAImageProcessor(min_pixels=P * P, max_pixels=(P * 6) ** 2)
    img = make_image(70, 98, seed=3)  # 5 x 7 patches, no resize
    out = ip(img)
    pv, grid = out["pixel_values"], out["image_grid_hw"]
    assert grid.tolist() == [[5, 7]] and pv.shape == (35, 3 * P * P)
    # Independent reference: normalise by hand, then unfold / conv.
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
    x = (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    ref = F.unfold(x[None], kernel_size=P, stride=P)[0].T  # [L, C*p*p], (c, kh, kw), L row-major
    torch.testing.assert_close(pv, ref, rtol=0, atol=1e-6)
    # Explicit contract formula for one patch.
    r, c = 3, 4
    torch.testing.assert_close(pv[r * 7 + c], x[:, r * P : (r + 1) * P, c * P : (c + 1) * P].reshape(-1))
    # Conv2d(k=s=p) on the image == linear map of the patches.
    conv = torch.nn.Conv2d(3, 8, P, P, bias=False)
    ref_conv = conv(x[None])[0].flatten(1).T
    torch.testing.assert_close(pv @ conv.weight.reshape(8, -1).T, ref_conv, rtol=1e-4, atol=1e-4)
    # Every patch, built by a loop over the grid.
    loop = torch.stack([x[:, r * P : (r + 1) * P, c * P : (c + 1) * P].reshape(-1) for r in range(5) for c in range(7)])
    torch.testing.assert_close(pv, loop, rtol=0, atol=1e-6)


def test_input_types_agree_and_resize():
    ip = VoRAImageProcessor(min_pixels=P * P, max_pixels=(P * 8) ** 2)
    img = make_image(100, 150, seed=1)
    arr = np.asarray(img)
    a = ip(img)
    b = ip(arr)
    c = ip(torch.from_numpy(arr.copy()).permute(2, 0, 1))
    for o in (b, c):
        torch.testing.assert_close(o["pixel_values"], a["pixel_values"])
        assert o["image_grid_hw"].tolist() == a["image_grid_hw"].tolist()
    gh, gw = a["image_grid_hw"][0].tolist()
    assert (gh * P, gw * P) == smart_resize(100, 150, P, P * P, (P * 8) ** 2)
    # Float input already in [0, 1] and already a multiple of p: same values as uint8 / 255.
    img2 = make_image(56, 84, seed=2)
    f = torch.from_numpy(np.asarray(img2).copy()).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(ip(f)["pixel_values"], ip(img2)["pixel_values"], rtol=0, atol=1e-6)
    # Grayscale / RGBA inputs become RGB; several images concatenate in order.
    many = ip([img.convert("L"), img.convert("RGBA"), img2])
    assert many["image_grid_hw"].shape == (3, 2)
    n = (many["image_grid_hw"][:, 0] * many["image_grid_hw"][:, 1]).sum()
    assert many["pixel_values"].shape == (n, 3 * P * P)
    # Per-call override.
    assert ip(img, max_pixels=28 * 28)["image_grid_hw"].prod() <= 4


def test_image_processor_save_load(tmp_path):
    ip = VoRAImageProcessor(patch_size=16, min_pixels=32 * 32, max_pixels=320 * 320, image_mean=(0.5,) * 3,
                            image_std=(0.25,) * 3)
    ip.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert cfg["image_processor_type"] == "VoRAImageProcessor" and cfg["patch_size"] == 16
    ip2 = VoRAImageProcessor.from_pretrained(tmp_path)
    img = make_image(123, 77)
    torch.testing.assert_close(ip(img)["pixel_values"], ip2(img)["pixel_values"])
    assert ip2.image_mean == [0.5] * 3 and ip2.max_pixels == 320 * 320


# --------------------------------------------------------------------------- processor
def test_placeholder_expansion(proc):
    imgs = [make_image(40, 60, 1), make_image(30, 30, 2), make_image(56, 20, 3)]
    grids = proc.image_processor(imgs)["image_grid_hw"].tolist()
    texts = ["<image> and <image>: two images.", "One more <image>."]
    out = proc(images=imgs, text=texts, padding_side="left")
    ids, am = out["input_ids"], out["attention_mask"]
    assert out["pixel_values"].shape[0] == sum(h * w for h, w in grids)
    assert out["image_grid_hw"].tolist() == grids
    # Runs of image tokens, in order, of exactly gh*gw tokens each (rows: 2 runs, 1 run).
    runs = []
    for row, m in zip(ids.tolist(), am.tolist()):
        toks = [t for t, k in zip(row, m) if k]
        run = 0
        for t in toks + [-1]:
            if t == proc.image_token_id:
                run += 1
            elif run:
                runs.append(run)
                run = 0
    assert runs == [h * w for h, w in grids]
    assert am[1, 0] == 0 and am[0, -1] == 1  # left padding
    with pytest.raises(ValueError, match="placeholders"):
        proc(images=imgs[:1], text="no placeholder here")
    with pytest.raises(ValueError, match="placeholders"):
        proc(images=imgs[:1], text="<image><image>")


def test_apply_chat_template_images_reach_image_processor(proc):
    img = make_image(50, 70, 5)
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What is this?"}]}]
    prompt = proc.apply_chat_template(msgs)
    assert prompt.endswith("<|im_start|>assistant\n") and "<image>\nWhat is this?" in prompt
    out = proc.apply_chat_template(msgs, tokenize=True, return_dict=True, return_tensors="pt")
    ref = proc.image_processor(img)
    torch.testing.assert_close(out["pixel_values"], ref["pixel_values"])
    assert (out["input_ids"] == proc.image_token_id).sum() == ref["image_grid_hw"].prod()
    ids_only = proc.apply_chat_template(msgs, tokenize=True)
    assert isinstance(ids_only, list) and len(ids_only) == out["input_ids"].shape[1]
    # Batched conversations.
    out2 = proc.apply_chat_template([msgs, [{"role": "user", "content": "Hi"}]], tokenize=True, return_dict=True,
                                    return_tensors="pt", padding_side="left")
    assert out2["input_ids"].shape[0] == 2 and out2["image_grid_hw"].shape == (1, 2)


def _label_check(proc, msgs, images, eot):
    enc = encode_conversation(proc, msgs, images)
    ids, lab = enc["input_ids"], enc["labels"]
    assert ids.shape == lab.shape
    labelled = lab != IGNORE_INDEX
    assert torch.equal(lab[labelled], ids[labelled])
    # Independent computation: the labelled tokens decode to the assistant replies, each followed by the end-of-turn.
    replies = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert proc.tokenizer.decode(ids[labelled]) == "".join(r + eot for r in replies)
    # One contiguous labelled span per assistant turn.
    edges = labelled.int().diff(prepend=torch.zeros(1, dtype=torch.int32))
    assert int((edges == 1).sum()) == len(replies)
    # No image token is ever labelled.
    assert not labelled[ids == proc.image_token_id].any()
    return enc


@pytest.mark.parametrize("template", ["chatml", "llama3", None])
def test_label_mask_multi_turn(tok_dir, template):
    proc = _proc(tok_dir, template)
    msgs = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "<image>\nWhat is in the image?"},
        {"role": "assistant", "content": "A cat sitting on a red mat."},
        {"role": "user", "content": "And the colours?"},
        {"role": "assistant", "content": "red green blue"},
        {"role": "user", "content": "Thank you."},
        {"role": "assistant", "content": "Hello! I am fine, thank you."},
    ]
    enc = _label_check(proc, msgs, [make_image(40, 40)], EOT[template])
    assert enc["image_grid_hw"].tolist() == [[3, 3]]
    # Without a system message (ChatML test template injects a default one, which stays unlabelled).
    _label_check(proc, msgs[1:], [make_image(40, 40)], EOT[template])
    if template is None:
        # Fallback ChatML: its special tokens were added to the tokenizer.
        assert "<|im_start|>" in proc.tokenizer.get_vocab()


def test_template_fallback_and_errors(proc):
    msgs = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "I am fine."}]
    # Not prefix-stable: a footer only at the end of a finished conversation. Spans are found by content search.
    footer = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% else %}<|endoftext|>{% endif %}"
    )
    enc = encode_conversation(proc, msgs, chat_template=footer)
    lab = enc["labels"]
    assert proc.tokenizer.decode(lab[lab != IGNORE_INDEX]) == "Hi.<|im_end|>I am fine.<|im_end|>"
    # A template that raises (roles must alternate) → template_error, not a crash.
    strict = (
        "{% for m in messages %}{% if loop.index0 % 2 == 0 and m['role'] != 'user' %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(SampleError) as e:
        encode_conversation(proc, [msgs[0], msgs[0], msgs[1]], chat_template=strict)
    assert e.value.reason == "template_error" and "alternate" in str(e.value)


def test_image_placement(proc):
    img = make_image(28, 28)
    # No placeholder: images go before the first user turn's text.
    enc = encode_conversation(
        proc, [{"role": "user", "content": "Describe."}, {"role": "assistant", "content": "A dog."}], [img]
    )
    text = proc.tokenizer.decode(enc["input_ids"])
    assert "<|im_start|>user\n<image><image><image><image>\nDescribe." in text
    # A placeholder in a later turn stays there.
    enc = encode_conversation(
        proc,
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "Look: <image>"}, {"role": "assistant", "content": "A dog."}], [img]
    )
    text = proc.tokenizer.decode(enc["input_ids"])
    assert "user\nHi<|im_end|>" in text and "Look: <image><image><image><image><|im_end|>" in text
    with pytest.raises(SampleError) as e:
        encode_conversation(proc, _turns("<image> <image>", "x"), [img])
    assert e.value.reason == "placeholder_mismatch"
    with pytest.raises(SampleError) as e:
        encode_conversation(proc, [{"role": "user", "content": "hi"}], [])
    assert e.value.reason == "no_assistant_turn"


def test_truncation(proc):
    img = make_image(56, 56)  # 16 image tokens
    msgs = [{"role": "user", "content": "<image>\nWhat is in the image?"},
            {"role": "assistant", "content": "A cat sitting on a red mat."},
            {"role": "user", "content": "Describe the picture in detail."},
            {"role": "assistant", "content": "There are two dogs playing in the park. " * 3}]
    full = encode_conversation(proc, msgs, [img])
    n = len(full["input_ids"])
    # Cut after the first assistant turn (turn boundary).
    first = encode_conversation(proc, msgs[:2], [img])
    cut = encode_conversation(proc, msgs, [img], max_length=n - 1)
    assert cut["counts"]["truncated"] == 1 and torch.equal(cut["input_ids"], first["input_ids"])
    assert torch.equal(cut["labels"], first["labels"])
    assert encode_conversation(proc, msgs, [img], max_length=n)["counts"]["truncated"] == 0
    # Images alone exceed max_length.
    with pytest.raises(SampleError) as e:
        encode_conversation(proc, msgs, [img], max_length=15)
    assert e.value.reason == "images_exceed_max_length"
    # First turn does not fit: hard cut, never inside the image run.
    img_start = int((full["input_ids"] == proc.image_token_id).nonzero()[0])
    with pytest.raises(SampleError) as e:
        encode_conversation(proc, msgs, [img], max_length=img_start + 5)  # cut moves before the image → no labels
    assert e.value.reason == "no_labels_after_truncation"
    L = len(first["input_ids"]) - 3
    hard = encode_conversation(proc, msgs, [img], max_length=L)
    assert len(hard["input_ids"]) == L and (hard["labels"] != IGNORE_INDEX).any()
    assert (hard["input_ids"] == proc.image_token_id).sum() == 16


def _allowed_imports(path):
    tree = ast.parse(open(path).read())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            mods.add(node.module.split(".")[0])
    return mods


@pytest.mark.e2e
def test_processor_save_load_round_trip(proc, tmp_path):
    import subprocess
    import sys

    from transformers import AutoProcessor
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    stdlib = set(sys.stdlib_module_names)
    for f in sorted(glob.glob("vora/model/*.py")):  # everything that ships in checkpoints
        extra = _allowed_imports(f) - stdlib - {"torch", "numpy", "PIL", "transformers"}
        assert not extra, f"{f} imports {extra}"
    proc.save_pretrained(tmp_path)
    names = set(os.listdir(tmp_path))
    assert {"processing_vora.py", "image_processing_vora.py", "processor_config.json"} <= names
    cfg = json.loads((tmp_path / "processor_config.json").read_text())
    assert cfg["auto_map"]["AutoProcessor"] == "processing_vora.VoRAProcessor"
    content = [{"type": "image", "image": make_image(33, 71)}, {"type": "text", "text": "Hi"}]
    msgs = [{"role": "user", "content": content}]
    ref = proc.apply_chat_template(msgs, tokenize=True, return_dict=True, return_tensors="pt")
    train_msgs = msgs + [{"role": "assistant", "content": "A cat."}]
    ref_train = encode_conversation(proc, train_msgs)
    # The class copied into the directory (with `import vora` done, AutoProcessor returns the installed one).
    copied = get_class_from_dynamic_module("processing_vora.VoRAProcessor", tmp_path).from_pretrained(tmp_path)
    assert type(copied).__module__.startswith("transformers_modules")
    loaders = (VoRAProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True))
    for loaded in loaders + (copied,):
        assert loaded.image_token_id == proc.image_token_id
        strip = lambda d: {k: v for k, v in d.items() if k != "auto_map"}  # noqa: E731
        assert strip(loaded.image_processor.to_dict()) == strip(proc.image_processor.to_dict())
        out = loaded.apply_chat_template(msgs, tokenize=True, return_dict=True, return_tensors="pt")
        for k in ref:
            torch.testing.assert_close(out[k], ref[k])
        # Training labels come from vora.conversation with any loaded processor, and its errors are one class.
        enc = encode_conversation(loaded, train_msgs)
        for k in ("input_ids", "labels", "pixel_values", "image_grid_hw"):
            assert torch.equal(enc[k], ref_train[k]), k
        with pytest.raises(SampleError) as e:
            encode_conversation(loaded, msgs)
        assert e.value.reason == "no_assistant_turn"
    # In a fresh interpreter that never imports the vora package, AutoProcessor must run the copied files.
    code = (
        "import sys, torch\n"
        "from transformers import AutoProcessor\n"
        f"p = AutoProcessor.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)\n"
        "assert type(p).__module__.startswith('transformers_modules'), type(p).__module__\n"
        "assert type(p.image_processor).__module__.startswith('transformers_modules')\n"
        "assert not any(m == 'vora' or m.startswith('vora.') for m in sys.modules)\n"
        "print(p.image_token_id)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == str(proc.image_token_id)


# --------------------------------------------------------------------------- dataset formats
def _conv_rows(tmp_path):
    """Images on disk + equivalent (messages, images) for checking the dataset against the processor."""
    a = save_image(str(tmp_path / "imgs" / "a.png"), 40, 60, 1)
    b = save_image(str(tmp_path / "imgs" / "sub" / "b.jpg"), 70, 30, 2)
    llava = [
        {"id": "0", "image": "imgs/a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": "A cat."}]},
        {"id": "1", "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hello!"},
                                      {"from": "gpt", "value": "Hi."}, {"from": "human", "value": "How are you?"},
                                      {"from": "gpt", "value": "Fine."}]},
        {"id": "2", "images": ["imgs/a.png", "imgs/sub/b.jpg"], "conversations": [
            {"from": "human", "value": "<image> vs <image>"}, {"from": "gpt", "value": "Two pictures."}]},
        {"id": "3", "frames": ["imgs/a.png", "imgs/sub/b.jpg"], "conversations": [
            {"from": "human", "value": "Describe the video."}, {"from": "gpt", "value": "Dogs."}]},
    ]
    return a, b, llava


def _expected(proc, rec_msgs, images, max_length=None):
    return encode_conversation(proc, rec_msgs, [Image.open(p) for p in images], max_length=max_length)


def _assert_same(sample, enc):
    assert sample is not None
    for k in ("input_ids", "labels", "image_grid_hw"):
        assert torch.equal(sample[k], enc[k]), k
    torch.testing.assert_close(sample["pixel_values"], enc["pixel_values"])


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_llava_formats(proc, tmp_path, cache_dir, fmt):
    a, b, rows = _conv_rows(tmp_path)
    path = tmp_path / f"llava.{fmt}"
    if fmt == "jsonl":
        write_jsonl(str(path), rows)
    else:
        path.write_text(json.dumps(rows, indent=1))
    ds = VoRADataset([{"path": str(path), "image_root": str(tmp_path)}], proc, cache_dir=cache_dir)
    assert len(ds) == 4
    role = {"human": "user", "gpt": "assistant", "system": "system"}
    imgs = [[a], [], [a, b], [a, b]]
    for i, rec in enumerate(rows):
        msgs = [{"role": role[m["from"]], "content": m["value"]} for m in rec["conversations"]]
        _assert_same(ds[i], _expected(proc, msgs, imgs[i]))
    assert ds.report()["ok"] == 4 and ds.report()["skipped_total"] == 0
    assert ds[1]["pixel_values"].shape == (0, 3 * P * P)  # text-only


def test_openai_messages_format(proc, tmp_path, cache_dir):
    a, b, _ = _conv_rows(tmp_path)
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "imgs/a.png"},
                                                   {"type": "text", "text": "What is in the image?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"},
                                                   {"type": "image"}]},
                      {"role": "assistant", "content": "Two."}], "images": ["imgs/a.png", "imgs/sub/b.jpg"]},
        {"messages": [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi."}]},
    ]
    path = write_jsonl(str(tmp_path / "oai.jsonl"), rows)
    ds = VoRADataset([path], proc, cache_dir=cache_dir)  # image_root defaults to the file's directory
    _assert_same(ds[0], _expected(proc, [{"role": "user", "content": "<image>\nWhat is in the image?"},
                                         {"role": "assistant", "content": "A cat."}], [a]))
    _assert_same(ds[1], _expected(proc, [{"role": "user", "content": "<image>\nand<image>"},
                                         {"role": "assistant", "content": "Two."}], [a, b]))
    _assert_same(ds[2], _expected(proc, [{"role": "user", "content": "Hello!"},
                                         {"role": "assistant", "content": "Hi."}], []))


def _png_bytes(h, w, seed):
    buf = io.BytesIO()
    make_image(h, w, seed).save(buf, format="PNG")
    return buf.getvalue()


def test_parquet_arrow_and_save_to_disk(proc, tmp_path, cache_dir):
    import datasets

    conv_img = [{"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": "A cat."}]
    conv_txt = [{"from": "human", "value": "Hello!"}, {"from": "gpt", "value": "Hi."}]
    img_bytes = _png_bytes(40, 60, 7)
    table = {
        "conversations": [json.dumps(conv_img), json.dumps(conv_txt)],  # JSON strings
        "jpg": [img_bytes, None],
    }
    pq = tmp_path / "d.parquet"
    datasets.Dataset.from_dict(table).to_parquet(str(pq))
    exp_img = encode_conversation(proc, _turns("<image>\nWhat is in the image?", "A cat."),
                                  [Image.open(io.BytesIO(img_bytes))])
    exp_txt = encode_conversation(proc, _turns("Hello!", "Hi."))

    ds = VoRADataset([{"path": str(pq), "image_column": "jpg"}], proc, cache_dir=cache_dir)
    _assert_same(ds[0], exp_img)
    _assert_same(ds[1], exp_txt)

    # 🤗 Image feature + struct conversations, saved with save_to_disk and as a single Arrow file.
    feats = datasets.Features({
        "conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
        "images": datasets.List(datasets.Image()),
    })
    hf = datasets.Dataset.from_dict(
        {"conversations": [conv_img, conv_txt], "images": [[{"bytes": img_bytes, "path": None}], []]}, features=feats
    )
    disk = tmp_path / "disk"
    hf.save_to_disk(str(disk))
    arrow_file = sorted(disk.glob("*.arrow"))[0]
    for spec in ({"path": str(disk)}, {"path": str(arrow_file)}):
        ds = VoRADataset([spec], proc, cache_dir=cache_dir)
        assert ds.sources[0].fmt == ("hf" if spec["path"] == str(disk) else "arrow")
        _assert_same(ds[0], exp_img)
        _assert_same(ds[1], exp_txt)


def test_exif_orientation_applied_in_training_and_inference(proc, tmp_path, cache_dir):
    # A photo stored sideways with EXIF orientation 6 ("rotate 90° clockwise to display"): both paths see it upright.
    stored = make_image(28, 56, 4)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rot.png", exif=exif)
    upright = stored.transpose(Image.Transpose.ROTATE_270)  # PIL rotates counter-clockwise
    assert upright.size == (28, 56)
    ref = proc.image_processor(upright)
    assert ref["image_grid_hw"].tolist() == [[4, 2]]
    path = write_jsonl(str(tmp_path / "r.jsonl"), [{"image": "rot.png", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "ok"}]}])
    sample = VoRADataset([path], proc, cache_dir=cache_dir)[0]
    assert torch.equal(sample["image_grid_hw"], ref["image_grid_hw"])
    assert torch.equal(sample["pixel_values"], ref["pixel_values"])
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "rot.png")}]}]
    out = proc.apply_chat_template(msgs, tokenize=True, return_dict=True, return_tensors="pt")
    assert torch.equal(out["pixel_values"], ref["pixel_values"])


def test_source_specs_from_recipes_and_dicts(proc, tmp_path, cache_dir):
    # One schema: the recipe's SourceSpec objects, dicts and plain paths all reach the dataset.
    path = write_jsonl(str(tmp_path / "s.jsonl"), [GOOD] * 4)
    for spec in (SourceSpec(path=path, weight=0.5), {"path": path, "weight": 0.5}):
        ds = VoRADataset([spec], proc, cache_dir=cache_dir)
        assert len(ds) == 2 and isinstance(ds.sources[0].spec, SourceSpec)
    assert len(VoRADataset([path], proc, cache_dir=cache_dir)) == 4
    with pytest.raises(ValueError, match=re.escape("unknown keys ['wieght']")):
        VoRADataset([{"path": path, "wieght": 2}], proc, cache_dir=cache_dir)
    with pytest.raises(ValueError, match="without 'path'"):
        VoRADataset([{"weight": 2}], proc, cache_dir=cache_dir)


def test_mixing_weights(proc, tmp_path, cache_dir):
    rows = [{"conversations": _llava(f"q{i}", f"a{i}")} for i in range(10)]
    p1 = write_jsonl(str(tmp_path / "one.jsonl"), rows)
    p2 = write_jsonl(str(tmp_path / "two.jsonl"), rows[:4])
    ds = VoRADataset([{"path": p1, "weight": 0.5}, {"path": p2, "weight": 2.5}], proc, cache_dir=cache_dir)
    assert len(ds) == 5 + 10
    locs = [ds.locate(i) for i in range(len(ds))]
    assert [r for s, r in locs if s == 0] == [0, 2, 4, 6, 8]
    assert [r for s, r in locs if s == 1] == [0, 1, 2, 3] * 2 + [0, 2]
    with pytest.raises(IndexError):
        ds.locate(len(ds))


# --------------------------------------------------------------------------- bad samples
GOOD = {"conversations": [{"from": "human", "value": "Hello!"}, {"from": "gpt", "value": "Hi."}]}


def _bad_cases(tmp_path):
    save_image(str(tmp_path / "ok.png"), 30, 30, 0)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    save_image(str(tmp_path / "thin.png"), 2, 1000, 0)
    save_image(str(tmp_path / "big.png"), 56, 56, 0)
    h = lambda v: [{"from": "human", "value": v}, {"from": "gpt", "value": "ok"}]  # noqa: E731
    return [
        ("image_missing", {"image": "nope/missing.png", "conversations": h("<image>")}, "nope/missing.png"),
        ("image_unreadable", {"image": "broken.png", "conversations": h("<image>")}, "broken.png"),
        ("no_assistant_turn", {"conversations": [{"from": "human", "value": "hi"}]}, "no assistant"),
        ("placeholder_mismatch", {"image": "ok.png", "conversations": h("<image> <image>")}, "2 <image> placeholders"),
        ("unknown_format", {"text": "just text"}, "neither 'conversations' nor 'messages'"),
        ("bad_conversation", {"conversations": [{"from": "alien", "value": "x"}, {"from": "gpt", "value": "y"}]},
         "alien"),
        ("bad_image", {"image": "thin.png", "conversations": h("<image>")}, "aspect ratio"),
        ("images_exceed_max_length", {"images": ["big.png"] * 4, "conversations": h("<image>" * 4)}, "max_length=60"),
    ]


def test_bad_samples_skip_and_count(proc, tmp_path, cache_dir, caplog):
    cases = _bad_cases(tmp_path)
    rows = [GOOD] + [c[1] for c in cases] + [GOOD]
    path = write_jsonl(str(tmp_path / "bad.jsonl"), rows, raw_lines={1: '{"conversations": [', 3: "[1, 2]"})
    with caplog.at_level("WARNING", logger="vora.data"):
        ds = VoRADataset([path], proc, max_length=60, cache_dir=cache_dir)
        assert len(ds) == len(rows)
        out = [ds[i] for i in range(len(ds))]
    assert out[0] is not None and out[-1] is not None
    assert all(o is None for o in out[1:-1])
    rep = ds.report()
    expected = {reason: 1 for reason, _, _ in cases}
    expected["malformed_json"] = 2
    assert rep["skipped"] == expected and rep["ok"] == 2
    # Logged with file:line (malformed lines are lines 2 and 4 of the file) and the image path.
    assert f"{path}:2: skipped (malformed_json)" in caplog.text and f"{path}:4: skipped (malformed_json)" in caplog.text
    assert str(tmp_path / "nope/missing.png") in caplog.text
    # Collator drops the Nones; counts are not lost.
    batch = VoRACollator(proc.pad_token_id)(out)
    assert batch["input_ids"].shape[0] == 2
    # All-skipped batch: one pad token, no labels.
    empty = VoRACollator(proc.pad_token_id)([None, None])
    assert empty["input_ids"].shape == (1, 1) and (empty["labels"] == IGNORE_INDEX).all()
    assert empty["pixel_values"].shape == (0, 3 * P * P)
    # The Arrow cache is reused on a second construction and still reports the malformed lines.
    ds2 = VoRADataset([path], proc, max_length=60, cache_dir=cache_dir)
    assert ds2.report()["skipped"] == {"malformed_json": 2}


def test_bad_samples_error_mode(proc, tmp_path, cache_dir):
    cases = _bad_cases(tmp_path)
    # Malformed JSON line: raised at construction, naming file:line.
    bad_json = write_jsonl(str(tmp_path / "m.jsonl"), [GOOD, GOOD], raw_lines={1: "{oops"})
    with pytest.raises(ValueError, match=re.escape(f"{bad_json}:2: malformed_json")):
        VoRADataset([bad_json], proc, on_bad_sample="error", cache_dir=cache_dir)
    path = write_jsonl(str(tmp_path / "e.jsonl"), [GOOD] + [c[1] for c in cases])
    ds = VoRADataset([path], proc, max_length=60, on_bad_sample="error", cache_dir=cache_dir)
    assert ds[0] is not None
    for i, (reason, _, needle) in enumerate(cases, start=1):
        with pytest.raises(ValueError) as e:
            ds[i]
        msg = str(e.value)
        assert msg.startswith(f"{path}:{i + 1}: {reason}:"), msg
        assert needle in msg, msg


def test_json_list_errors_name_index(proc, tmp_path, cache_dir):
    path = tmp_path / "l.json"
    path.write_text(json.dumps([GOOD, 5, {"conversations": [{"from": "human", "value": "x"}]}]))
    with pytest.raises(ValueError, match=re.escape(f"{path}[1]: malformed_json")):
        VoRADataset([str(path)], proc, on_bad_sample="error", cache_dir=cache_dir)
    ds = VoRADataset([str(path)], proc, cache_dir=cache_dir)
    assert len(ds) == 2 and ds[1] is None
    assert ds.report()["skipped"] == {"malformed_json": 1, "no_assistant_turn": 1}
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"a": 1},\n{"b": }\n]')
    with pytest.raises(ValueError, match=re.escape(f"{broken}:3: malformed JSON file")):
        VoRADataset([str(broken)], proc, cache_dir=cache_dir)
    with pytest.raises(ValueError, match="unknown format"):
        VoRADataset([str(tmp_path / "x.csv")], proc, cache_dir=cache_dir)


def test_counts_reach_main_process_with_workers(proc, tmp_path, cache_dir):
    save_image(str(tmp_path / "a.png"), 30, 30, 0)
    good_img = {"image": "a.png", "conversations": _llava("<image>", "ok")}
    missing = {"image": "b.png", "conversations": _llava("<image>", "ok")}
    rows = [good_img, missing, GOOD, {"x": 1}] * 4
    path = write_jsonl(str(tmp_path / "w.jsonl"), rows)
    ds = VoRADataset([path], proc, cache_dir=cache_dir)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=VoRACollator(proc.pad_token_id))
    n_rows = sum(b["input_ids"].shape[0] for b in loader)
    assert n_rows == 8
    rep = ds.report()
    assert rep["ok"] == 8 and rep["skipped"] == {"image_missing": 4, "unknown_format": 4}


# --------------------------------------------------------------------------- collator and packing
def _samples(proc, n=5, seed=0):
    rng = np.random.default_rng(seed)
    words = "the quick brown fox jumps over lazy dog red green blue cat mat".split()
    out = []
    for i in range(n):
        turns = []
        for _ in range(int(rng.integers(1, 3))):
            turns.append({"role": "user", "content": " ".join(rng.choice(words, int(rng.integers(2, 8))))})
            turns.append({"role": "assistant", "content": " ".join(rng.choice(words, int(rng.integers(1, 10))))})
        out.append(encode_conversation(proc, turns))
    return out


def test_collator_padding(proc):
    s = _samples(proc, 3)
    for side in ("right", "left"):
        b = VoRACollator(proc.pad_token_id, padding_side=side)(s)
        assert set(b) == {"input_ids", "attention_mask", "labels", "pixel_values", "image_grid_hw", "num_label_tokens"}
        assert b["num_label_tokens"] == sum(int((x["labels"][1:] != -100).sum()) for x in s)
        for i, x in enumerate(s):
            n = len(x["input_ids"])
            sl = slice(0, n) if side == "right" else slice(b["input_ids"].shape[1] - n, None)
            assert torch.equal(b["input_ids"][i, sl], x["input_ids"]) and torch.equal(b["labels"][i, sl], x["labels"])
            assert b["attention_mask"][i].sum() == n and (b["attention_mask"][i, sl] == 1).all()
        assert b["pixel_values"].shape == (0, 3 * P * P) and b["image_grid_hw"].shape == (0, 2)
    with pytest.raises(ValueError, match="exceeds max_length"):
        VoRACollator(proc.pad_token_id, max_length=5)(s)


def test_packing_layout_and_image_order(proc):
    imgs = [make_image(28, 28, 1), make_image(28, 56, 2), make_image(56, 28, 3)]
    convs = [
        encode_conversation(proc, _turns("<image>", "one"), [imgs[0]]),
        encode_conversation(proc, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "two"}]),
        encode_conversation(proc, _turns("<image><image>", "three"), imgs[1:]),
    ]
    lens = [len(c["input_ids"]) for c in convs]
    cap = lens[0] + lens[1] + 1
    col = VoRACollator(proc.pad_token_id, max_length=cap, packing=True)
    rows = col.pack(lens)
    b = col(convs)
    assert b["input_ids"].shape[0] == len(rows)
    for r, members in enumerate(rows):
        pos = 0
        for seg, i in enumerate(members, start=1):
            n = lens[i]
            assert torch.equal(b["input_ids"][r, pos:pos + n], convs[i]["input_ids"])
            assert (b["attention_mask"][r, pos:pos + n] == seg).all()
            assert torch.equal(b["position_ids"][r, pos:pos + n], torch.arange(n))
            assert b["labels"][r, pos] == IGNORE_INDEX
            assert torch.equal(b["labels"][r, pos + 1:pos + n], convs[i]["labels"][1:])
            pos += n
        assert (b["attention_mask"][r, pos:] == 0).all()
    # Images in order of appearance: row-major over the packed rows.
    order = [i for r in rows for i in r]
    exp_pv = torch.cat([convs[i]["pixel_values"] for i in order])
    exp_grid = torch.cat([convs[i]["image_grid_hw"] for i in order])
    torch.testing.assert_close(b["pixel_values"], exp_pv)
    assert torch.equal(b["image_grid_hw"], exp_grid)
    flat_runs = (b["input_ids"] == proc.image_token_id).sum()
    assert flat_runs == (exp_grid[:, 0] * exp_grid[:, 1]).sum()


def block_causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Dense ``[B, 1, L, L]`` bool mask from segment ids, built by a loop: causal within each segment, nothing across
    segments or to/from padding (a padding query attends to itself only, to keep softmax finite)."""
    B, L = attention_mask.shape
    mask = torch.zeros(B, 1, L, L, dtype=torch.bool)
    for b in range(B):
        for q in range(L):
            mask[b, 0, q, q] = True
            for k in range(q):
                mask[b, 0, q, k] = bool(attention_mask[b, q] > 0 and attention_mask[b, k] == attention_mask[b, q])
    return mask


# Forward for the packing-equivalence test: a text-only LLM given the dense reference mask.
def text_llm_forward(model, batch):
    mask = block_causal_mask(batch["attention_mask"])
    add = torch.zeros(mask.shape, dtype=torch.float32).masked_fill(~mask, torch.finfo(torch.float32).min)
    return model(input_ids=batch["input_ids"], attention_mask=add, position_ids=batch.get("position_ids")).logits


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_packing_loss_equivalence(proc, arch):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=len(proc.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg._attn_implementation = "eager"
    model = model_cls(cfg).eval()
    samples = _samples(proc, 6, seed=1)
    lens = [len(s["input_ids"]) for s in samples]
    col = VoRACollator(proc.pad_token_id, max_length=max(lens) * 2, packing=True)
    rows = col.pack(lens)
    assert any(len(r) > 1 for r in rows)
    with torch.no_grad():
        packed = col(samples)
        got = per_sample_loss_sums(text_llm_forward(model, packed), packed["labels"], packed["attention_mask"])
        order = [i for r in rows for i in r]
        ref = []
        for i in order:
            single = VoRACollator(proc.pad_token_id)([samples[i]])
            logits = text_llm_forward(model, single)
            ref.append(per_sample_loss_sums(logits, single["labels"], single["attention_mask"]))
        ref = torch.cat(ref)
        # Unpacked, padded batch gives the same per-sample sums too.
        padded = VoRACollator(proc.pad_token_id)([samples[i] for i in order])
        pad_sums = per_sample_loss_sums(text_llm_forward(model, padded), padded["labels"], padded["attention_mask"])
    assert (ref > 0).all()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(pad_sums, ref, rtol=1e-5, atol=1e-4)
