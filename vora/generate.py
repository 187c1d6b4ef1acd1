"""vora-generate: chat with a merged VoRA model about images, streaming tokens to stdout.

    vora-generate --model MERGED_DIR --image a.png [--image b.png] --prompt "What is in the image?"
                  [--max-new-tokens 256] [--temperature 0] [--top-p 1.0] [--device cpu|cuda] [--raw]

The prompt goes through the processor's chat template as one user turn: the images first (in order),
then the text. With ``--raw`` the prompt is used as is: put one ``<image>`` per image where the image
belongs (missing placeholders are prepended). Temperature 0 means greedy decoding.

``--max-new-tokens`` is capped at the context the prompt leaves (``max_position_embeddings`` − prompt tokens, images
included), with a warning. Bad input (a missing or non-VoRA ``--model``, a training checkpoint, an image the processor
cannot take, an empty input, out-of-range sampling settings, ``<image>`` in a chat prompt, a ``--device`` torch does
not have) is one ``vora-generate: error: …`` line, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, TextStreamer

from .checkpoint import ADAPTER_WEIGHTS, RUN_FILE, TRAINABLE_WEIGHTS, is_full_model
from .model.modeling_vora import check_attention_for
from .model.processing_vora import open_image

# The Auto classes know VoRA models through vora/__init__.py (imported with this module): no remote code needed.


class UsageError(SystemExit):
    """Bad input: ``vora-generate: error: MESSAGE`` on stderr and exit status 2 (no traceback)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return f"vora-generate: error: {self.message}"


def build_inputs(processor, images: list, prompt: str, raw: bool = False, system: str | None = None):
    token = processor.image_token
    if raw:
        missing = len(images) - prompt.count(token)
        if missing < 0:
            raise UsageError(f"the prompt has {prompt.count(token)} {token} placeholders but {len(images)} images "
                             "were given")
        if not prompt and not images:
            raise UsageError("--raw with an empty --prompt and no --image: there is nothing to generate from")
        text = (token + "\n") * missing + prompt
        return processor(images=images or None, text=text, return_tensors="pt")
    for flag, text in (("--prompt", prompt), ("--system", system or "")):
        if token in text:  # the processor would count it as one more image than were given
            raise UsageError(f"{flag} contains {text.count(token)} {token} placeholder(s): without --raw each --image "
                             f"goes before the prompt by itself; remove {token} from {flag}, or pass --raw to place "
                             "the images yourself")
    content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": prompt}]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")


def resolve_model(model: str) -> str:
    """The merged model directory ``--model`` names (a hub id only when it is in the local Hugging Face cache: nothing
    is downloaded), checked to be a VoRA model with weights; a training checkpoint gets the vora-merge command to
    run."""
    path = Path(model).expanduser()
    if not path.is_dir():
        if path.exists():
            raise UsageError(f"--model {model} is a file, not a model directory")
        try:
            path = Path(snapshot_download(model, local_files_only=True))
        except Exception:  # not a hub id, or not in the cache
            raise UsageError(f"--model {model}: no such directory (pass the directory vora-merge wrote)") from None
    if not is_full_model(path):
        if any((path / f).is_file() for f in (ADAPTER_WEIGHTS, TRAINABLE_WEIGHTS, RUN_FILE)):
            raise UsageError(f"--model {model} is a training checkpoint (no merged weights): merge it first with "
                             f"`vora-merge {model} --output DIR`, then pass --model DIR")
        raise UsageError(f"--model {model}: no model.safetensors or model.safetensors.index.json (not a merged model)")
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {model}: cannot read config.json ({e})") from None
    if model_type != "vora":
        raise UsageError(f"--model {model} is a {model_type!r} model, not a VoRA model: pass a vora-merge output "
                         "(`vora-merge CHECKPOINT --output DIR`)")
    return str(path)


def check_image(processor, image, path: str) -> None:
    """The processor's own limits (the check training applies, counting a failure as a 'bad_image' skip): empty images,
    aspect ratios above ``max_aspect_ratio``, sizes that do not fit the patch grid."""
    try:
        processor.image_processor.get_resize_size(image.height, image.width)
    except ValueError as e:
        raise UsageError(f"image {path}: {e}") from None


