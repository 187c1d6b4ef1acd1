"""A directory becomes a standalone model: what vora-merge's output and a full fine-tuning checkpoint both carry.

Besides the weights: ``config.json`` with ``auto_map`` (``trust_remote_code`` loads the copied ``vora/model/`` code
without vora installed) and the fields vLLM reads, the code files, the processor (tokenizer padding on the left, for
batched ``generate``) with ``preprocessor_config.json``, and ``generation_config.json``.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from pathlib import Path

from transformers import GenerationConfig

from .checkpoint import CheckpointError
from .integrations.serving import add_vllm_config_fields
from .model import CODE_DIR, CODE_FILES
from .model.processing_vora import CHATML_TEMPLATE, with_content_parts

AUTO_MAP = {
    "AutoConfig": "configuration_vora.VoRAConfig",
    "AutoModelForCausalLM": "modeling_vora.VoRAForCausalLM",
    "AutoProcessor": "processing_vora.VoRAProcessor",
}


def inference_config(config, dtype_name: str | None = None):
    """A copy of a VoRAConfig for a standalone model: auto_map (remote code), architectures, KV cache on,
    optionally the stored dtype."""
    config = copy.deepcopy(config)
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["VoRAForCausalLM"]
    add_vllm_config_fields(config)  # what vLLM reads: is_mm_prefix_lm (the image mask), architectures
    config.use_cache = True
    if config.text_config is not None:
        config.text_config.use_cache = True
    if dtype_name is not None:
        config.dtype = dtype_name
        config.text_config.dtype = dtype_name
    return config


def write_code_files(directory: str | os.PathLike) -> None:
    """Copy the model/processor code (CODE_FILES) for trust_remote_code=True."""
    for name in CODE_FILES:
        src = CODE_DIR / name
        text = src.read_text()
        if re.search(r"^\s*(from|import)\s+vora\b", text, flags=re.MULTILINE):
            raise CheckpointError(f"{src} imports the vora package absolutely; remote code must use relative imports")
        shutil.copyfile(src, Path(directory) / name)


def save_inference_processor(directory: str | os.PathLike, processor) -> None:
    """The processor (tokenizer padding on the left, for batched generate, chat templates that also take content
    parts: :func:`with_content_parts`) + preprocessor_config.json."""
    processor.tokenizer.padding_side = "left"
    processor.tokenizer.init_kwargs["padding_side"] = "left"
    if processor._template_source() == "fallback":
        processor.chat_template = CHATML_TEMPLATE  # save the template the processor uses, explicitly
    # Templates that also render content parts in order (what vLLM passes for a chat request with images).
    tok, image = processor.tokenizer, processor.image_token
    if isinstance(tok.chat_template, dict):
        tok.chat_template = {name: with_content_parts(t, image) for name, t in tok.chat_template.items()}
    elif tok.chat_template:
        tok.chat_template = with_content_parts(tok.chat_template, image)
    if isinstance(processor.chat_template, str) and processor.chat_template:
        processor.chat_template = with_content_parts(processor.chat_template, image)
    processor.save_pretrained(str(directory))
    processor.image_processor.save_pretrained(str(directory))  # preprocessor_config.json for AutoImageProcessor


def write_generation_config(directory: str | os.PathLike, config, tokenizer, sources=()) -> None:
    """generation_config.json: the first of ``sources`` that has one (else from the config), with the tokenizer's
    EOS added and a pad id."""
    gen_src = next((Path(d) for d in sources if (Path(d) / "generation_config.json").is_file()), None)
    gen = GenerationConfig.from_pretrained(str(gen_src)) if gen_src else GenerationConfig.from_model_config(config)
    eos = gen.eos_token_id if gen.eos_token_id is not None else config.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    gen.eos_token_id = eos[0] if len(eos) == 1 else (eos or None)
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else None)
    if gen.bos_token_id is None:
        gen.bos_token_id = config.bos_token_id
    gen.save_pretrained(str(directory))


def complete_full_model(directory: str | os.PathLike, config, processor) -> None:
    """Make a ``save_pretrained`` VoRA directory (stage-2 full fine-tuning) a standalone model like vora-merge's
    output: config with auto_map, the code files, the processor (left padding) + preprocessor config, a generation
    config. The processor given is not modified."""
    directory = Path(directory)
    saved = directory / "config.json"
    dtype_name = json.loads(saved.read_text()).get("dtype") if saved.is_file() else None  # what save_pretrained stored
    config = inference_config(config, dtype_name if isinstance(dtype_name, str) else None)
    config.save_pretrained(str(directory))
    write_code_files(directory)
    if processor is not None:
        processor = copy.deepcopy(processor)
        save_inference_processor(directory, processor)
        write_generation_config(directory, config, processor.tokenizer, (directory,))
