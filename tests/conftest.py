"""Test setup: Triton runs in its CPU interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is first imported, hence here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
