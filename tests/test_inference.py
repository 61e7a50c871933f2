"""Inference functions: sampling, left padding, batched greedy generation against transformers' own generate,
stop tokens, streamed text, prompts encoded exactly as training encoded them, chat history."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kotune import run_folder
from kotune.data import conversations
from kotune.fast.generation import positions
from kotune.inference import generate as inference
from kotune.inference import load
from kotune.inference.generate import Sampling


# -- sample, pad, positions: hand-checkable ---------------------------------------------------------
def test_greedy_picks_argmax_per_row():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 4.9]])
    assert inference.sample(logits, Sampling(temperature=0.0)).tolist() == [1, 0]


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    draws = {inference.sample(logits, Sampling(temperature=1.0, top_p=0.7), generator).item() for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.7 so token 1 is needed; 0.8 >= 0.7 so tokens 2 and 3 are cut
    tiny_p = {inference.sample(logits, Sampling(temperature=1.0, top_p=0.01), generator).item() for _ in range(50)}
    assert tiny_p == {0}


def test_sampling_is_reproducible_with_a_seed():
    logits = torch.randn(3, 50)
    a = [inference.sample(logits, Sampling(temperature=1.0), torch.Generator().manual_seed(7)) for _ in range(2)]
    b = [inference.sample(logits, Sampling(temperature=1.0), torch.Generator().manual_seed(7)) for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_left_pad_and_positions():
    ids, mask = inference.left_pad([[5, 6, 7], [8]], pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


# -- generation on the tiny model -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_llama3_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama3_model, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama3_model)


PROMPTS = [[128000, 9906, 1917, 11, 1268], [128000, 101193, 124409], [128000, 40, 1093, 4447, 12, 220, 17, 18, 19]]


@pytest.mark.compat("transformers")
def test_batched_left_padded_greedy_matches_transformers_generate(tiny):
    model, tokenizer = tiny
    ours = inference.generate(model, PROMPTS, tokenizer.eos_token_id, [], Sampling(max_new_tokens=8))
    for prompt, got in zip(PROMPTS, ours, strict=True):
        expected = model.generate(
            torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
        assert got.ids == expected
        assert got.stopped is False


def test_repetition_penalty_is_transformers_and_ignores_padding():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    ids, logits = torch.randint(0, 50, (3, 12)), torch.randn(3, 50) * 3
    ours = inference.SeenTokens(ids, torch.ones_like(ids), 50).penalize(logits, 1.3)
    assert torch.allclose(ours, RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone()))
    assert not torch.equal(ours, logits)
    ids, mask = inference.left_pad([[4], [7, 4]], pad_id=7, device="cpu")  # 7 pads row 0, is text in row 1
    assert ids.tolist() == [[7, 4], [7, 4]]
    penalized = inference.SeenTokens(ids, mask, 10).penalize(torch.full((2, 10), 2.0), 2.0)
    assert penalized.tolist() == [[2, 2, 2, 2, 1, 2, 2, 2, 2, 2], [2, 2, 2, 2, 1, 2, 2, 1, 2, 2]]


class FavouriteTokens(torch.nn.Module):
    """A stand-in model whose next-token scores are always 10 for token 5, 9 for token 6, 0 for the rest."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **_):
        from types import SimpleNamespace

        logits = torch.zeros(*input_ids.shape, 20)
        logits[..., 5], logits[..., 6] = 10.0, 9.0
        return SimpleNamespace(logits=logits, **{inference.cache_name(): None})


def test_repetition_penalty_counts_the_reply_as_it_grows():
    model = FavouriteTokens()
    plain = inference.generate(model, [[1, 2]], 0, [], Sampling(max_new_tokens=4))
    assert plain[0].ids == [5, 5, 5, 5]
    # 5 once said scores 10/2 = 5 < 9, so 6; then 6 scores 4.5 < 5, so 5 again, and 5 stays ahead
    penalized = inference.generate(model, [[1, 2]], 0, [], Sampling(max_new_tokens=4, repetition_penalty=2.0))
    assert penalized[0].ids == [5, 6, 5, 5]