def cap_new_tokens(requested: int, prompt_len: int, config) -> int:
    """``requested`` capped at the context left after the prompt (warning on stderr); a full context is an error."""
    text_config = getattr(config, "text_config", None) or config
    context = getattr(text_config, "max_position_embeddings", None)
    if not context:
        return requested
    left = context - prompt_len
    if left < 1:
        raise UsageError(f"the prompt is {prompt_len} tokens (images included) but the model's context is {context} "
                         "(max_position_embeddings): shorten the prompt or use fewer / smaller images")
    if requested > left:
        print(f"vora-generate: warning: --max-new-tokens {requested} capped at {left} (context {context} − prompt "
              f"{prompt_len} tokens)", file=sys.stderr)
        return left
    return requested


def device_problem(device: str) -> str | None:
    """What is wrong with a device name here (None when torch has it), before anything loads: otherwise torch's own
    error comes from inside ``.to()`` after the model loaded. ``auto`` is always fine."""
    if device == "auto":
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        return f"{device!r} is not a device (e.g. cpu, cuda, cuda:1, mps)"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return f"{device!r}: torch sees no CUDA GPU here (torch.cuda.is_available() is False)"
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            return f"{device!r}: there are {n} CUDA devices (cuda:0 … cuda:{n - 1})"
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            return f"{device!r}: MPS is not available here"
    elif dev.type != "cpu":
        return f"{device!r}: runs on cpu, cuda or mps"
    return None


def load(model_dir: str, device: str = "auto", dtype: str = "auto", attn_implementation: str | None = None):
    """(model, processor) from a merged directory; uses the installed vora classes."""
    return load_model(model_dir, device, dtype, attn_implementation), AutoProcessor.from_pretrained(model_dir)


def load_model(model_dir: str, device: str = "auto", dtype: str = "auto", attn_implementation: str | None = None):
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).to(device).eval()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vora-generate", description="Generate text about images with a merged VoRA "
                                "model (tokens stream to stdout).")
    p.add_argument("--model", required=True, help="merged model directory (vora-merge output)")
    p.add_argument("--image", action="append", default=[], help="image file; repeat for several images")
    p.add_argument("--prompt", required=True, help="the user's question / instruction")
    p.add_argument("--system", default=None, help="optional system message")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--attn-implementation", default=None, help="sdpa (default), eager or flex_attention")
    p.add_argument("--raw", action="store_true",
                   help="no chat template: the prompt is the model input (with <image> placeholders)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return generate(args)
    except UsageError as e:
        print(e, file=sys.stderr)
        raise


def generate(args) -> int:
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if problem := device_problem(args.device):
        raise UsageError(f"--device {problem}")
    model_dir = resolve_model(args.model)
    try:  # before loading: a kernel that drops the image mask would answer about causally-read images
        check_attention_for(model_dir, args.attn_implementation, "--attn-implementation")
    except ValueError as e:
        raise UsageError(str(e)) from None
    processor = AutoProcessor.from_pretrained(model_dir)
    images = []
    for path in args.image:
        try:
            img = open_image(path)  # the opener training uses (EXIF orientation applied)
        except ValueError as e:  # undecodable file: open_image already says "cannot read image PATH: …"
            raise UsageError(str(e)) from None
        except (OSError, TypeError) as e:
            raise UsageError(f"cannot read image {path}: {e}") from None
        check_image(processor, img, path)
        images.append(img.convert("RGB"))
    inputs = build_inputs(processor, images, args.prompt, raw=args.raw, system=args.system)
    if inputs["input_ids"].shape[-1] == 0:
        raise UsageError("the input is empty (no prompt text, no image): there is nothing to generate from")
    prompt_len = inputs["input_ids"].shape[-1]
    max_new_tokens = cap_new_tokens(args.max_new_tokens, prompt_len, AutoConfig.from_pretrained(model_dir))
    model = load_model(model_dir, args.device, args.dtype, args.attn_implementation)
    inputs = inputs.to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    sampling = args.temperature > 0
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sampling)
    if sampling:
        gen_kwargs.update(temperature=args.temperature, top_p=args.top_p)
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.inference_mode():
        model.generate(**inputs, streamer=streamer, **gen_kwargs)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
