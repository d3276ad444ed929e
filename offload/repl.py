"""The interactive chat (`offload chat`): line editing and history with prompt_toolkit on a
terminal, plain lines when stdin is a pipe; streamed answers; slash commands.

Ctrl-C while an answer streams stops that answer and returns to the prompt; Ctrl-C at the prompt
clears the line; Ctrl-D (or end of input) exits. A message spanning several lines goes between
lines of three double quotes.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Callable, Iterator

import click

from offload.conversation import Conversation
from offload.errors import OffloadError, interrupted
from offload.paths import cache_root
from offload.sampling import SamplingParams
from offload.tokenizer import ThinkingFilter, decode_input

HELP = """\
  /help              this list
  /reset             forget the conversation (the system message stays)
  /system [TEXT]     set the system message, or clear it; starts a new conversation
  /set NAME VALUE    temperature, top_k, top_p, min_p, repetition_penalty, seed, max_tokens
  /stats             speed of the last answer, memory in use, settings
  /save FILE         write the conversation to FILE as JSON
  /exit              leave (or Ctrl-D)
A message of several lines goes between two lines of \"\"\". Ctrl-C stops an answer."""

MULTILINE = '"""'
SETTINGS = {f.name: f.type for f in fields(SamplingParams)} | {"max_tokens": "int"}


CONTROL = {code: f"\\x{code:02x}" for code in range(32) if chr(code) not in "\n\t"} | {127: "\\x7f"}


def printable(text: str) -> str:
    """Control characters (a model can emit escape sequences) shown as \\xNN, not obeyed by the terminal."""
    return text.translate(CONTROL)


def show(pieces: list[tuple[bool, str]], hide_thinking: bool, terminal: bool) -> None:
    """Write (is_thinking, text) pieces to stdout: thinking dimmed on a terminal, or not at all;
    on a terminal control characters are shown, not obeyed."""
    for thinking, text in pieces:
        if thinking and hide_thinking:
            continue
        if terminal:
            text = click.style(printable(text), dim=True) if thinking else printable(text)
        click.echo(text, nl=False)
    sys.stdout.flush()


