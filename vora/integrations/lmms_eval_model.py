"""``vora`` model for lmms-eval (0.7.3): batched, left-padded ``generate`` through VoRAProcessor's chat template.

    lmms-eval --model vora --model_args pretrained=MERGED_DIR[,device=cpu,dtype=float32,batch_size=8] --tasks ...

Registered by the ``lmms_eval.models`` entry point ``vora`` → :func:`manifest`. lmms-eval loads entry-point
manifests with ``overwrite=True`` (``lmms_eval/models/__init__.py::_initialize_model_registry``,
``registry_v2.py::load_entrypoint_manifests``), so with vora installed ``--model vora`` is this class rather than
lmms-eval's built-in ``vora`` (the paper authors' one-sample-at-a-time wrapper for their own checkpoints).

The request layout (``Instance.args`` = context, generation kwargs, doc_to_visual, doc id, task, split) and the
``lmms`` interface are lmms-eval 0.7.3's (``lmms_eval/api/instance.py``, ``lmms_eval/api/model.py``,
``lmms_eval/api/task.py::construct_requests``). Only images are read; other visuals are refused.
"""

from __future__ import annotations

import json

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image

MODEL_ID = "vora"


def manifest():
    """The entry point's payload (lmms_eval/models/registry_v2.py::ModelManifest)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.VoRA")


def cut_at_stop_strings(text: str, until: list[str]) -> str:
    """The text before the first occurrence of any stop string (lmms-eval's ``until``)."""
    for stop in until:
        if stop:
            i = text.find(stop)
            if i >= 0:
                text = text[:i]
    return text


class VoRA(lmms):
    """A merged VoRA checkpoint (``vora-merge`` output) evaluated with ``transformers.generate``.

    model_args: ``pretrained`` (directory or hub id), ``device`` (default cuda if available, else cpu), ``dtype``
    (``auto`` = the checkpoint's, or ``float32``/``bfloat16``/``float16``), ``batch_size`` (default 8),
    ``attn_implementation`` (default: transformers' choice; the image mask needs sdpa, eager or flex_attention),
    ``max_new_tokens`` (when the task sets none, default 256).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str = "",
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 8,
        max_batch_size: int | None = None,
        attn_implementation: str | None = None,
        max_new_tokens: int | str = 256,
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(
                f"vora model: unknown model_args {sorted(kwargs)}; known: pretrained, device, dtype, batch_size, "
                "attn_implementation, max_new_tokens"
            )
        if not pretrained:
            raise ValueError("vora model: give pretrained=MERGED_DIR (a vora-merge output directory)")
        if str(batch_size).startswith("auto"):
            raise ValueError("vora model: batch_size=auto is not supported; give a number, e.g. --batch_size 8")
        from transformers import AutoModelForCausalLM, AutoProcessor

        import vora  # noqa: F401  (Auto classes know model_type 'vora': no remote code needed)
        from vora.generate import device_problem

        if device and (problem := device_problem(device)):  # before the model loads, not from inside .to()
            raise ValueError(f"vora model: device={problem}")
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, str(dtype), None)
        if not (torch_dtype == "auto" or isinstance(torch_dtype, torch.dtype)):
            raise ValueError(f"vora model: dtype={dtype!r} is not 'auto' or a torch dtype name such as float32")
        kwargs = {"dtype": torch_dtype}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        self.model = AutoModelForCausalLM.from_pretrained(pretrained, **kwargs).to(self._device).eval()
        if getattr(self.model.config, "model_type", None) != "vora":
            raise ValueError(f"vora model: {pretrained} is not a VoRA checkpoint (model_type "
                             f"{self.model.config.model_type!r}); use vora-merge's output directory")
        self.processor = AutoProcessor.from_pretrained(pretrained)
        self.tokenizer = self.processor.tokenizer
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    # --- requests -----------------------------------------------------------------------------
    def _conversation(self, request: Instance) -> list[dict]:
        """One user turn: the doc's images, then the task's prompt text (as the demo and VoRAProcessor's
        ``normalize_messages`` put them)."""
        context, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
        flat, stack = [], [visuals] if visuals is not None else []
        while stack:  # lists of images may be nested
            item = stack.pop(0)
            if isinstance(item, (list, tuple)):
                stack[:0] = list(item)
            elif item is not None:
                flat.append(item)
        bad = [type(v).__name__ for v in flat if not isinstance(v, Image.Image)]
        if bad:
            raise ValueError(f"vora model: task {task} gives visuals of type {bad[0]}; VoRA reads images (PIL) only")
        content = [{"type": "image", "image": img.convert("RGB")} for img in flat]
        content.append({"type": "text", "text": context})
        return [{"role": "user", "content": content}]

    @torch.inference_mode()
    def _generate(self, conversations: list[list[dict]], gen_kwargs: dict) -> list[str]:
        inputs = self.processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
            padding_side="left",
        )
        inputs = {k: v.to(self._device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        do_sample = bool(gen_kwargs.get("do_sample", temperature > 0))
        kw = dict(
            max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
            do_sample=do_sample,
            num_beams=int(gen_kwargs.get("num_beams") or 1),
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        if do_sample:
            kw.update(temperature=temperature or 1.0, top_p=float(gen_kwargs.get("top_p") or 1.0))
        out = self.model.generate(**inputs, **kw)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [self.tokenizer.decode(g, skip_special_tokens=True) for g in new]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Requests with the same generation kwargs are batched, longest prompt first (least padding; an
        out-of-memory error shows at the first batch); answers come back in request order."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        answers: list[str | None] = [None] * len(requests)
        for indices in groups.values():
            gen_kwargs = dict(requests[indices[0]].args[1])
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            indices.sort(key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                texts = self._generate([self._conversation(requests[i]) for i in chunk], gen_kwargs)
                for i, text in zip(chunk, texts):
                    answers[i] = cut_at_stop_strings(text, until)
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], gen_kwargs), answers[i])
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "the vora lmms-eval model implements generate_until only: use generation tasks "
            "(output_type: generate_until); loglikelihood / multiple_choice tasks are not supported yet"
        )

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("the vora lmms-eval model does not support multi-round generation tasks")
