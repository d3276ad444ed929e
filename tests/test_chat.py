"""`offload chat` as a person uses it: in a pseudo-terminal (pexpect), and with a piped conversation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pexpect
import pytest
from click.testing import CliRunner

from offload.cli import main

COMMAND = [sys.executable, "-m", "offload"]


@pytest.fixture(scope="module")
def endless(tmp_path_factory):
    """A tiny checkpoint whose answers never stop by themselves (no stop tokens), so that there
    is an answer to interrupt."""
    path = tmp_path_factory.mktemp("chat") / "tiny"
    assert CliRunner().invoke(main, ["synth", "tiny-qwen3-next", str(path)]).exit_code == 0
    (path / "generation_config.json").unlink()
    return path


def spawn(model, *args):
    env = dict(os.environ, PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm", NO_COLOR="1",
               OFFLOAD_CACHE=str(model.parent / "cache"))
    child = pexpect.spawn(COMMAND[0], [*COMMAND[1:], "chat", "--model", str(model), "--quant", "none", *args],
                          env=env, encoding="utf-8", timeout=60, dimensions=(40, 200))
    child.logfile_read = sys.stdout  # the whole session, shown with a failure (pytest captures it)
    return child


def test_chat_in_a_terminal(endless, tmp_path):
    chat = spawn(endless, "--max-tokens", "4000", "--ctx", "4096")
    chat.expect_exact(">>>")  # prompt_toolkit draws the space as a cursor move
    chat.sendline("Hello! How are you?")
    chat.expect_exact("How are you?")  # the line editor's echo (on a busy machine, drawn twice)
    chat.expect_exact("\x1b[?2004l")  # the line editor lets go of the terminal (bracketed paste off)
    chat.expect(r"[a-z]{4}")  # the answer streams (made-up words; the editor's escape codes have no such run) ...
    time.sleep(1)  # (a Ctrl-C typed while the line editor still holds the terminal would be a keystroke)
    chat.sendintr()  # ... Ctrl-C stops it, not the program
    chat.expect_exact("[stopped]")
    chat.expect_exact(">>>")
    chat.sendline("/stats")
    chat.expect(r"last answer: prompt \d+ tokens at [\d.]+ tok/s, generated \d+ tokens")
    chat.expect_exact(">>>")
    chat.sendline("/set max_tokens 4")
    chat.expect_exact("(max_tokens = 4)")
    chat.sendline("Tell me more.")
    chat.expect_exact(">>>")
    chat.sendline("/reset")
    chat.expect_exact("(new conversation)")
    chat.sendline(f"/save {tmp_path / 'chat.json'}")
    chat.expect_exact("(saved 0 messages")
    chat.expect_exact(">>>")
    time.sleep(0.5)  # Ctrl-D, like Ctrl-C, must reach the line editor, not the terminal's cooked mode
    chat.sendeof()  # Ctrl-D leaves
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_a_piped_conversation(endless, tmp_path):
    script = "\n".join(["Hello there", '"""', "two lines", "of text", '"""', "/system Be brief.", "What now?",
                        f"/save {tmp_path / 'conversation.json'}", "/nonsense", ""])
    result = subprocess.run([*COMMAND, "chat", "--model", str(endless), "--quant", "none", "--max-tokens", "3"],
                            input=script, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, OFFLOAD_CACHE=str(tmp_path / "cache")))
    assert result.returncode == 0, result.stderr
    assert ">>> Hello there" in result.stdout and ">>> two lines\nof text" in result.stdout
    assert "(system message set; new conversation)" in result.stdout
    assert "unknown command /nonsense" in result.stdout
    saved = json.loads((tmp_path / "conversation.json").read_text())
    assert saved["system"] == "Be brief." and [m["role"] for m in saved["messages"]] == ["user", "assistant"]
    assert saved["messages"][0]["content"] == "What now?"


def test_ctrl_c_landing_as_a_kernel_returns_reads_as_ctrl_c():
    """Python raises SystemError caused by the KeyboardInterrupt when Ctrl-C lands while a compiled
    kernel is returning; the chat and the CLI treat it as the Ctrl-C it is, and nothing else so."""
    from offload.errors import interrupted

    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as cause:
            raise SystemError("CPUDispatcher(...) returned a result with an exception set") from cause
    except SystemError as error:
        assert interrupted(error)
    assert interrupted(KeyboardInterrupt()) and not interrupted(SystemError("a real bug"))
