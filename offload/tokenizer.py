"""Text in and out: the checkpoint's tokenizer (`tokenizer.json`, Hugging Face `tokenizers`)
and its chat template, rendered in a sandboxed jinja2 environment (a checkpoint is untrusted
input: the sandbox refuses attribute access outside plain data and any mutation of it).

Template sources, as transformers reads them: `chat_template.jinja`, else `chat_template` in
`tokenizer_config.json` (a string, or a list of named templates of which "default" is used).
"""

from __future__ import annotations

import json
import sys
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

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **variables) -> str:
        """The chat template applied to `messages` ([{"role": ..., "content": ...}, ...])."""
        if self.chat_template is None:
            raise TokenizerError("this model has no chat template (no chat_template in tokenizer_config.json, no "
                                 "chat_template.jinja): add one, or use `offload run --raw` to send text as it is")
        from jinja2.exceptions import TemplateError

        try:
            template = _environment().from_string(self.chat_template)
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=self.special_token("bos_token") or "",
                                   eos_token=self.special_token("eos_token") or "", **variables)
        except TemplateError as error:
            raise TokenizerError(f"the model's chat template failed: {error}") from None

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
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _environment():
    """A sandboxed jinja2 environment with what chat templates rely on in transformers: loop
    controls, whitespace trimming, `raise_exception`, `tojson` without HTML escaping, and
    `strftime_now`."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
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
