"""The Chat page: ``kotune chat``'s session (``commands/chat.py``) behind the server, one model loaded at a time.

Replies stream token by token; the stop button sets an event the stream checks between tokens."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

from kotune.commands.chat import CHAT_SAMPLING, ChatSession


class Playground:
    """The model last chosen in the page, loaded on first use, with its conversation."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.session: ChatSession | None = None
        self.stopping = threading.Event()
        self.busy = threading.Lock()

    def open(self, path: Path) -> ChatSession:
        if self.path != path or self.session is None:
            from kotune.inference.load import load_model
            from kotune.run_folder import open_folder

            folder = open_folder(path)
            model, tokenizer = load_model(folder, None)
            self.session, self.path = ChatSession(model, tokenizer, folder, CHAT_SAMPLING), path
        return self.session

    def reply(self, path: Path, message: str) -> Iterator[str]:
        """The reply's text as it is generated; ends early when ``stop`` is called. One reply at a time."""
        if not self.busy.acquire(blocking=False):
            yield "[kotune: another reply is being written; stop it first]"
            return
        try:
            self.stopping.clear()
            for piece in self.open(path).reply(message):
                yield piece
                if self.stopping.is_set():
                    return
        finally:
            self.busy.release()

    def stop(self) -> None:
        self.stopping.set()

    def reset(self) -> None:
        if self.session is not None:
            self.session.reset()
