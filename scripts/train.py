#!/usr/bin/env python
"""Launcher script: `deepspeed [--num_gpus N | --hostfile H] scripts/train.py CONFIG.yaml [key.sub=value ...]`.

Same code path as `vora-train` and `deepspeed --module vora.train` (vora.train:main).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vora.train import main  # noqa: E402

if __name__ == "__main__":
    main()
