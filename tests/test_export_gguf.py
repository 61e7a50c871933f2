"""``kotune export``: the GGUF loads back in transformers with the merged model's logits, the same token ids for the
tricky Korean rows and a chat template rendering kotune's prompts; the Modelfile says the same in Go templates.

The merged folder is built here, not trained: the tiny random Llama of ``build_tiny_model`` (the real Llama-3
tokenizer) with the run records a merge keeps beside it (config, ko-alpaca template). Export reads nothing else, and
training and merging have their own tests. The logit round trips run on the same tiny Llama over the unit tier's
byte-level mock tokenizer: a GGUF with the 128k-token Llama-3 vocabulary takes transformers about a minute to load
on a loaded 2-core machine, one with 260 tokens well under a second. Each file is exported once for the module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import build_tiny_model
from tricky_rows import TRICKY_ROWS

from kotune.cli import main
from kotune.data.encoding import LLAMA3_SPLIT
from kotune.data.templates import ALPACA, KO_ALPACA
from kotune.export.gguf import ExportError, default_gguf_path, write_gguf
from kotune.export.gguf_arch import architecture_of, permute_rotary
from kotune.export.gguf_tokenizer import QWEN2_SPLIT, pre_tokenizer_name
from kotune.export.ollama import go_literal, go_template
from kotune.run_folder import CONFIG, save_template

ROWS = ["newline_start", "with_input", "emoji_zwj", "crlf_instruction", "digits_long", "hash_merge", "input_whitespace"]
"""Tricky rows the logit checks run over (all of them for the tokenizer and template checks)."""

# A random model's logits are nearly flat, so at some positions its top two tokens differ by less than f16 / bf16
# rounding moves them. Top-1 agreement is asked to be 100% where the source model's top token leads by more than
# LEAD (and such positions must be most of them); the share over all positions and the mean |Δ logit| are gated at
# the measured figures (bench/RESULTS.md, "Export"), with margin. f32 must be bit-exact.
LEAD = 0.01
MAX_MEAN_DELTA = {"f32": 0.0, "f16": 1e-4, "bf16": 1e-3, "q8_0": 3e-3}
MIN_RAW_TOP1 = {"f32": 1.0, "f16": 0.99, "bf16": 0.97, "q8_0": 0.97}
# k-quants of random weights (the worst case for them): every 2-D weight read back within a relative RMS error
# bound, and greedy top-1 agreement far above chance; bounds from the measured figures (bench/RESULTS.md, "Export").
K_MAX_WEIGHT_ERROR = {"q4_k_m": 0.09, "q5_k_m": 0.045, "q6_k": 0.023}
K_MIN_TOP1 = {"q4_k_m": 0.4, "q5_k_m": 0.55, "q6_k": 0.72}


def prompt_text(tokenizer, row: dict) -> str:
    """kotune's prompt for an alpaca row: BOS when the tokenizer adds one, then the ko-alpaca prompt."""
    return (tokenizer.bos_token or "") + KO_ALPACA.format(row["instruction"], row.get("input"))


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tiny_llama3_model, tiny_train_config) -> Path:
    """A merged folder as ``kotune merge`` leaves it, as far as export reads it: weights, tokenizer, run records."""
    folder = tmp_path_factory.mktemp("export") / "merged"
    shutil.copytree(tiny_llama3_model, folder)
    cfg = tiny_train_config(folder.parent / "run", {"data.format": "alpaca"})
    (folder / CONFIG).write_text(cfg.to_yaml(), encoding="utf-8")
    save_template(KO_ALPACA, folder)
    return folder