@pytest.mark.compat("transformers")  # a stopped row leaves the batch: the KV cache's reorder_cache
def test_generation_stops_at_a_stop_token_and_leaves_other_rows_alone(tiny):
    """Row 0 stops at its third token and leaves the batch (and the cache); row 1 goes on as if alone."""
    model, tokenizer = tiny
    free = inference.generate(model, PROMPTS, tokenizer.eos_token_id, [], Sampling(max_new_tokens=6))
    stop = free[0].ids[2]  # the third token row 0 produces
    assert stop not in free[1].ids, "pick a stop token that only row 0 meets"
    stopped = inference.generate(model, PROMPTS, tokenizer.eos_token_id, [stop], Sampling(max_new_tokens=6))
    first = free[0].ids.index(stop)
    assert stopped[0].ids == free[0].ids[:first] and stopped[0].stopped is True
    assert stopped[1].ids == free[1].ids and stopped[1].stopped is False
    streamed = list(inference.stream(model, PROMPTS[0], tokenizer.eos_token_id, [stop], Sampling(max_new_tokens=6)))
    assert streamed == stopped[0].ids


def test_text_stream_never_shows_half_a_hangul_syllable(llama3_tokenizer):
    text = "뷁꿿 똠방각하 쌰럄 안녕하세요"
    ids = llama3_tokenizer(text, add_special_tokens=False)["input_ids"]
    prefixes = [llama3_tokenizer.decode(ids[:k]) for k in range(1, len(ids))]
    assert any(p.endswith("\ufffd") for p in prefixes), "the text should split a syllable over tokens"
    stream = inference.TextStream(llama3_tokenizer)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == text == stream.text()
    assert not any("\ufffd" in p for p in pieces)


def test_a_reply_cut_inside_a_syllable_ends_with_the_last_whole_character(llama3_tokenizer):
    ids = llama3_tokenizer("안녕 뷁", add_special_tokens=False)["input_ids"]
    cut = next(k for k in range(len(ids), 0, -1) if llama3_tokenizer.decode(ids[:k]).endswith("\ufffd"))
    assert inference.completion_text(llama3_tokenizer, ids[:cut]) == "안녕"  # the space rides in the cut token
    assert inference.completion_text(llama3_tokenizer, ids) == "안녕 뷁"
    stream = inference.TextStream(llama3_tokenizer)
    assert "".join(stream.push(i) for i in ids[:cut]) == "안녕" == stream.text()


# -- prompts as training built them -----------------------------------------------------------------
def test_prompt_ids_are_the_training_rows_prompt_ids(llama3_train_tokenizer):
    from reference_encoding import encode_rows

    from kotune.config import Config
    from kotune.data.examples import IGNORE
    from kotune.data.formats import render_alpaca
    from kotune.data.templates import KO_ALPACA

    rows = [
        {"_row": 0, "instruction": "다음 문장을 요약하세요", "input": '"따옴표"로 시작', "output": "요약입니다."},
        {"_row": 1, "instruction": "하늘은 왜 파란가요?", "input": "", "output": "\n산란 때문입니다."},
    ]
    rendered = [render_alpaca(r, KO_ALPACA, False, "test") for r in rows]
    examples, _ = encode_rows(llama3_train_tokenizer, rendered, cutoff_len=512)
    folder = run_folder.ModelFolder(Path("run"), False, Config(), KO_ALPACA, "alpaca")
    for row, example in zip(rows, examples, strict=True):
        prompt = inference.row_prompt(row, "alpaca", folder, llama3_train_tokenizer, "test")
        ids = inference.encode_prompt(llama3_train_tokenizer, prompt)
        assert example.input_ids[: len(ids)] == ids
        assert set(example.labels[: len(ids)]) == {IGNORE} and example.labels[len(ids)] != IGNORE


def test_stop_ids_hold_eos_and_the_chat_templates_end_of_turn(llama3_tokenizer):
    eot = llama3_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert conversations.end_of_turn_id(llama3_tokenizer) == eot
    stops = conversations.stop_ids(llama3_tokenizer)
    assert stops[:2] == [llama3_tokenizer.eos_token_id, eot]


def test_conversation_rows_become_messages_without_the_final_answer():
    row = {
        "_row": 3,
        "conversations": [
            {"from": "system", "value": "짧게 답하세요."},
            {"from": "human", "value": "안녕?"},
            {"from": "gpt", "value": "안녕하세요."},
        ],
    }
    assert inference.prompt_messages(row, "sharegpt", "f.jsonl") == [
        {"role": "system", "content": "짧게 답하세요."},
        {"role": "user", "content": "안녕?"},
    ]
    from kotune.data.read import DataError

    with pytest.raises(DataError, match="row 3"):
        inference.prompt_messages({"_row": 3, "conversations": [{"from": "robot", "value": "x"}]}, "sharegpt", "f")
    with pytest.raises(DataError, match="no turn before the answer"):
        inference.prompt_messages({"_row": 4, "messages": [{"role": "assistant", "content": "x"}]}, "messages", "f")


