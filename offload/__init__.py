"""offload: run huge sparse Mixture-of-Experts language models on a small GPU and a lot of RAM.

    import offload
    engine = offload.load("path/to/Qwen3-Next-80B-A3B-Instruct")
    tokenizer = offload.Tokenizer("path/to/Qwen3-Next-80B-A3B-Instruct")
    chat = offload.Conversation(engine, tokenizer, offload.SamplingParams(temperature=0.7, top_p=0.8))
    for piece in chat.ask("Why is the sky blue?"):
        print(piece, end="", flush=True)
"""

import importlib.util
import sys
from pathlib import Path

# The Numba kernels are `offload.kernels`. Installed, they live in offload/kernels; in the source
# tree they stay beside the package (kernels/), and a run from the tree uses them, also where an
# editable install of another checkout (a git worktree) maps `offload.kernels` to its own.
_TREE_KERNELS = Path(__file__).resolve().parent.parent / "kernels"
_FOUND = importlib.util.find_spec("offload.kernels")
if (_TREE_KERNELS / "__init__.py").is_file() and (
        _FOUND is None or Path(_FOUND.origin).resolve().parent != Path(__file__).resolve().parent / "kernels"):
    _spec = importlib.util.spec_from_file_location("offload.kernels", _TREE_KERNELS / "__init__.py",
                                                   submodule_search_locations=[str(_TREE_KERNELS)])
    kernels = sys.modules["offload.kernels"] = importlib.util.module_from_spec(_spec)  # as an import binds it
    _spec.loader.exec_module(kernels)

from offload.conversation import Conversation  # noqa: E402
from offload.engine import Engine, load  # noqa: E402
from offload.errors import OffloadError  # noqa: E402
from offload.sampling import SamplingParams  # noqa: E402
from offload.tokenizer import Tokenizer  # noqa: E402

__all__ = ["Conversation", "Engine", "OffloadError", "SamplingParams", "Tokenizer", "load"]
__version__ = "0.1.0"
