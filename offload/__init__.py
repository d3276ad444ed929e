"""offload: run huge sparse Mixture-of-Experts language models on a small GPU and a lot of RAM.

    import offload
    engine = offload.load("path/to/Qwen3-Next-80B-A3B-Instruct")
    tokenizer = offload.Tokenizer("path/to/Qwen3-Next-80B-A3B-Instruct")
    chat = offload.Conversation(engine, tokenizer, offload.SamplingParams(temperature=0.7, top_p=0.8))
    for piece in chat.ask("Why is the sky blue?"):
        print(piece, end="", flush=True)
"""

from offload.conversation import Conversation
from offload.engine import Engine, load
from offload.errors import OffloadError
from offload.sampling import SamplingParams
from offload.tokenizer import Tokenizer

__all__ = ["Conversation", "Engine", "OffloadError", "SamplingParams", "Tokenizer", "load"]
__version__ = "0.1.0"
