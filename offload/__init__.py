"""offload: run huge sparse Mixture-of-Experts language models on a small GPU and a lot of RAM.

    import offload
    engine = offload.load("path/to/Qwen3-Next-80B-A3B-Instruct")
    new_ids = engine.generate(prompt_ids, max_new_tokens=32)
"""

from offload.engine import Engine, load
from offload.errors import OffloadError

__all__ = ["Engine", "OffloadError", "load"]
__version__ = "0.1.0"
