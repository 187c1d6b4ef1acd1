"""vora-generate: chat with a merged VoRA model about images, streaming tokens to stdout.

    vora-generate --model MERGED_DIR --image a.png [--image b.png] --prompt "What is in the image?"
                  [--max-new-tokens 256] [--temperature 0] [--top-p 1.0] [--device cpu|cuda] [--raw]

The prompt goes through the processor's chat template as one user turn: the images first (in order),
then the text. With ``--raw`` the prompt is used as is: put one ``<image>`` per image where the image
belongs (missing placeholders are prepended). Temperature 0 means greedy decoding.
"""

from __future__ import annotations

import argparse
import sys


def build_inputs(processor, images: list, prompt: str, raw: bool = False, system: str | None = None):
    if raw:
        token = processor.image_token
        missing = len(images) - prompt.count(token)
        if missing < 0:
            raise SystemExit(f"vora-generate: error: the prompt has {prompt.count(token)} {token} placeholders but {len(images)} images were given")
        text = (token + "\n") * missing + prompt
        return processor(images=images or None, text=text, return_tensors="pt")
    content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": prompt}]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")


def load(model_dir: str, device: str = "auto", dtype: str = "auto", attn_implementation: str | None = None):
    """(model, processor) from a merged directory; uses the installed vora classes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor

    import vora  # noqa: F401  (registers the Auto classes: no remote code needed)

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).to(device).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    return model, processor


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vora-generate", description="Generate text about images with a merged VoRA model (tokens stream to stdout).")
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
    p.add_argument("--raw", action="store_true", help="no chat template: the prompt is the model input (with <image> placeholders)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise SystemExit("vora-generate: error: --max-new-tokens must be at least 1")
    if args.temperature < 0:
        raise SystemExit("vora-generate: error: --temperature must be >= 0")
    import torch
    from PIL import Image
    from transformers import TextStreamer

    images = []
    for path in args.image:
        try:
            img = Image.open(path)
            img.load()
        except (OSError, ValueError) as e:
            raise SystemExit(f"vora-generate: error: cannot read image {path}: {e}") from None
        images.append(img.convert("RGB"))
    from vora.modeling_vora import check_attention_for

    try:  # before loading: a kernel that drops the image mask would answer about causally-read images
        check_attention_for(args.model, args.attn_implementation, "--attn-implementation")
    except ValueError as e:
        raise SystemExit(f"vora-generate: error: {e}") from None
    model, processor = load(args.model, args.device, args.dtype, args.attn_implementation)
    inputs = build_inputs(processor, images, args.prompt, raw=args.raw, system=args.system).to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    sampling = args.temperature > 0
    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=sampling)
    if sampling:
        gen_kwargs.update(temperature=args.temperature, top_p=args.top_p)
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.inference_mode():
        model.generate(**inputs, streamer=streamer, **gen_kwargs)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
