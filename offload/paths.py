"""Where offload keeps its files.

cache_root(): built things that can be rebuilt (the demo model, expert stores, benchmark
slices): $OFFLOAD_CACHE, else $XDG_CACHE_HOME/offload, else ~/.cache/offload.
config_root(): the user's settings (the detected hardware profile): $XDG_CONFIG_HOME/offload,
else ~/.config/offload.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    if os.environ.get("OFFLOAD_CACHE"):
        return Path(os.environ["OFFLOAD_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "offload"


def config_root() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "offload"
