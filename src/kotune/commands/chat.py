"""``kotune chat RUN_DIR|MODEL_DIR``: talk to a fine-tuned model in the terminal, tokens streamed as they come."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import fields

from kotune.config import field_docs
from kotune.data.formats import CHAT_FORMATS
from kotune.inference.generate import Sampling, TextStream, chat_prompt, encode_prompt, pad_id, stream
from kotune.inference.reply import ReasoningView, assistant_message
from kotune.run_folder import ModelFolder, folder_stop_ids

CHAT_SAMPLING = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=512)
"""Chat samples by default (replies read less repetitive than greedy); ``--temperature 0`` makes it greedy."""

HELP = "/reset clears the conversation, /exit (or Ctrl-D) quits, Ctrl-C stops a reply"


def add_model_arguments(parser) -> None:
    """PATH and ``--base``, shared by chat and generate."""
    parser.add_argument("path", help="a training run's output folder (adapter) or a merged model folder")
    parser.add_argument(
        "--base",
        choices=("4bit", "8bit", "none"),
        default=None,
        help="for an adapter: load the base model quantized like this (default: as it was trained)",
    )


def add_sampling_arguments(parser, defaults: Sampling) -> None:
    """One option per Sampling field, help from the field docstrings."""
    docs = field_docs(Sampling)
    for f in fields(Sampling):
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(
            flag,
            type=type(getattr(defaults, f.name)),
            default=getattr(defaults, f.name),
            help=f"{docs[f.name]} (default {getattr(defaults, f.name)})",
        )
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (default: a fresh one each run)")


def sampling_from(args) -> Sampling:
    return Sampling(**{f.name: getattr(args, f.name) for f in fields(Sampling)})


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat with a fine-tuned model in the terminal")
    add_model_arguments(p)
    add_sampling_arguments(p, CHAT_SAMPLING)
    p.add_argument(
        "--hide-reasoning",
        action="store_true",
        help="do not show the reasoning of a reply (its <think> block; shown dim by default)",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    from kotune.inference.load import load_model
    from kotune.run_folder import open_folder

    folder = open_folder(args.path)
    model, tokenizer = load_model(folder, args.base)
    session = ChatSession(model, tokenizer, folder, sampling_from(args), args.seed)
    mode = "conversation, history kept" if session.keeps_history else f"{folder.template.name} template, one turn"
    print(f"kotune chat: {folder.path} ({'merged' if folder.merged else 'adapter'}; {mode}). {HELP}", flush=True)
    converse(session, args.hide_reasoning)
    return 0


class ChatSession:
    """A terminal conversation formatted the way the run trained.

    Runs trained on conversations keep the history and format it with the tokenizer's chat template. Runs
    trained on instruction rows answer each message on its own through the saved template, which has no place
    for earlier turns; ``prompt_completion`` runs take the message as the raw prompt.
    """

    def __init__(self, model, tokenizer, folder: ModelFolder, sampling: Sampling, seed: int | None = None):
        import torch

        self.model, self.tokenizer, self.folder, self.sampling = model, tokenizer, folder, sampling
        self.stops = folder_stop_ids(folder, tokenizer, model)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.history: list[dict[str, str]] = []

    @property
    def keeps_history(self) -> bool:
        return self.folder.fmt in CHAT_FORMATS

    def prompt(self, text: str) -> str:
        """The prompt text for a new user message."""
        if self.keeps_history:
            messages = [*self.history, {"role": "user", "content": text}]
            return chat_prompt(self.tokenizer, messages, self.folder.config.data)
        if self.folder.fmt == "prompt_completion":
            return text
        return self.folder.template.format(text)

    def reply(self, text: str) -> Iterator[str]:
        """Stream the reply's text; a finished reply joins the history."""
        decoded = TextStream(self.tokenizer)
        ids = encode_prompt(self.tokenizer, self.prompt(text))
        for token in stream(self.model, ids, pad_id(self.tokenizer), self.stops, self.sampling, self.generator):
            piece = decoded.push(token)
            if piece:
                yield piece
        if self.keeps_history:
            self.history += [{"role": "user", "content": text}, assistant_message(decoded.text())]

    def reset(self) -> None:
        self.history.clear()


def converse(session: ChatSession, hide_reasoning: bool = False) -> None:
    """Read lines until /exit or end of input; stream each reply, its reasoning apart (``show_reply``)."""
    while True:
        print("you> ", end="", flush=True)  # on stdout: input() writes its prompt to stderr on a terminal
        try:
            line = input()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        command = line.strip()
        if command == "/exit":
            return
        if command == "/reset":
            session.reset()
            print("(conversation cleared)", flush=True)
            continue
        if not command:
            continue
        if command.startswith("/"):
            print(f"(unknown command {command}; {HELP})", flush=True)
            continue
        print("bot> ", end="", flush=True)
        try:
            show_reply(session.reply(line), hide_reasoning, sys.stdout.isatty())
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        print(flush=True)


def show_reply(pieces: Iterator[str], hide_reasoning: bool, color: bool) -> None:
    """Print a streamed reply: reasoning dim (without colour: between ``(생각)`` and a blank line) or hidden, then
    the answer."""
    view, opened = ReasoningView(), False
    for piece in pieces:
        for kind, text in view.push(piece):
            if kind == "reasoning":
                if hide_reasoning:
                    continue
                if not opened:
                    print("" if color else "(생각) ", end="")
                    opened = True
                print(f"\x1b[2m{text}\x1b[0m" if color else text, end="", flush=True)
                continue
            if opened:
                print("\n\n" if color else "\n(답) ", end="")
                opened = False
            print(text, end="", flush=True)
