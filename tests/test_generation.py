"""Serving a merged model: cached generation equals a no-cache reference loop (images, left padding,
several images per prompt, eager and sdpa), processor and chat-template routes, sampling, remote-code
loading in a fresh interpreter without vora, and the vora-generate CLI."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoProcessor, LogitsProcessor, LogitsProcessorList

import vora  # noqa: F401  (registers the Auto classes)
from tests.vora_world import ROWS, build_world, images, make_batch
from vora.generate import build_inputs
from vora.generate import main as generate_main

N_NEW = 8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("gen"))


@pytest.fixture(scope="module")
def processor(world):
    return AutoProcessor.from_pretrained(world.merged_dir)


def load_merged(world, attn="sdpa"):
    return AutoModelForCausalLM.from_pretrained(world.merged_dir, attn_implementation=attn).eval()


@pytest.fixture(scope="module")
def models(world):
    return {attn: load_merged(world, attn) for attn in ("sdpa", "eager")}


def reference_greedy(model, batch, n, eos_ids, pad_id, suppress=()):
    """No cache: a full forward over the whole sequence (images bidirectional) at every step, argmax.
    Finished rows continue with padding, as generate() does."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(n):
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                           pixel_values=batch.get("pixel_values"),
                           image_grid_hw=batch.get("image_grid_hw")).logits[:, -1]
        logits[:, list(suppress)] = float("-inf")
        nxt = torch.where(done, torch.full_like(ids[:, 0], pad_id), logits.argmax(-1))
        done |= torch.isin(nxt, torch.tensor(eos_ids, device=ids.device))
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        if done.all():
            break
    return ids


def gen_settings(model):
    g = model.generation_config
    eos = g.eos_token_id if isinstance(g.eos_token_id, list) else [g.eos_token_id]
    return eos, g.pad_token_id, list(g.suppress_tokens or [])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_greedy_equals_no_cache_reference(world, models, attn):
    model = models[attn]
    batch = make_batch(ROWS, "left", world.image_token_id, world.vocab, seed=3)
    out = model.generate(**batch, max_new_tokens=N_NEW, do_sample=False)
    ref = reference_greedy(model, batch, N_NEW, *gen_settings(model))
    assert out.shape[1] > batch["input_ids"].shape[1]
    torch.testing.assert_close(out, ref[:, : out.shape[1]], atol=0, rtol=0)


def test_kernels_and_cache_agree(world, models):
    batch = make_batch(ROWS, "left", world.image_token_id, world.vocab, seed=4)
    a = models["sdpa"].generate(**batch, max_new_tokens=N_NEW, do_sample=False)
    b = models["eager"].generate(**batch, max_new_tokens=N_NEW, do_sample=False)
    c = models["sdpa"].generate(**batch, max_new_tokens=N_NEW, do_sample=False, use_cache=False)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(a, c, atol=0, rtol=0)


def test_the_image_matters_and_a_generated_image_token_does_not_break_decoding(world, models):
    model = models["sdpa"]
    batch = make_batch([[2, (2, 3), 3]], "left", world.image_token_id, world.vocab, seed=5)
    other = dict(batch, pixel_values=batch["pixel_values"].flip(0))
    with torch.no_grad():
        a = model(**batch).logits[:, -1]
        b = model(**other).logits[:, -1]
    assert (a - b).abs().max() > 1e-3  # the image matters

    class ForceImageToken(LogitsProcessor):  # the model emits '<image>' at the 2nd step
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == batch["input_ids"].shape[1] + 1:
                scores[:] = float("-inf")
                scores[:, world.image_token_id] = 0
            return scores

    out = model.generate(**batch, max_new_tokens=4, do_sample=False,
                         logits_processor=LogitsProcessorList([ForceImageToken()]))
    n_prompt = batch["input_ids"].shape[1]
    assert out[0, n_prompt + 1] == world.image_token_id and out.shape[1] == n_prompt + 4


