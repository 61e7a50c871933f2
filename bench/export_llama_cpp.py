"""Does an exported GGUF behave in llama.cpp like the model kotune trained? Greedy replies, side by side.

    python bench/export_llama_cpp.py RUN_OR_MERGED_DIR [--quant f32] [--rows 30] [--max-new-tokens 128]

Exports the folder (a run is merged first) with ``kotune export``, then for each held-out row
(``data/ko-instruct-demo-heldout.jsonl``):

* kotune: the prompt as training built it (``row_prompt`` + ``encode_prompt``), greedy decoding on the merged model
  in transformers (``kotune.inference.generate.generate``, one row at a time), stopping at the run's stop ids;
* llama.cpp (``llama-cpp-python``): the prompt rendered by the GGUF's own ``tokenizer.chat_template`` (the Jinja
  formatter llama-cpp-python uses for GGUF templates), tokenized by llama.cpp, greedy decoding (top-k 1) until a
  token llama.cpp itself counts as end of generation.

It reports, per row and overall, whether the prompt ids, the reply ids and the way the reply ended (EOS or the
token limit) are the same. ``compare`` is what ``tests/test_e2e_train.py::test_llama_cpp_replies_equal_kotunes`` runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "data" / "ko-instruct-demo-heldout.jsonl"


@dataclass
class Row:
    index: int
    prompt_same: bool
    kotune_ids: list[int]
    llama_ids: list[int]
    kotune_stopped: bool
    llama_stopped: bool

    @property
    def same(self) -> bool:
        return self.prompt_same and self.kotune_ids == self.llama_ids and self.kotune_stopped == self.llama_stopped


def kotune_replies(merged: Path, rows: list[dict], max_new_tokens: int) -> tuple[list[list[int]], list]:
    """(prompt ids, Generation) per row: kotune's own prompt building and greedy decoding on the merged model."""
    from kotune.inference.generate import Sampling, encode_prompt, generate, pad_id, row_prompt
    from kotune.inference.load import load_model
    from kotune.run_folder import folder_stop_ids, open_folder

    folder = open_folder(merged)
    model, tokenizer = load_model(folder)
    stops = folder_stop_ids(folder, tokenizer, model)
    sampling = Sampling(max_new_tokens=max_new_tokens)
    prompts = [encode_prompt(tokenizer, row_prompt(r, folder.fmt, folder, tokenizer, "held-out")) for r in rows]
    return prompts, [generate(model, [p], pad_id(tokenizer), stops, sampling)[0] for p in prompts]


def llama_cpp_reply(llm, formatter, row: dict, max_new_tokens: int) -> tuple[list[int], list[int], bool]:
    """(prompt ids, reply ids, ended by end-of-generation) from llama.cpp, prompted through the GGUF's template."""
    import llama_cpp

    message = {"role": "user", "content": row["instruction"], "input": row.get("input") or ""}
    rendered = formatter(messages=[message])
    prompt = llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)
    reply: list[int] = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            return prompt, reply, True
        reply.append(token)
        if len(reply) == max_new_tokens:
            return prompt, reply, False
    raise AssertionError("llama.cpp stopped generating without end of generation or the token limit")


def compare(merged: Path, gguf: Path, rows: list[dict], max_new_tokens: int) -> list[Row]:
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    prompts, generations = kotune_replies(merged, rows, max_new_tokens)
    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=2, verbose=False)
    meta = llm.metadata
    tokens = llm._model  # the vocabulary's token strings, for the formatter's bos_token / eos_token
    formatter = Jinja2ChatFormatter(
        template=meta["tokenizer.chat_template"],
        eos_token=tokens.token_get_text(int(meta["tokenizer.ggml.eos_token_id"])),
        bos_token=tokens.token_get_text(int(meta["tokenizer.ggml.bos_token_id"])),
    )
    results = []
    for i, (row, prompt, gen) in enumerate(zip(rows, prompts, generations, strict=True)):
        llama_prompt, reply, stopped = llama_cpp_reply(llm, formatter, row, max_new_tokens)
        results.append(Row(i, llama_prompt == prompt, gen.ids, reply, gen.stopped, stopped))
    return results


def summary(results: list[Row]) -> dict:
    n = len(results)
    return {
        "rows": n,
        "prompt ids equal": sum(r.prompt_same for r in results),
        "replies equal (ids and ending)": sum(r.same for r in results),
        "kotune ended with EOS": sum(r.kotune_stopped for r in results),
        "llama.cpp ended with EOS": sum(r.llama_stopped for r in results),
        "reply tokens (kotune, total)": sum(len(r.kotune_ids) for r in results),
    }


def main() -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from kotune.export.gguf import export_gguf, source_of

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path", help="a kotune run (merged first) or merged folder")
    parser.add_argument("--quant", default="f32")
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    merged = source_of(args.path).model_dir
    gguf = Path(args.path) / f"{Path(args.path).resolve().name}-{args.quant}.gguf"
    if not gguf.exists():
        export_gguf(args.path, args.quant, gguf)
    rows = [json.loads(line) for line in HELDOUT.read_text(encoding="utf-8").splitlines()[: args.rows]]
    results = compare(merged, gguf, rows, args.max_new_tokens)
    for r in results:
        if not r.same:
            first = next((i for i, (a, b) in enumerate(zip(r.kotune_ids, r.llama_ids, strict=False)) if a != b), None)
            print(
                f"row {r.index}: prompt same {r.prompt_same}, first differing reply token {first}, "
                f"lengths {len(r.kotune_ids)} / {len(r.llama_ids)}, EOS {r.kotune_stopped} / {r.llama_stopped}"
            )
    print(json.dumps({"gguf": str(gguf), "quant": args.quant, **summary(results)}, indent=1))


if __name__ == "__main__":
    main()
