"""Text in and out: the checkpoint's tokenizer (`tokenizer.json`, Hugging Face `tokenizers`)
and its chat template, rendered in a sandboxed jinja2 environment (a checkpoint is untrusted
input: the sandbox refuses attribute access outside plain data and any mutation of it).

Template sources, as transformers reads them: `chat_template.jinja`, else `chat_template` in
`tokenizer_config.json` (a string, or a list of named templates of which "default" is used).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from offload.errors import OffloadError

THINK_START, THINK_END = "<think>", "</think>"


class TokenizerError(OffloadError):
    pass


def decode_input(data: bytes, where: str) -> str:
    """UTF-8 input as text; bytes that are not UTF-8 become U+FFFD, with a one-line notice."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        print(f"note: {where} is not valid UTF-8; the bytes that are not were replaced by \ufffd", file=sys.stderr)
        return data.decode("utf-8", errors="replace")


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{model_dir} has no tokenizer.json; copy the tokenizer files from the "
                                 "model's repository into it, or give token ids with --ids")
        try:
            self.backend = HFTokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises plain Exceptions for malformed files
            raise TokenizerError(f"{path} is not a tokenizer file tokenizers can read ({error}); "
                                 "download it again") from None
        self.config = _read_json(model_dir / "tokenizer_config.json")
        self.chat_template = _chat_template(model_dir, self.config)
        self._template = None  # the compiled chat template
        self.vocab_size = self.backend.get_vocab_size()

    def special_token(self, name: str) -> str | None:
        """bos_token / eos_token as the template sees them (a string or an AddedToken dict)."""
        value = self.config.get(name)
        return value.get("content") if isinstance(value, dict) else value

    def encode(self, text: str) -> list[int]:
        """Text -> ids; special tokens written in the text (e.g. <|im_start|>) become their ids."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special)

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (a byte-level token may hold part of a character, which
        `decode([token])` cannot show)."""
        piece = self.backend.id_to_token(token)
        if piece is not None and type(self.backend.decoder).__name__ == "ByteLevel" \
                and all(char in _BYTE_OF for char in piece):
            return bytes(_BYTE_OF[char] for char in piece)
        return self.decode([token]).encode()

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **variables) -> str:
        """The chat template applied to `messages` ([{"role": ..., "content": ...}, ...])."""
        if self.chat_template is None:
            raise TokenizerError("this model has no chat template (no chat_template in tokenizer_config.json, no "
                                 "chat_template.jinja): add one, or use `offload run --raw` to send text as it is")
        try:
            if self._template is None:  # compiled once: a server renders every request
                self._template = _environment().from_string(self.chat_template)
            template = self._template
            pieces, size = [], 0
            with _deadline(RENDER_SECONDS):
                for piece in template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                               bos_token=self.special_token("bos_token") or "",
                                               eos_token=self.special_token("eos_token") or "", **variables):
                    size += len(piece)
                    if size > RENDER_CHARACTERS:
                        raise TokenizerError(f"the model's chat template writes more than {RENDER_CHARACTERS} "
                                             "characters; it is broken or hostile: fix or replace it")
                    pieces.append(piece)
            return "".join(pieces)
        except TokenizerError:
            raise
        except RecursionError:
            raise TokenizerError("the model's chat template recurses without end; fix or replace it") from None
        except Exception as error:  # syntax, runtime (1 // 0, undefined calls), sandbox refusals, limits
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise TokenizerError(f"the model's chat template failed: {reason}") from None

    def chat_ids(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **variables) -> list[int]:
        return self.encode(self.render(messages, add_generation_prompt, **variables))

    def opens_thinking(self, ids: list[int]) -> bool:
        """Whether a prompt ends inside a <think> block (thinking models' templates open it), so
        the answer starts with thinking and no tag of its own."""
        text = self.decode(ids[-8:]).rstrip()
        return text.endswith(THINK_START)

    def detokenizer(self) -> Detokenizer:
        return Detokenizer(self)


class Detokenizer:
    """Ids -> text pieces as they are generated; a piece is held back while it ends inside a
    multi-byte character (tokenizers' DecodeStream)."""

    def __init__(self, tokenizer: Tokenizer):
        from tokenizers.decoders import DecodeStream

        self.tokenizer = tokenizer
        self.stream = DecodeStream(skip_special_tokens=False)

    def __call__(self, token: int) -> str:
        return self.stream.step(self.tokenizer.backend, token) or ""


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's characters -> the bytes they stand for (GPT-2's table: printable bytes are
    their own character, the others 256 + n in order)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    moved = [byte for byte in range(256) if byte not in kept]
    return {**{chr(byte): byte for byte in kept}, **{chr(256 + n): byte for n, byte in enumerate(moved)}}


