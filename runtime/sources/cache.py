"""Where llmq keeps what it builds once and reuses (the demo model folder, later cached logits)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "LLMQ_CACHE_DIR"


def cache_dir() -> Path:
    """``$LLMQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/llmq``, else ``~/.cache/llmq``. Not created here."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "llmq"
