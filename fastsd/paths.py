"""Where fastsd keeps things by default: never relative to the working directory, so the
same command finds the same engines and caches wherever it runs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$FASTSD_CACHE, else $XDG_CACHE_HOME/fastsd, else ~/.cache/fastsd."""
    if os.environ.get("FASTSD_CACHE"):
        return Path(os.environ["FASTSD_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "fastsd"


def default_engine_dir() -> Path:
    """The engine store when none is given: $FASTSD_ENGINE_DIR, else <cache_dir>/engines."""
    if os.environ.get("FASTSD_ENGINE_DIR"):
        return Path(os.environ["FASTSD_ENGINE_DIR"]).expanduser()
    return cache_dir() / "engines"
