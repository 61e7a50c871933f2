"""kotune chat driven through a pseudo-terminal: send a line, read the streamed reply, /reset, /exit or Ctrl-D.

The reply must be exactly the greedy reply computed here in-process, and arrive in several reads (streamed).
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest
from conftest import ROOT

PROMPT = b"you> "
MESSAGE = "질문 3: 하늘은 왜 파란가요?"
MAX_NEW_TOKENS = 12


class Terminal:
    """A child process on a pseudo-terminal (stdin and stdout; stderr to a file, away from the screen)."""

    def __init__(self, args: list[str], stderr_path):
        master, slave = pty.openpty()
        self.stderr = open(stderr_path, "wb")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kotune.cli", *args], stdin=slave, stdout=slave, stderr=self.stderr, cwd=ROOT
        )
        os.close(slave)
        self.master, self.pending = master, b""

    def read_until(self, marker: bytes, timeout: float = 300) -> tuple[bytes, int]:
        """Bytes before ``marker`` and how many reads they took."""
        reads, deadline = 0, time.monotonic() + timeout
        while marker not in self.pending:
            ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"no {marker!r} on the terminal; got {self.pending[-2000:]!r}")
            try:
                data = os.read(self.master, 65536)
            except OSError:  # the child closed the terminal
                raise AssertionError(f"chat ended before {marker!r}; screen: {self.pending[-2000:]!r}") from None
            self.pending += data
            reads += 1
        before, _, self.pending = self.pending.partition(marker)
        return before, reads

    def type(self, text: str) -> None:
        os.write(self.master, text.encode("utf-8"))

    def close(self) -> int:
        code = self.process.wait(timeout=120)
        os.close(self.master)
        self.stderr.close()
        return code


def expected_reply(path) -> str:
    from kotune.commands.chat import ChatSession
    from kotune.inference.generate import Sampling
    from kotune.inference.load import load_model
    from kotune.run_folder import open_folder

    folder = open_folder(path)
    model, tokenizer = load_model(folder)
    session = ChatSession(model, tokenizer, folder, Sampling(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS))
    return "".join(session.reply(MESSAGE))


@pytest.mark.slow
@pytest.mark.parametrize("which", ["adapter-4bit", "merged"])
def test_chat_streams_the_greedy_reply_and_exits(which, tiny_qlora_run, tiny_merged, tmp_path):
    run, _, _ = tiny_qlora_run
    path = tiny_merged[0] if which == "merged" else run
    args = ["chat", str(path), "--temperature", "0", "--max-new-tokens", str(MAX_NEW_TOKENS)]
    terminal = Terminal(args, tmp_path / "stderr.txt")
    banner, _ = terminal.read_until(PROMPT)
    assert b"kotune chat:" in banner and b"one turn" in banner

    terminal.type(MESSAGE + "\n")
    echo, _ = terminal.read_until(b"bot> ")
    assert MESSAGE.encode() in echo  # the terminal echoes what was typed
    reply, reads = terminal.read_until(PROMPT)
    expected = expected_reply(path)
    assert expected, "the tiny model should say something before EOS"
    # the terminal turns each newline into CR LF; the reply ends with one newline
    assert reply == (expected + "\n").replace("\n", "\r\n").encode("utf-8")
    assert reads >= 3, "the reply should arrive token by token, not in one piece"

    terminal.type("/reset\n")
    cleared, _ = terminal.read_until(PROMPT)
    assert b"(conversation cleared)" in cleared
    if which == "merged":
        terminal.type("\x04")  # Ctrl-D at the prompt ends the chat too
    else:
        terminal.type("/exit\n")
    assert terminal.close() == 0


@pytest.mark.slow
def test_no_library_warning_lands_inside_a_reply(tiny_qlora_run):
    """stdout and stderr into one pipe, as on a terminal: between "bot> " and the next prompt only the reply."""
    run, cache, _ = tiny_qlora_run
    args = ["chat", str(run), "--temperature", "0", "--max-new-tokens", str(MAX_NEW_TOKENS)]
    result = subprocess.run(
        [sys.executable, "-m", "kotune.cli", *args],
        input=f"{MESSAGE}\n{MESSAGE}\n/exit\n",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env={**os.environ, "KOTUNE_CACHE": str(cache)},
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    replies = [part.split("\nyou> ")[0] for part in result.stdout.split("bot> ")[1:]]
    expected = expected_reply(run)
    assert replies == [expected, expected], result.stdout[-3000:]
