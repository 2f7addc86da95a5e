"""Where the package finds its versioned non-Python inputs (`assets/`) and writes its artefacts."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def assets_dir() -> Path:
    """Prompt templates, facet vocabularies and reward presets; $R4T_ASSETS_DIR overrides."""
    return Path(os.environ.get("R4T_ASSETS_DIR") or REPO_ROOT / "assets")


def cache_dir() -> Path:
    """Model conversions and embedding caches shared by every run; $R4T_CACHE_DIR overrides."""
    return Path(os.environ.get("R4T_CACHE_DIR") or Path.home() / ".cache" / "r4t").expanduser()
