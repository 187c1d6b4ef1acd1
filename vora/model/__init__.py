"""What a merged VoRA checkpoint ships: config, model, attention mask, image processor and processor.

``vora-merge`` copies every module of this subpackage (all ``*.py`` but this file) into the merged directory for
``trust_remote_code=True``, so they import only torch/numpy/PIL/transformers and each other relatively, and hold
no training-only code.
"""

from pathlib import Path

# The files vora-merge copies (and test_merge checks), found rather than listed so a new module cannot be forgotten.
CODE_DIR = Path(__file__).parent
CODE_FILES = tuple(sorted(p.name for p in CODE_DIR.glob("*.py") if p.name != "__init__.py"))
