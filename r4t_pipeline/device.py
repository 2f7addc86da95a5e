"""The one place that picks the torch device: CUDA when present, else the CPU (fp32 there: bf16 matmul on the
CPU is orders of magnitude slower)."""

from __future__ import annotations

import torch


def resolve_device(preference: str | torch.device | None = "auto") -> torch.device:
    """`auto` (or None): the first CUDA device when one is available, else the CPU; anything else as given."""
    if preference is None or preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)