@pytest.fixture(scope="module")
def exported(merged, tmp_path_factory) -> Path:
    """``merged`` in f16 (the default), written through ``kotune export`` into a folder of its own: transformers
    reads ``gguf_file=`` with the tokenizer files of the folder holding it, which would hide what the GGUF says."""
    out = tmp_path_factory.mktemp("gguf") / "tiny-f16.gguf"
    assert main(["-q", "export", str(merged), "--format", "gguf", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def gguf_fields(exported) -> dict:
    """The f16 GGUF's metadata, read once (reading the 128k-token vocabulary is most of the time)."""
    from gguf import GGUFReader

    return GGUFReader(exported).fields


def mock_tokenizer(folder: Path, split: str) -> str:
    """The unit tier's byte-level mock tokenizer with a model's pre-tokenizer: its regex split, then bytes."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers
    from unit.conftest import build_mock_tokenizer

    build_mock_tokenizer(folder)
    backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.save(str(folder / "tokenizer.json"))
    return str(folder)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """The tiny Llama over the mock tokenizer (260 tokens, Llama-3's split), a plain model folder."""
    folder = tmp_path_factory.mktemp("small")
    return Path(build_tiny_model(folder / "model", mock_tokenizer(folder / "tokenizer", LLAMA3_SPLIT)))


@pytest.fixture(scope="module")
def small_exported(small):
    """``quant -> GGUF path`` of ``small``, written on first use."""
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(small).eos_token_id
    files = {}

    def get(quant: str) -> Path:
        if quant not in files:
            files[quant] = write_gguf(small, small.parent / f"small-{quant}.gguf", quant, None, [eos])
        return files[quant]

    return get


@pytest.fixture(scope="module")
def tokenizer(merged):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(merged)


@pytest.fixture(scope="module")
def gguf_tokenizer(exported):
    """The tokenizer transformers builds from the f16 GGUF's vocabulary and merges."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(exported.parent, gguf_file=exported.name)


def reference_logits(model_dir: Path) -> list:
    """(input ids, the source model's float32 logits) for each of ROWS' prompt + answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    found = []
    with torch.no_grad():
        for name in ROWS:
            row = TRICKY_ROWS[name]
            ids = tokenizer(prompt_text(tokenizer, row) + row["output"], add_special_tokens=False, return_tensors="pt")
            found.append((ids, model(**ids).logits[0]))
    return found


@pytest.fixture(scope="module")
def source_logits(small):
    return reference_logits(small)


def load_gguf_model(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    ).eval()


@pytest.mark.compat("gguf")
@pytest.mark.parametrize("quant", ["f32", "f16", "bf16", "q8_0"])
def test_round_trip_logits(quant, small_exported, source_logits):
    """transformers reads the GGUF back to a model whose logits match the source model's on tricky rows."""

    mean_delta, top1, clear_agree, clear, total = compare(load_gguf_model(small_exported(quant)), source_logits, LEAD)
    assert clear > total / 2 and clear_agree == clear
    assert top1 >= MIN_RAW_TOP1[quant]
    assert mean_delta <= MAX_MEAN_DELTA[quant]


def compare(back, source_logits, lead: float) -> tuple[float, float, int, int, int]:
    """(mean |Δ logit|, top-1 agreement, agreements and positions where the source's top token leads by more than
    ``lead``, positions) of the model read back from a GGUF against the source's logits; printed."""
    import torch

    deltas, agree, total, clear_agree, clear = [], 0, 0, 0, 0
    with torch.no_grad():
        for ids, a in source_logits:
            b = back(**ids).logits[0]
            deltas.append((a - b).abs().mean().item())
            same = a.argmax(-1) == b.argmax(-1)
            top2 = a.topk(2, dim=-1).values
            leads = (top2[:, 0] - top2[:, 1]) > lead
            agree, total = agree + same.sum().item(), total + len(same)
            clear_agree, clear = clear_agree + same[leads].sum().item(), clear + leads.sum().item()
    mean_delta, top1 = float(np.mean(deltas)), agree / total
    print(
        f"mean |Δ logit| {mean_delta:.2e}, top-1 agreement {top1:.4f} over {total} positions, "
        f"{clear_agree}/{clear} where the top token leads by > {lead}"
    )
    return mean_delta, top1, clear_agree, clear, total


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """``small`` with 256-wide rows, the k-quants' block: their own blocks, not llama.cpp's fallback types."""
    folder = tmp_path_factory.mktemp("wide")
    return Path(
        build_tiny_model(
            folder / "model", mock_tokenizer(folder / "tokenizer", LLAMA3_SPLIT), hidden=256, init_range=0.1
        )
    )


@pytest.mark.parametrize("quant", ["q4_k_m", "q5_k_m", "q6_k"])
def test_k_quant_round_trip(quant, wide, tmp_path):
    """llama.cpp's quantizer writes the k-quant (its block types in the file, the tokenizer and template kept) and
    transformers reads it back to logits near the source model's."""
    pytest.importorskip("llama_cpp", reason="k-quants need the quantize extra (llama-cpp-python)")
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(wide).eos_token_id
    out = write_gguf(wide, tmp_path / f"wide-{quant}.gguf", quant, "{{ 'kept' }}", [eos])
    reader = GGUFReader(out)
    types = {t.tensor_type for t in reader.tensors}
    assert {"q4_k_m": T.Q4_K, "q5_k_m": T.Q5_K, "q6_k": T.Q6_K}[quant] in types
    assert bytes(reader.fields["tokenizer.chat_template"].parts[-1]) == b"{{ 'kept' }}"
    assert [p.name for p in tmp_path.iterdir()] == [out.name], "the 16-bit intermediate file is gone"
    back = load_gguf_model(out)
    errors = weight_errors(wide, back)
    print(f"{quant}: relative RMS error of the 2-D weights, largest {max(errors.values()):.4f}")
    assert max(errors.values()) <= K_MAX_WEIGHT_ERROR[quant]  # a layout mistake reads ~1.4
    top1 = compare(back, reference_logits(wide), 0.0)[1]
    assert top1 >= K_MIN_TOP1[quant]  # chance: 1/260


def weight_errors(model_dir: Path, back) -> dict[str, float]:
    """Relative RMS error of each 2-D weight read back from a GGUF against the source model's."""
    import torch
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    found = {}
    for name, w in back.state_dict().items():
        if w.dim() == 2:
            ref = source[name]
            found[name] = ((w - ref).pow(2).mean() / ref.pow(2).mean()).sqrt().item()
    return found


def test_k_quant_without_llama_cpp_names_the_extra(wide, tmp_path, monkeypatch):
    """No quantizer installed: one error naming the extra, before any file is written."""
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(ExportError, match=r"kotune\[quantize\]"):
        write_gguf(wide, tmp_path / "x.gguf", "q4_k_m", None, [0])
    assert not any(tmp_path.iterdir())


def test_tensor_types(small_exported):
    """q8_0 quantizes the 2-D weights and keeps norms f32."""
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFReader

    types = {t.name: t.tensor_type for t in GGUFReader(small_exported("q8_0")).tensors}
    assert types["token_embd.weight"] == T.Q8_0 and types["blk.0.attn_q.weight"] == T.Q8_0
    assert types["output.weight"] == T.Q8_0  # the tiny model does not tie its embeddings
    assert types["blk.0.attn_norm.weight"] == T.F32 and types["output_norm.weight"] == T.F32


@pytest.mark.compat("gguf")
def test_metadata(gguf_fields, tokenizer):
    """Architecture, tokenizer model and pre-tokenizer, special ids and the BOS flag of the Llama-3 export."""

    def field(key):
        return gguf_fields[key].contents()

    assert field("general.architecture") == "llama"
    assert field("general.file_type") == 1  # MOSTLY_F16
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "llama-bpe"
    assert field("tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id == 128000
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert field("tokenizer.ggml.add_bos_token") is True
    assert field("llama.vocab_size") == len(gguf_fields["tokenizer.ggml.tokens"].data) == len(tokenizer)


def reads_pre_tokenizer_name() -> bool:
    """Whether transformers' GGUF reader splits text with the regex ``tokenizer.ggml.pre`` names, as llama.cpp
    does. 5.17's does not: it splits every Llama-3 GGUF with GPT-2's regex (and swaps BOS and EOS)."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        return False
    return "llama-bpe" in GGUF_PRE_TOKENIZER_SPLITS


@pytest.mark.skipif(not reads_pre_tokenizer_name(), reason="this transformers reads GGUF tokenizers as GPT-2's")
def test_gguf_tokenizer_encodes_tricky_rows_like_the_original(gguf_tokenizer, tokenizer):
    """The tokenizer transformers builds from the GGUF gives the same ids for every tricky row, BOS included."""
    for name, row in TRICKY_ROWS.items():
        text = KO_ALPACA.format(row["instruction"], row.get("input")) + row["output"]
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert gguf_tokenizer(text, add_special_tokens=False)["input_ids"] == expected, name
        assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"], name  # BOS in front, as trained
    assert gguf_tokenizer.eos_token_id == tokenizer.eos_token_id


def test_chat_template_renders_kotunes_prompts(gguf_fields, gguf_tokenizer, tokenizer):
    """The GGUF's ``tokenizer.chat_template``, rendered as llama.cpp's Python binding renders it (Jinja with
    bos_token / eos_token) and by transformers from the GGUF, gives the prompt kotune trained with for each row."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = gguf_fields["tokenizer.chat_template"].contents()
    jinja = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
    for name, row in TRICKY_ROWS.items():
        message = {"role": "user", "content": row["instruction"], "input": row.get("input")}
        expected = prompt_text(tokenizer, row)
        rendered = jinja.render(
            messages=[message], add_generation_prompt=True, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token
        )
        assert rendered == expected, name
        through_transformers = gguf_tokenizer.apply_chat_template([message], add_generation_prompt=True, tokenize=False)
        assert through_transformers == expected, name


def test_ollama_folder(merged, exported, tmp_path, capsys):
    """``--format ollama`` writes the GGUF and a Modelfile naming it, with the trained template and stop tokens;
    a second export into the same folder is refused."""
    out = tmp_path / "ollama"
    assert main(["-q", "export", str(merged), "--format", "ollama", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "merged-f16.gguf"]
    assert (out / "merged-f16.gguf").read_bytes() == exported.read_bytes()
    text = (out / "Modelfile").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert "FROM ./merged-f16.gguf" in lines
    assert f'\nTEMPLATE """{go_template(KO_ALPACA.prompt_no_input, "<|end_of_text|>")}"""\n' in text  # spans lines
    assert 'PARAMETER stop "<|end_of_text|>"' in lines
    assert {"PARAMETER temperature 0.7", "PARAMETER top_p 0.9", "PARAMETER num_ctx 4096"} <= set(lines)
    capsys.readouterr()
    assert main(["export", str(merged), "--format", "ollama", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_go_template_of_ko_alpaca():
    """Hand-checked: user turns are the no-input prompt around the message, assistant turns end with EOS."""
    assert go_template(KO_ALPACA.prompt_no_input, "</s>") == (
        '{{ range .Messages }}{{ if eq .Role "user" }}'
        "아래는 문제를 설명하는 지시사항입니다. 이 요청에 대해 적절하게 답변해주세요.\n"
        "###지시사항:{{ .Content }}\n###답변:"
        '{{ else if eq .Role "assistant" }}{{ .Content }}</s>{{ end }}{{ end }}'
    )
    # a cue ending in whitespace keeps it (no {{- trimming after it)
    assert '### Response:\n{{ else if eq .Role "assistant" }}' in go_template(ALPACA.prompt_no_input, "</s>")
    assert go_literal("a {{b}} c") == 'a {{ "{" }}{{ "{" }}b}} c'


def test_default_gguf_path():
    assert default_gguf_path(Path("outputs/ko-demo"), "q8_0") == Path("outputs/ko-demo/ko-demo-q8_0.gguf")


def test_unknown_architecture_is_refused():
    config = SimpleNamespace(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ExportError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        architecture_of(config)


def test_unknown_architecture_cli(tmp_path, merged, capsys):
    """A merged folder whose config names another architecture stops with one error line, no file written."""
    folder = tmp_path / "phi"
    shutil.copytree(merged, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["PhiForCausalLM"]}))
    assert main(["export", str(folder), "--format", "gguf"]) == 2
    assert "kotune: error: kotune cannot export PhiForCausalLM" in capsys.readouterr().err
    assert not list(folder.glob("*.gguf*"))


def test_pre_tokenizer_names(llama3_dir):
    """Llama-3's tokenizer.json maps to llama.cpp's name; Qwen2's regex is transformers' own; GPT-2's byte-level
    pre-tokenizer is ``gpt-2``; a SentencePiece-style (Metaspace) pre-tokenizer is refused."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    llama3 = json.loads((Path(llama3_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    assert pre_tokenizer_name(llama3) == "llama-bpe"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False}}) == "gpt-2"
    assert QWEN2_SPLIT == PRETOKENIZE_REGEX and LLAMA3_SPLIT != QWEN2_SPLIT
    with pytest.raises(ExportError, match="pre-tokenizer"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}})


def test_permute_rotary_interleaves_halves():
    """Per head, HF's rows (x0..x3 | y0..y3) become llama.cpp's (x0 y0 x1 y1 ...)."""
    head = 8
    weight = np.arange(2 * head, dtype=np.float32).reshape(2 * head, 1)  # two heads, one column
    out = permute_rotary(weight, heads=2)[:, 0].tolist()
    assert out == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_qwen2_round_trip(tmp_path):
    """A tiny Qwen2 (biases on q/k/v, no q/k permutation) exported in f32 gives back the same logits."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    folder = tmp_path / "qwen2"
    tokenizer = AutoTokenizer.from_pretrained(mock_tokenizer(folder, QWEN2_SPLIT))
    config = Qwen2Config(
        vocab_size=len(tokenizer) + 64,  # room for tokens a tokenizer class may add on reload; gaps become [PADn]
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # non-zero biases, so a bias lost or misplaced shows
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    model.save_pretrained(folder)
    out = write_gguf(folder, tmp_path / "qwen2.gguf", "f32", None, [tokenizer.eos_token_id])
    back = load_gguf_model(out)
    ids = tokenizer(prompt_text(tokenizer, TRICKY_ROWS["with_input"]), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        a, b = model(**ids).logits, back(**ids).logits
    assert torch.equal(a, b)


@pytest.fixture(scope="module")
def smollm2_small(tmp_path_factory, smollm2_dir) -> Path:
    """The tiny random Llama over the demo model's tokenizer: SmolLM2's, as this transformers converts its GGUF."""
    return Path(build_tiny_model(tmp_path_factory.mktemp("smollm2") / "model", smollm2_dir))


@pytest.mark.compat("gguf", "transformers")
def test_the_demo_models_tokenizer_exports(smollm2_small):
    """SmolLM2's tokenizer exports however transformers converted it (5.17: a Sequence decoder, 5.24: ByteLevel):
    GPT-2's pre-tokenizer, its vocabulary, the GGUF header's EOS ``<|im_end|>`` as EOS and as the end of a reply,
    and read back from the file it encodes the tricky rows to the ids training used."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_small)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    out = write_gguf(smollm2_small, smollm2_small.parent / "smollm2.gguf", "f16", tokenizer.chat_template, [2])
    fields = GGUFReader(out).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 2 and tokens[2] == "<|im_end|>"
    assert fields["tokenizer.ggml.bos_token_id"].contents() == 1 and tokens[1] == "<|im_start|>"
    assert "tokenizer.ggml.eot_token_id" not in fields
    assert tokens == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    back = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    for name, row in TRICKY_ROWS.items():
        text = KO_ALPACA.format(row["instruction"], row.get("input")) + row["output"]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert back(text, add_special_tokens=False)["input_ids"] == ids, name
    if reads_pre_tokenizer_name():  # 5.17 reads every GGUF's EOS as its BOS
        assert back.eos_token == "<|im_end|>"


def llama_cpp_model(path: Path, **options):
    llama_cpp = pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (the quantize extra)")
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, logits_all=True, verbose=False, **options)


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's own logits for ``ids`` from the GGUF at ``path`` (every position)."""
    llm = llama_cpp_model(path)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def tiny_model(folder: Path, family: str, tokenizer_dir: str, **config):
    """A tiny random ``family`` model (``llama``, ``qwen3``, ``gemma3``, ``exaone4``) over a real tokenizer, saved."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config_class, model_class = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
        "exaone4": ("Exaone4Config", "Exaone4ForCausalLM"),
    }[family]
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    shape.update(num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1)
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(vocab_size=config.pop("vocab_size", len(tokenizer)), **shape | config)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():  # norms away from 1, so a norm lost or misplaced shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


# Llama 3.1's scaling with a short original context, so that it moves most rotary frequencies of the test rows.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
    "rope_theta": 10_000.0,
}


EXAONE4_GLOBAL = {"sliding_window": None, "layer_types": ["full_attention"] * 2}
"""EXAONE 4 without a window: every layer global, with RoPE (``test_windowed_exaone4_is_refused``: the rest)."""


@pytest.mark.parametrize(
    ("family", "rope", "extra"),
    [
        ("llama", LLAMA3_ROPE, {}),
        ("llama", {"rope_type": "linear", "factor": 4.0, "rope_theta": 10_000.0}, {}),
        ("qwen3", {"rope_type": "default", "rope_theta": 1_000_000.0}, {}),
        ("exaone4", {"rope_type": "default", "rope_theta": 1_000_000.0}, EXAONE4_GLOBAL),
    ],
    ids=["llama3-scaling", "linear-scaling", "qwen3", "exaone4"],
)
def test_new_families_give_the_same_logits_in_llama_cpp(family, rope, extra, tmp_path):
    """Rope-scaled Llama (3.1+), Qwen3 (q/k norms) and EXAONE 4 (norms after attention and MLP) exported in f32,
    over real tokenizers (EXAONE 4's is not packaged: Qwen3's stands in): llama.cpp itself computes the source
    model's logits; the same model with plain rotary embeddings does not (the scaling is in the file)."""
    import torch
    from conftest import npm_tokenizer

    tokenizer_dir = npm_tokenizer("llama3_1" if family == "llama" else "qwen3")
    model, tokenizer = tiny_model(tmp_path / "model", family, tokenizer_dir, rope_parameters=rope, **extra)
    out = write_gguf(tmp_path / "model", tmp_path / "model.gguf", "f32", None, [tokenizer.eos_token_id])
    text = prompt_text(tokenizer, TRICKY_ROWS["with_input"]) + TRICKY_ROWS["with_input"]["output"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:120]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = llama_cpp_logits(out, ids)
    error = np.abs(got - want).max() / np.abs(want).mean()  # llama.cpp keeps its KV cache in f16
    print(f"{family} {rope['rope_type']}: largest |Δ logit| / mean |logit| {error:.2e}")
    assert error <= 2e-2
    if rope["rope_type"] != "default":
        plain_config = model.config.to_dict() | {"rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0}}
        plain = type(model)(type(model.config).from_dict(plain_config)).eval()
        plain.load_state_dict(model.state_dict())
        with torch.no_grad():
            unscaled = plain(torch.tensor([ids])).logits[0].numpy()
        unscaled_error = np.abs(got - unscaled).max() / np.abs(want).mean()
        print(f"  against the same model without the scaling: {unscaled_error:.2e}")
        assert unscaled_error > 10 * error, "the scaling did not matter here"


def test_gemma3_gives_the_same_tokens_and_logits_in_llama_cpp(tmp_path):
    """Gemma 3 over its real tokenizer (SentencePiece, written as pieces with scores), its norms shifted by one, five
    local layers with an 8-token window then a global one with linear rope scaling, exported in f32: llama.cpp splits
    the tricky rows into transformers' ids and computes the source model's logits; the same file with every piece
    scored alike splits some rows differently."""
    import dataclasses

    import gguf
    import torch
    from conftest import npm_tokenizer

    from kotune.export.gguf_tokenizer import gguf_tokenizer, write_tokenizer

    rope = {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    }
    shape = dict(num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    model, tokenizer = tiny_model(
        tmp_path / "model",
        "gemma3",
        npm_tokenizer("gemma3"),
        vocab_size=262_208,
        sliding_window=8,
        query_pre_attn_scalar=32,
        rope_parameters=rope,
        **shape,
    )
    out = write_gguf(tmp_path / "model", tmp_path / "model.gguf", "f32", None, [tokenizer.eos_token_id])
    llm = llama_cpp_model(out, type_k=0, type_v=0)  # an f32 KV cache: what is left is ggml's f16 GELU table
    texts = [prompt_text(tokenizer, row) + row["output"] for row in TRICKY_ROWS.values()]
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(
            text, add_special_tokens=False
        ), text[:80]
    ids = tokenizer(texts[0], add_special_tokens=True)["input_ids"][:120]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)], dtype=np.float32)
    error = np.abs(got - want).max() / np.abs(want).mean()
    print(f"gemma3: largest |Δ logit| / mean |logit| {error:.2e} over {len(ids)} tokens")
    assert error <= 2e-2
    for change in ({"sliding_window": 512}, {"rope_parameters": {**rope, "full_attention": rope["sliding_attention"]}}):
        other = type(model)(type(model.config).from_dict(model.config.to_dict() | change)).eval()
        other.load_state_dict(model.state_dict())
        with torch.no_grad():
            other_error = np.abs(got - other(torch.tensor([ids])).logits[0].numpy()).max() / np.abs(want).mean()
        print(f"  against the same model with {change}: {other_error:.2e}")
        assert other_error > 3 * error, f"{change} did not matter here"

    spec = gguf_tokenizer(tokenizer, 262_208, [tokenizer.eos_token_id], None)
    flat = tmp_path / "flat-scores.gguf"
    writer = gguf.GGUFWriter(flat, "gemma3")
    writer.add_block_count(1)
    write_tokenizer(writer, dataclasses.replace(spec, scores=[0.0] * len(spec.tokens)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    llama_cpp = pytest.importorskip("llama_cpp")
    flat_llm = llama_cpp.Llama(model_path=str(flat), vocab_only=True, verbose=False)
    split = [flat_llm.tokenize(t.encode(), add_bos=False, special=True) for t in texts]
    assert split != [tokenizer.encode(t, add_special_tokens=False) for t in texts], "the scores did not matter here"


@pytest.mark.parametrize("architecture", ["Gemma3ForConditionalGeneration", "MistralForCausalLM"])
def test_families_not_exported_yet_are_refused_by_name(architecture):
    config = SimpleNamespace(architectures=[architecture], model_type=architecture.lower())
    with pytest.raises(ExportError, match=f"{architecture}.*yet: "):
        architecture_of(config)


def test_windowed_exaone4_is_refused():
    """llama.cpp (0.3.36) reads a windowed EXAONE 4 file as all-global with RoPE everywhere (measured: its logits
    matched that model's, not the source's), so kotune refuses to write one."""
    config = SimpleNamespace(architectures=["Exaone4ForCausalLM"], model_type="exaone4", sliding_window=4096)
    with pytest.raises(ExportError, match="sliding window"):
        architecture_of(config)


def test_an_unexported_rope_scaling_is_refused_by_name():
    config = SimpleNamespace(architectures=["LlamaForCausalLM"], rope_parameters={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ExportError, match="rope type 'yarn'"):
        architecture_of(config)
