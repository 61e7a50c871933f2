"""A model written directly in 4-bit loads in transformers as if it had saved it, and its row slices read back
the same values bitsandbytes dequantizes."""

from __future__ import annotations

import json

import pytest
import torch

from kotune.model.prequantized import read_quantized_rows, write_random_4bit

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
LINEARS += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=300,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # shards of ~200 kB: the tiny model spreads over several files, as a 70B one does
    return write_random_4bit(tiny_config(), tmp_path_factory.mktemp("prequant") / "a", seed=3, shard_bytes=200_000)


@pytest.fixture(scope="module")
def loaded(folder):
    from transformers import AutoModelForCausalLM

    from kotune.model.load import keep_4bit_weights_exact

    model, info = AutoModelForCausalLM.from_pretrained(folder, device_map={"": "cpu"}, output_loading_info=True)
    keep_4bit_weights_exact(model)  # the forward test must not repack the weights the other tests read
    return model, info


def stored(folder, key: str) -> torch.Tensor:
    from safetensors import safe_open

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    with safe_open(folder / index["weight_map"][key], "pt") as f:
        return f.get_tensor(key)


def test_folder_is_sharded_with_an_index_and_the_4bit_config(folder):
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert quant["load_in_4bit"] and quant["bnb_4bit_quant_type"] == "nf4" and quant["bnb_4bit_use_double_quant"]
    assert (quant["bnb_4bit_compute_dtype"], quant["bnb_4bit_quant_storage"]) == ("bfloat16", "uint8")


def test_loads_in_transformers_without_missing_or_unexpected_keys(loaded):
    import bitsandbytes as bnb

    model, info = loaded
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 2 * len(LINEARS)
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)


def test_loaded_quant_states_are_the_files(folder, loaded):
    model, _ = loaded
    for layer in range(2):
        for linear in LINEARS:
            name = f"model.layers.{layer}.{linear}.weight"
            module = model.get_submodule(name.removesuffix(".weight"))
            weight, state = module.weight, module.weight.quant_state
            assert torch.equal(weight.data, stored(folder, name))
            assert torch.equal(state.absmax, stored(folder, f"{name}.absmax"))
            assert torch.equal(state.code, stored(folder, f"{name}.quant_map"))
            assert torch.equal(state.state2.absmax, stored(folder, f"{name}.nested_absmax"))
            assert torch.equal(state.state2.code, stored(folder, f"{name}.nested_quant_map"))
            packed_state = json.loads(bytes(stored(folder, f"{name}.quant_state.bitsandbytes__nf4").tolist()))
            assert state.offset.item() == packed_state["nested_offset"]
            assert state.dtype == torch.bfloat16 and tuple(state.shape) == (module.out_features, module.in_features)
    assert torch.equal(model.lm_head.weight, stored(folder, "lm_head.weight"))


def test_forward_gives_finite_logits(loaded):
    model, _ = loaded
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 200, 17, 42]])).logits
    assert logits.shape == (1, 6, 300) and torch.isfinite(logits).all()


def test_same_seed_writes_the_same_bytes(folder, tmp_path):
    again = write_random_4bit(tiny_config(), tmp_path / "b", seed=3, shard_bytes=200_000)
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (folder / name).read_bytes() == (again / name).read_bytes(), name
    other = write_random_4bit(tiny_config(), tmp_path / "c", seed=4, shard_bytes=200_000)
    assert not torch.equal(stored(folder, "model.embed_tokens.weight"), stored(other, "model.embed_tokens.weight"))


def dequantize(pieces: dict) -> torch.Tensor:
    """Reference NF4 double-quant dequantization: value = table[nibble] * (code2[absmax] * absmax2 + offset)."""
    packed = pieces["packed"].long()
    nibbles = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)  # high nibble first
    absmax = pieces["code2"][pieces["absmax"].long()]
    absmax = absmax * pieces["absmax2"].repeat_interleave(pieces["blocksize2"])[: len(absmax)] + pieces["offset"]
    scale = absmax.repeat_interleave(pieces["blocksize"])[: len(nibbles)]
    return (pieces["table"][nibbles] * scale).to(torch.bfloat16).reshape(-1, pieces["shape"][1])


@pytest.mark.parametrize("linear", ["mlp.gate_proj", "mlp.down_proj", "self_attn.k_proj"])
def test_row_slices_dequantize_as_bitsandbytes(folder, loaded, linear):
    import bitsandbytes.functional as bnbf

    name = f"model.layers.1.{linear}"
    weight = loaded[0].get_submodule(name).weight
    out = weight.quant_state.shape[0]
    whole = read_quantized_rows(folder, name, (0, out))
    first, second = read_quantized_rows(folder, name, (0, out // 2)), read_quantized_rows(folder, name, (out // 2, out))
    assert whole["shape"] == tuple(weight.quant_state.shape)
    for key in ("packed", "absmax", "absmax2"):
        assert torch.equal(torch.cat([first[key], second[key]]), whole[key]), key
    expected = bnbf.dequantize_4bit(weight.data, weight.quant_state)
    assert torch.equal(dequantize(whole), expected)
    assert torch.equal(torch.cat([dequantize(first), dequantize(second)]), expected)


def test_rows_off_a_nested_group_are_refused(folder):
    # q_proj is (256, 256): a nested group of 64 x 256 values is 64 rows
    with pytest.raises(ValueError, match=r"q_proj: rows \[0, 10\).*multiples of 64"):
        read_quantized_rows(folder, "model.layers.0.self_attn.q_proj", (0, 10))
    with pytest.raises(ValueError, match=r"rows \[32, 256\)"):
        read_quantized_rows(folder, "model.layers.0.self_attn.q_proj", (32, 256))
    with pytest.raises(ValueError, match="no tensor"):
        read_quantized_rows(folder, "model.layers.0.self_attn.nope", (0, 64))


def fsdp_bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "fsdp_bench.py"
    spec = importlib.util.spec_from_file_location("fsdp_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_writes_the_tiny_llama3_shape_with_its_tokenizer(tmp_path, capsys, llama3_dir):
    from transformers import AutoConfig, AutoTokenizer

    fsdp_bench().main(["--shape", "tiny", "--folder", str(tmp_path / "m"), "--write", "--tokenizer", llama3_dir])
    record = json.loads(capsys.readouterr().out.split("RESULT ", 1)[1])
    assert record["shape"] == "tiny" and record["files"] == 1 and record["tokenizer"]
    config = AutoConfig.from_pretrained(tmp_path / "m")
    assert (config.hidden_size, config.vocab_size, config.rope_parameters["rope_theta"]) == (256, 128256, 500000.0)
    assert len(AutoTokenizer.from_pretrained(tmp_path / "m")) == config.vocab_size


def test_bench_70b_shape_is_about_37_gb_in_many_files():
    from kotune.model.prequantized import DEFAULT_SHARD_BYTES, shard_plan, stored_bytes, tensor_plan

    plan = tensor_plan(fsdp_bench().llama3_config("70b"))
    assert 36e9 < sum(stored_bytes(shape, kind) for _, shape, kind in plan) < 41e9
    assert len(shard_plan(plan, DEFAULT_SHARD_BYTES)) > 15