class PrefillBar:
    """A long prompt's prefill on stderr (`Engine.feed`'s progress): tokens read of all and tok/s,
    gone once the answer starts."""

    def __init__(self):
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, unit=" tokens", desc="reading the prompt", leave=False, file=sys.stderr,
                            dynamic_ncols=True)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Repl:
    def __init__(self, conversation: Conversation, hide_thinking: bool = False,
                 memory: Callable[[], str] = lambda: ""):
        self.conversation = conversation
        self.hide_thinking = hide_thinking
        self.memory = memory
        self.interactive = sys.stdin.isatty() and sys.stdout.isatty()
        self.prefill_bar = PrefillBar()
        conversation.progress = self.prefill_bar

    # --- input ---------------------------------------------------------------------------------

    def _lines(self) -> Iterator[str]:
        """Input lines; KeyboardInterrupt at the prompt yields an empty line."""
        if not self.interactive:
            for line in sys.stdin.buffer:
                yield decode_input(line, "an input line").rstrip("\r\n")
            return
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory

        history = cache_root() / "chat_history"
        history.parent.mkdir(parents=True, exist_ok=True)
        session = PromptSession(history=FileHistory(str(history)))
        continuation = False
        while True:
            try:
                yield session.prompt("... " if continuation else ">>> ")
            except KeyboardInterrupt:
                yield ""
            except EOFError:
                return
            continuation = self._open_block

    def _messages(self) -> Iterator[str]:
        """User inputs: single lines, or the lines between two \"\"\" lines joined."""
        block: list[str] | None = None
        self._open_block = False
        for line in self._lines():
            if block is None and line.strip().startswith(MULTILINE):
                rest = line.strip()[len(MULTILINE):]
                if rest.endswith(MULTILINE) and len(rest) >= len(MULTILINE):  # """one line"""
                    yield rest[:-len(MULTILINE)]
                    continue
                block, self._open_block = [rest] if rest else [], True
            elif block is not None:
                if line.rstrip().endswith(MULTILINE):
                    block.append(line.rstrip()[:-len(MULTILINE)])
                    yield "\n".join(block).strip("\n")
                    block, self._open_block = None, False
                else:
                    block.append(line)
            elif line.strip():
                yield line.strip()

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        if self.interactive:
            click.echo("Type a message, /help for commands, Ctrl-D to leave.", err=True)
        for text in self._messages():
            if text.startswith("/"):
                if not self._command(text):
                    return
                continue
            if not self.interactive:
                click.echo(f">>> {text}")
            self._answer(text)

    def _answer(self, text: str) -> None:
        split = None
        pieces = self.conversation.ask(text)
        try:
            for piece in pieces:  # `thinking` is known once the turn has rendered its prompt
                split = split or ThinkingFilter(self.conversation.thinking)
                self._show(split(piece))
            if split:
                self._show(split.flush())
            click.echo()
        except (KeyboardInterrupt, SystemError) as error:
            if not interrupted(error):
                raise
            pieces.close()
            self.prefill_bar.close()
            click.echo(click.style(" [stopped]", dim=True) if self.interactive else " [stopped]")
        except OffloadError as error:
            click.echo(f"error: {error}", err=True)

    def _show(self, pieces: list[tuple[bool, str]]) -> None:
        show(pieces, self.hide_thinking, self.interactive)

    def _command(self, text: str) -> bool:
        """Run a slash command; False to leave."""
        name, _, argument = text[1:].partition(" ")
        argument = argument.strip()
        conversation = self.conversation
        if name in ("exit", "quit", "bye"):
            return False
        if name == "help":
            click.echo(HELP)
        elif name == "reset":
            conversation.reset()
            click.echo("(new conversation)")
        elif name == "system":
            conversation.set_system(argument)
            conversation.reset()
            click.echo(f"(system message {'set' if argument else 'cleared'}; new conversation)")
        elif name == "stats":
            last = conversation.last
            click.echo(f"last answer: {last.line() if last.generated_tokens else 'none yet'}")
            click.echo(f"context: {conversation.engine.position} of {conversation.engine.ctx} tokens; "
                       f"{self.memory()}")
            if conversation.engine.placement:
                from offload.placement import describe

                click.echo("placement:\n" + "\n".join(describe(conversation.engine.placement)))
            settings = {k: v for k, v in vars(conversation.sampling).items()} | {"max_tokens": conversation.max_tokens}
            click.echo("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
        elif name == "save":
            self._save(argument)
        elif name == "set":
            self._set(argument)
        else:
            click.echo(f"unknown command /{name}; /help lists them")
        return True

    def _set(self, argument: str) -> None:
        name, _, value = argument.partition(" ")
        name = {"repeat_penalty": "repetition_penalty", "temp": "temperature"}.get(name, name)
        if name not in SETTINGS or not value.strip():
            click.echo(f"usage: /set NAME VALUE with NAME one of {', '.join(SETTINGS)}")
            return
        try:
            number = int(value) if name in ("top_k", "seed", "max_tokens") else float(value)
            if name == "max_tokens":
                if number < 1:
                    raise ValueError
                self.conversation.max_tokens = number
            else:
                self.conversation.sampling = self.conversation.sampling.with_(**{name: number})
        except (ValueError, OffloadError) as error:
            click.echo(f"cannot set {name} to {value.strip()!r}: {error or 'must be a positive integer'}")
            return
        click.echo(f"({name} = {number})")

    def _save(self, argument: str) -> None:
        if not argument:
            click.echo("usage: /save FILE")
            return
        path = Path(argument).expanduser()
        record = {"system": self.conversation.system, "messages": self.conversation.messages,
                  "sampling": vars(self.conversation.sampling)}
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        try:
            partial.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            partial.replace(path)
        except OSError as error:
            partial.unlink(missing_ok=True)
            click.echo(f"cannot write {path}: {error.strerror}")
            return
        click.echo(f"(saved {len(self.conversation.messages)} messages to {path})")