_BYTE_OF = _byte_level_alphabet()


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise TokenizerError(f"{path}: not readable JSON ({error}); download it again") from None
    return value if isinstance(value, dict) else {}


def _chat_template(model_dir: Path, config: dict) -> str | None:
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.exists() and not jinja_file.is_file():
        raise TokenizerError(f"{jinja_file}: not a regular file; replace it with the template's text")
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise TokenizerError(f"{jinja_file}: not a readable UTF-8 template ({error}); download it again") from None
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


RENDER_SECONDS = 5.0  # a chat template renders in milliseconds; one that runs longer is stopped
RENDER_CHARACTERS = 1 << 24  # and none writes 16M characters (a whole context is a few million)
# what `Tokenizer.render` itself gives the template, beside the caller's variables
RENDER_VARIABLES = frozenset({"messages", "add_generation_prompt", "bos_token", "eos_token"})
RENDER_MEMORY = 1 << 30  # or needs a GiB of memory


class TemplateLimit(Exception):
    """A chat template ran past RENDER_SECONDS or RENDER_MEMORY."""


@contextlib.contextmanager
def _deadline(seconds: float, memory: int = RENDER_MEMORY):
    """Stop template code (jinja compiles templates to Python, file "<template>") that runs past
    `seconds` or grows this process by more than `memory` bytes (a string doubled in a loop): a
    trace function on this thread checks the clock on every line it executes, the RSS every 8."""
    import psutil

    process = psutil.Process()
    end, ceiling = time.monotonic() + seconds, process.memory_info().rss + memory
    lines = 0

    def local(frame, event, arg):
        nonlocal lines
        lines += 1
        if time.monotonic() > end:
            raise TemplateLimit(f"it ran for more than {seconds:g} s")
        if not lines % 8 and process.memory_info().rss > ceiling:
            raise TemplateLimit(f"it took more than {memory >> 20} MiB of memory")
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        yield
    finally:
        sys.settrace(previous)


def _environment():
    """A sandboxed jinja2 environment with what chat templates rely on in transformers: loop
    controls, whitespace trimming, `raise_exception`, `tojson` without HTML escaping, and
    `strftime_now`. `*` and `**` are checked: a template cannot build a string or list past
    RENDER_CHARACTERS or an integer of more than 65536 bits (range() is already capped by the
    sandbox)."""
    from jinja2.exceptions import SecurityError, TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Environment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for sequence, count in ((left, right), (right, left)):
                    if isinstance(sequence, (str, list, tuple)) and isinstance(count, int) \
                            and len(sequence) * count > RENDER_CHARACTERS:
                        raise SecurityError(f"a sequence of {len(sequence)} x {count} is too long")
            elif isinstance(left, int) and isinstance(right, int) and abs(left) > 1 \
                    and left.bit_length() * abs(right) > 1 << 16:
                raise SecurityError(f"a power of a {left.bit_length()}-bit number to {right} is too large")
            return super().call_binop(context, operator, left, right)

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    environment = Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return environment


class ThinkingFilter:
    """Splits generated text into (thinking, answer) pieces around <think> ... </think>, across
    piece boundaries (a tag may arrive split over several tokens)."""

    def __init__(self, thinking: bool = False):
        self.thinking = thinking  # some templates open the block in the prompt
        self.pending = ""

    def __call__(self, text: str) -> list[tuple[bool, str]]:
        """-> [(is_thinking, text), ...] ready to show."""
        self.pending += text
        out: list[tuple[bool, str]] = []
        while self.pending:
            tag = THINK_END if self.thinking else THINK_START
            at = self.pending.find(tag)
            if at >= 0:
                if at:
                    out.append((self.thinking, self.pending[:at]))
                self.pending = self.pending[at + len(tag):]
                self.thinking = not self.thinking
                continue
            keep = partial_suffix(self.pending, tag)  # might be the start of a tag
            if len(self.pending) > keep:
                out.append((self.thinking, self.pending[:len(self.pending) - keep]))
                self.pending = self.pending[len(self.pending) - keep:]
            break
        return out

    def flush(self) -> list[tuple[bool, str]]:
        out, self.pending = ([(self.thinking, self.pending)] if self.pending else []), ""
        return out


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0
