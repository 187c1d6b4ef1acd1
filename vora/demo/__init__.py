"""The embedded demo (``bash scripts/demo.sh`` / ``python -m vora.demo``): a synthetic shapes corpus, stand-in
pretrained checkpoints, VoRA stage 1 through the real training entry point, merge, held-out accuracy.

- :mod:`vora.demo.corpus`   — images + LLaVA JSONL (captions, questions, text-only rows, held-out split)
- :mod:`vora.demo.pretrain` — word-level tokenizer with a ChatML template, text-only Llama, CLIP-style ViT teacher
- :mod:`vora.demo.evaluate` — held-out questions answered with ``generate``, accuracy per attribute
- :mod:`vora.demo.run`      — the pipeline, the ablations and ``--compare``
"""
