"""The embedded demo (``bash scripts/demo.sh`` / ``python -m examples.demo``): a synthetic shapes corpus, stand-in
pretrained checkpoints, VoRA stage 1 through the real training entry point, merge, held-out accuracy.

- :mod:`examples.demo.corpus`   — images + LLaVA JSONL (captions, questions, text-only rows, held-out split)
- :mod:`examples.demo.pretrain` — word-level tokenizer with a ChatML template, text-only Llama, CLIP-style ViT teacher
- :mod:`examples.demo.evaluate` — held-out questions answered with ``generate``, accuracy per attribute
- :mod:`examples.demo.run`      — the pipeline, the ablations and ``--compare``
"""