def test_conversation_prompts_follow_the_chat_template_training_used(llama3_train_tokenizer):
    """The prompt is the training rendering of the turns before the reply; with the plain template, EOS ends turns."""
    from reference_encoding import encode_rows

    from kotune.config import Config
    from kotune.data.conversations import resolve_chat_template
    from kotune.data.prepare import render_rows
    from kotune.data.templates import KO_ALPACA

    messages = [{"role": "user", "content": "안녕?"}, {"role": "assistant", "content": "네, 안녕하세요."}]
    for chat_template in (None, "plain"):
        cfg = Config()
        cfg.data.chat_template = chat_template
        rendered, _ = render_rows(
            [{"_row": 0, "messages": messages}], "messages", cfg.data, KO_ALPACA, llama3_train_tokenizer
        )
        [example], _ = encode_rows(llama3_train_tokenizer, rendered, cutoff_len=512)
        prompt = inference.chat_prompt(llama3_train_tokenizer, messages[:1], cfg.data)
        ids = inference.encode_prompt(llama3_train_tokenizer, prompt)
        assert example.input_ids[: len(ids)] == ids, chat_template
        assert example.labels[len(ids) - 1] == -100 and example.labels[len(ids)] != -100
        trained_end = example.input_ids[max(i for i, t in enumerate(example.labels) if t != -100)]
        stops = conversations.stop_ids(
            llama3_train_tokenizer, None, resolve_chat_template(chat_template, llama3_train_tokenizer)
        )
        assert trained_end in stops  # the token training ends an assistant turn with stops generation


def test_chat_session_keeps_history_for_conversation_runs(tiny, tmp_path):
    from kotune.commands.chat import ChatSession
    from kotune.config import Config
    from kotune.data.templates import KO_ALPACA

    model, tokenizer = tiny
    folder = run_folder.ModelFolder(tmp_path, True, Config(), KO_ALPACA, "messages")
    session = ChatSession(model, tokenizer, folder, Sampling(max_new_tokens=4))
    first = "".join(session.reply("안녕?"))
    assert [m["role"] for m in session.history] == ["user", "assistant"]
    assert session.history[1]["content"] == first
    second_prompt = session.prompt("다음 질문")
    assert "안녕?" in second_prompt and second_prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    session.reset()
    assert session.history == [] and "안녕?" not in session.prompt("다음 질문")

    one_turn = ChatSession(
        model, tokenizer, folder.__class__(tmp_path, True, Config(), KO_ALPACA, "alpaca"), Sampling(max_new_tokens=4)
    )
    assert one_turn.prompt("질문") == KO_ALPACA.format("질문")
    list(one_turn.reply("질문"))
    assert one_turn.history == []


def test_an_adapter_loads_on_the_4bit_or_the_full_precision_base(tiny_qlora_run):
    import bitsandbytes as bnb

    folder = run_folder.open_folder(tiny_qlora_run[0])
    as_trained, _ = load.load_model(folder)
    full, _ = load.load_model(folder, base="none")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in as_trained.modules())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in full.modules())
    ids = torch.tensor([[128000, 1234, 5678]])
    with torch.no_grad():
        drift = (full(input_ids=ids).logits - as_trained(input_ids=ids).logits).abs().max()
    assert 0 < drift < 1  # the same adapter on weights that differ by the NF4 rounding


def test_load_base_never_reads_pickle_weights_unless_allowed(tiny_llama3_model, tmp_path):
    """A folder with pickle weights beside an unrelated safetensors file passes the folder scan; the load itself
    must still refuse the pickle, as training's does (a hub name reaches only this guard)."""
    import pickle
    import shutil

    from kotune.config import ModelConfig
    from kotune.model.load import load_base

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_llama3_model, folder)
    (folder / "model.safetensors").rename(folder / "unrelated.safetensors")
    sentinel = tmp_path / "unpickled"
    # unpickling this file creates ``sentinel``: the proof that a load read it
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Unpickled(str(sentinel))))
    with pytest.raises(OSError, match="safetensors"):
        load_base(ModelConfig(path=str(folder), compute_dtype="float32"), "none")
    assert not sentinel.exists()


class Unpickled:
    """Writes a file named ``path`` when unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.path),))
