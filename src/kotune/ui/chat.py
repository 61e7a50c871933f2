"""The Chat page: ``kotune chat``'s session (``commands/chat.py``) behind the server, one model loaded at a time.

Replies stream token by token; the stop button sets an event the stream checks between tokens."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

from kotune.commands.chat import CHAT_SAMPLING, ChatSession


class Playground:
    """The model last chosen in the page, loaded on first use, with its conversation.

    Each reply is a turn; stopping, or a new message, ends the turn in progress at its next token. The model runs one
    token step at a time under a lock, so two replies never interleave on it."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.session: ChatSession | None = None
        self.turn = 0
        self.lock = threading.Lock()

    def open(self, path: Path) -> ChatSession:
        if self.path != path or self.session is None:
            from kotune.inference.load import load_model
            from kotune.run_folder import open_folder

            folder = open_folder(path)
            model, tokenizer = load_model(folder, None)
            self.session, self.path = ChatSession(model, tokenizer, folder, CHAT_SAMPLING), path
        return self.session

    def reply(self, path: Path, message: str) -> Iterator[str]:
        """The reply's text as it is generated, until it ends, ``stop`` is called or another reply starts."""
        with self.lock:
            self.turn += 1
            mine, pieces = self.turn, self.open(path).reply(message)
        while True:
            with self.lock:
                if self.turn != mine:
                    pieces.close()
                    return
                piece = next(pieces, None)
            if piece is None:
                return
            yield piece

    def stop(self) -> None:
        with self.lock:
            self.turn += 1

    def reset(self) -> None:
        with self.lock:
            self.turn += 1
            if self.session is not None:
                self.session.reset()