def test_processor_route_with_several_images_and_left_padding(world, models, processor):
    model = models["sdpa"]
    imgs = images()
    texts = ["<image>\nDescribe the picture.", "<image><image>\nWhat is the difference?"]
    inputs = processor(images=[imgs[0], imgs[1], imgs[2]], text=texts, return_tensors="pt")
    assert inputs["attention_mask"][0, 0] == 0 and inputs["attention_mask"][:, -1].all()  # left padding by default
    assert inputs["image_grid_hw"].shape[0] == 3
    out = model.generate(**inputs, max_new_tokens=N_NEW, do_sample=False)
    ref = reference_greedy(model, dict(inputs), N_NEW, *gen_settings(model))
    torch.testing.assert_close(out, ref[:, : out.shape[1]], atol=0, rtol=0)
    # each row alone gives the same continuation as in the batch
    single = processor(images=[imgs[0]], text=texts[0], return_tensors="pt")
    alone = model.generate(**single, max_new_tokens=N_NEW, do_sample=False)
    n_prompt = inputs["input_ids"].shape[1]
    n_single = single["input_ids"].shape[1]
    assert alone[0, n_single:].tolist() == out[0, n_prompt:].tolist()[: alone.shape[1] - n_single]


def test_chat_template_route(world, models, processor):
    model = models["sdpa"]
    imgs = images()
    messages = [{"role": "user", "content": [{"type": "image", "image": imgs[0]}, {"type": "image", "image": imgs[2]},
                                             {"type": "text", "text": "Compare the two images."}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    prompt = processor.tokenizer.decode(inputs["input_ids"][0])
    assert prompt.startswith("<|im_start|>") and prompt.rstrip().endswith("<|im_start|>assistant")
    assert int((inputs["input_ids"] == world.image_token_id).sum()) == int(inputs["image_grid_hw"].prod(-1).sum())
    out = model.generate(**inputs, max_new_tokens=N_NEW, do_sample=False)
    ref = reference_greedy(model, dict(inputs), N_NEW, *gen_settings(model))
    torch.testing.assert_close(out, ref[:, : out.shape[1]], atol=0, rtol=0)
    # batched conversations, left padded
    conv2 = [{"role": "user", "content": [{"type": "text", "text": "Hello!"}]}]
    batch = processor.apply_chat_template([messages, conv2], add_generation_prompt=True, tokenize=True,
                                          return_dict=True,
                                          return_tensors="pt", padding_side="left")
    outb = model.generate(**batch, max_new_tokens=N_NEW, do_sample=False)
    refb = reference_greedy(model, dict(batch), N_NEW, *gen_settings(model))
    torch.testing.assert_close(outb, refb[:, : outb.shape[1]], atol=0, rtol=0)


def test_sampling(world, models):
    model = models["sdpa"]
    batch = make_batch(ROWS, "left", world.image_token_id, world.vocab, seed=6)
    kw = dict(max_new_tokens=N_NEW, do_sample=True, temperature=1.5, top_k=0, top_p=1.0)
    torch.manual_seed(0)
    a = model.generate(**batch, **kw)
    torch.manual_seed(0)
    b = model.generate(**batch, **kw)
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # reproducible with a seed
    greedy = model.generate(**batch, max_new_tokens=N_NEW, do_sample=False)
    assert not torch.equal(a, greedy)
    new = a[:, batch["input_ids"].shape[1]:]
    assert ((new >= 0) & (new < world.vocab)).all()
    # top_k=1 sampling is greedy
    torch.testing.assert_close(model.generate(**batch, max_new_tokens=N_NEW, do_sample=True, top_k=1), greedy, atol=0,
                               rtol=0)


REMOTE = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class NoVora(importlib.abc.MetaPathFinder):  # as if vora were not installed (the dev venv has it editable)
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("vora", "merge_tools"):
                raise ModuleNotFoundError(f"No module named {name!r}")

    sys.meta_path.insert(0, NoVora())
    try:
        import vora
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("vora must not be importable here")
    import torch
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoProcessor
    d = sys.argv[1]
    model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
    proc = AutoProcessor.from_pretrained(d, trust_remote_code=True)
    imgs = [Image.open(p) for p in sys.argv[2:]]
    inputs = proc(images=imgs, text=["<image>\\nDescribe the picture.", "<image><image>\\nWhat is the difference?"],
                  return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    print(json.dumps({"model": type(model).__module__, "processor": type(proc).__module__,
                      "tokens": out.tolist(), "vora_loaded": any(m.split(".")[0] == "vora" for m in sys.modules)}))
    """
)


@pytest.mark.e2e
def test_remote_code_in_a_fresh_interpreter_without_vora(world, models, processor, tmp_path):
    paths = []
    for i, im in enumerate(images()):
        paths.append(str(tmp_path / f"{i}.png"))
        im.save(paths[-1])
    script = tmp_path / "remote.py"
    script.write_text(REMOTE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([sys.executable, "-I", str(script), str(world.merged_dir), *paths], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["model"].startswith("transformers_modules.") and got["processor"].startswith("transformers_modules.")
    assert not got["vora_loaded"]
    from PIL import Image

    inputs = processor(images=[Image.open(p) for p in paths],
                       text=["<image>\nDescribe the picture.",
                             "<image><image>\nWhat is the difference?"], return_tensors="pt")
    want = models["sdpa"].generate(**inputs, max_new_tokens=8, do_sample=False)
    assert got["tokens"] == want.tolist()


def test_vora_generate_cli_streams(world, models, processor, tmp_path, capsys):
    imgs = images()
    paths = []
    for i, im in enumerate(imgs[:2]):
        paths.append(str(tmp_path / f"{i}.png"))
        im.save(paths[-1])
    argv = ["--model", str(world.merged_dir), "--image", paths[0], "--image", paths[1], "--prompt", "What is shown?",
            "--max-new-tokens", "6", "--device", "cpu"]
    assert generate_main(argv) == 0
    printed = capsys.readouterr().out
    from PIL import Image

    inputs = build_inputs(processor, [Image.open(p).convert("RGB") for p in paths], "What is shown?")
    out = models["sdpa"].generate(**inputs, max_new_tokens=6, do_sample=False)
    want = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert printed.strip() == want.strip()
    assert generate_main(argv[:-2] + ["--temperature", "0.8", "--seed", "1", "--device", "cpu"]) == 0
    with pytest.raises(SystemExit, match="cannot read image"):
        generate_main(["--model", str(world.merged_dir), "--image", str(tmp_path / "nope.png"), "--prompt", "x"])


def test_cli_opens_images_like_training(world, tmp_path, monkeypatch):
    # A photo stored sideways with EXIF orientation 6: vora-generate sees it upright, as the training data path does.
    from PIL import Image

    import vora.generate as gen

    upright = Image.new("RGB", (28, 56), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "rot.png", exif=exif)
    seen = []

    class Seen(Exception):
        pass

    def record(processor, img, path):
        seen.append(img.size)
        raise Seen

    monkeypatch.setattr(gen, "check_image", record)
    with pytest.raises(Seen):
        generate_main(["--model", str(world.merged_dir), "--image", str(tmp_path / "rot.png"), "--prompt", "x"])
    assert seen == [(28, 56)]


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cuda_cached_greedy_equals_reference(world, processor, attn):
    model = AutoModelForCausalLM.from_pretrained(world.merged_dir, attn_implementation=attn,
                                                 dtype=torch.float32).cuda().eval()
    imgs = images()
    inputs = processor(images=imgs, text=["<image>\nDescribe.", "<image><image>\nCompare."],
                       return_tensors="pt").to("cuda")
    out = model.generate(**inputs, max_new_tokens=N_NEW, do_sample=False)
    ref = reference_greedy(model, dict(inputs), N_NEW, *gen_settings(model)[:2])
    assert out.tolist() == ref[:, : out.shape[1]].tolist()
    bf16 = AutoModelForCausalLM.from_pretrained(world.merged_dir, attn_implementation=attn,
                                                dtype=torch.bfloat16).cuda().eval()
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    out16 = bf16.generate(**inputs, max_new_tokens=N_NEW, do_sample=False)
    assert out16.shape == out.shape and (out16[:, inputs["input_ids"].shape[1]:] < world.vocab).all()
