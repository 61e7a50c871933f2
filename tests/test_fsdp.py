"""FSDP2 (``train.distributed: fsdp``): the 4-bit weight tensor FSDP shards, and two processes (torchrun, gloo on the
CPU) training as one does, from a plain folder and from a pre-quantized 4-bit one read a layer at a time.

The model has hidden size 256 so that every 4-bit weight splits into two shards of whole quantization groups
(64 x 256 values each). LoRA dropout is off, as in ``test_ddp.py``: everything else is the CLI as users run it.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import build_tiny_model, write_jsonl
from test_ddp import assert_same_run, kotune, losses
from test_pref_train import PAIRS

from kotune.fast.nf4_tensor import NF4Tensor
from kotune.model.load import nf4_config


def _params4bit(rows: int, cols: int, nested: bool, seed: int = 0):
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    weight = bnb.nn.Params4bit(
        torch.randn(rows, cols), requires_grad=False, compress_statistics=nested, quant_type="nf4"
    )
    return weight._quantize("cpu") if hasattr(weight, "_quantize") else weight.to("cpu")


def _nf4(weight) -> NF4Tensor:
    return NF4Tensor.from_quant_state(weight.data, weight.quant_state)


@pytest.mark.parametrize("nested", [True, False])
def test_nf4_tensor_dequantizes_as_bitsandbytes_does(nested):
    import bitsandbytes.functional as F

    weight = _params4bit(128, 256, nested)
    want = F.dequantize_4bit(weight.data, weight.quant_state)
    got = NF4Tensor.from_quant_state(weight.data, weight.quant_state).dequantize_reference(want.dtype)
    assert got.shape == want.shape and torch.equal(got, want)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("nested", [True, False])
def test_the_all_gather_of_shards_rebuilds_the_weight_bit_for_bit(world, nested):
    """Shard as FSDP2 does (``torch.chunk`` on rows), concatenate what each shard sends, rebuild: every inner
    tensor and every dequantized value equal the whole weight's."""
    whole = _nf4(_params4bit(64 * world, 1024, nested, seed=world))
    shards = torch.chunk(whole, world)
    assert all(isinstance(s, NF4Tensor) and s.shape == (64, 1024) for s in shards)
    sent = [s.fsdp_pre_all_gather(None, whole.shape, whole.stride(), None, None) for s in shards]
    names = sent[0][1]
    gathered = tuple(torch.cat([inputs[i] for inputs, _ in sent]) for i in range(len(names)))
    rebuilt, inner = shards[0].fsdp_post_all_gather(gathered, names, whole.dtype)
    assert rebuilt.shape == whole.shape and len(inner) == len(names)
    for name in names:
        assert torch.equal(getattr(rebuilt, name), getattr(whole, name)), name
    assert torch.equal(rebuilt.dequantize_reference(torch.float32), whole.dequantize_reference(torch.float32))
    assert rebuilt.packed.data_ptr() == gathered[0].data_ptr()  # the gathered buffer itself, not a copy


def test_a_shard_that_splits_a_quantization_group_is_refused():
    whole = _nf4(_params4bit(128, 256, nested=True))  # 2 groups of 16,384 values
    with pytest.raises(ValueError, match="whole quantization groups"):
        torch.chunk(whole, 4)


def test_fsdp_padding_and_copy_keep_the_values():
    """What ``fully_shard`` does to a shard: a zero tensor of its size, the shard copied in, viewed flat."""
    whole = _nf4(_params4bit(128, 256, nested=True))
    shard = torch.chunk(whole, 2)[1]
    padded = shard.new_zeros(shard.shape)
    padded.narrow(0, 0, shard.shape[0]).copy_(shard)
    assert torch.equal(padded.dequantize_reference(torch.float32), shard.dequantize_reference(torch.float32))
    assert padded.view(-1).shape == (shard.numel(),)
    with pytest.raises(NotImplementedError, match="frozen 4-bit weight"):
        torch.add(whole, 1)


def test_fsdp_refuses_what_it_cannot_train(tiny_train_config, tmp_path):
    from kotune.training.build import refuse_unsharded_recipe
    from kotune.training.fsdp import CannotShard

    cfg = tiny_train_config(tmp_path / "run", {"model.quantization": "4bit"})
    assert refuse_unsharded_recipe(cfg, cfg.model.path) == "train.distributed fsdp"
    for overrides, reason in [
        ({"model.quantization": "none"}, "model.quantization none"),
        ({"model.quantization": "4bit", "model.gradient_checkpointing": False}, "gradient_checkpointing"),
    ]:
        with pytest.raises(CannotShard, match=reason):
            refuse_unsharded_recipe(tiny_train_config(tmp_path / "run", overrides), cfg.model.path)


def test_the_plan_counts_a_shard_of_the_base_per_process():
    from kotune.config import Config
    from kotune.plan.estimate import memory_parts
    from kotune.plan.shape import ModelShape

    shape = ModelShape(8192, 28672, 80, 64, 8, vocab=128256, tied_embeddings=False)
    whole = memory_parts(shape, Config(), 2048, fast=True)
    halves = memory_parts(shape, Config(), 2048, fast=True, shards=2)
    assert halves["base weights (4bit), 1/2 shard"] == whole["base weights (4bit)"] // 2
    assert sum(halves.values()) < sum(whole.values()) - 15 * 2**30  # 70B: ~37 GB of NF4, half of it gone


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory, llama3_dir, tiny_train_config):
    """A hidden-256 model as a plain folder and as transformers saves it in 4 bits, and a config for each."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("fsdp")
    plain = build_tiny_model(root / "plain", llama3_dir, hidden=256, layers=2)
    quantized = root / "quantized"
    model = AutoModelForCausalLM.from_pretrained(
        plain, quantization_config=nf4_config(torch.float32), dtype=torch.float32
    )
    model.save_pretrained(quantized)
    AutoTokenizer.from_pretrained(plain).save_pretrained(quantized)
    overrides = {"model.quantization": "4bit", "lora.dropout": 0.0, "train.max_steps": 4}
    # one row a pass: on the fast path each process packs its two rows of a step into one or two passes, and
    # in step 4 the processes differ (2 and 1), so the idle pass that keeps their all-gathers together runs
    overrides |= {"train.micro_batch_size": 1, "train.gradient_accumulation_steps": 4, "train.eval_steps": 2}
    # the 4-bit folder trains DPO: a preference objective runs the same loop under FSDP
    dpo = {"train.objective": "dpo", "data.path": str(write_jsonl(root / "pairs.jsonl", PAIRS)), "data.cache": False}
    dpo |= {"preference.max_prompt_len": 96, "data.val_size": 0.25}
    configs = {}
    for name, path, extra in (("plain", plain, {}), ("quantized", str(quantized), dpo)):
        configs[name] = root / f"{name}.yaml"
        cfg = tiny_train_config(root / "unused", {**overrides, **extra, "model.path": path})
        configs[name].write_text(cfg.to_yaml(), encoding="utf-8")
    return root, configs


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["plain", "quantized"])
def test_two_fsdp_processes_train_the_same_steps_and_adapter_as_one(fsdp_runs, folder):
    """Both folders are read a layer at a time into the shards (the plain one's weights quantized on the way, the
    4-bit one's read as stored; LoRA drawn as a normal load draws it): both equal one process's run, SFT on the
    plain folder and DPO on the 4-bit one (the processes' pairs split by tokens, so some steps have idle passes)."""
    root, configs = fsdp_runs
    runs = {}
    for n, extra in ((1, []), (2, ["train.distributed=fsdp"])):
        runs[n], log = root / f"{folder}-{n}", root / f"{folder}-{n}.log"
        args = ["train", str(configs[folder]), f"train.output_dir={runs[n]}", *extra]
        assert kotune(args, n, log) == 0, log.read_text()[-4000:]
    # float32 sums over two halves of a step differ from one sum by rounding: ~3e-7 on weights of ~1e-2 here
    assert_same_run(runs[1], runs[2], atol=1e-6)
    text = log.read_text()
    assert "kotune: FSDP over 2 processes" in text and "fast path on (train.distributed fsdp)" in text
    if folder == "plain":  # an FSDP checkpoint is a DDP one: it resumes on one process and back, same steps
        later = {k: v for k, v in losses(runs[1]).items() if k[1] > 2}
        for source, n, extra in ((runs[2], 1, []), (runs[1], 2, ["train.distributed=fsdp"])):
            resumed, log = root / f"resumed-{n}", root / f"resumed-{n}.log"
            resumed.mkdir()
            shutil.copytree(source / "checkpoint-2", resumed / "checkpoint-2")
            args = ["train", str(configs[folder]), f"train.output_dir={resumed}", *extra]
            assert kotune([*args, "--resume", str(resumed / "checkpoint-2")], n, log) == 0, log.read_text()[-4000:]
            assert later and all(losses(resumed)[k] == pytest.approx(v, rel=1e-5) for k, v in later.items())


def test_auto_picks_ddp_when_the_base_fits_each_gpu_and_fsdp_when_not(tmp_path):
    """``train.distributed: auto`` on two RTX 4090s (24 GB): an 8B base in 4 bits fits each, a 70B one does not;
    one process never shards, and on the CPU (no ceiling to predict) it stays ddp."""
    from transformers import LlamaConfig

    from kotune.config import Config
    from kotune.plan.gate import choose_distributed
    from kotune.plan.gpus import gpu_named

    folders = {}
    for name, (hidden, inter, layers, heads) in {"8b": (4096, 14336, 32, 32), "70b": (8192, 28672, 80, 64)}.items():
        config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=8, vocab_size=128256)  # fmt: skip
        config.save_pretrained(tmp_path / name)
        folders[name] = str(tmp_path / name)
    gpu, lengths, cfg = gpu_named("RTX4090"), [512] * 64, Config()
    assert choose_distributed(cfg, folders["8b"], lengths, gpu, 2).train.distributed == "ddp"
    assert choose_distributed(cfg, folders["70b"], lengths, gpu, 2).train.distributed == "fsdp"
    assert choose_distributed(cfg, folders["70b"], lengths, gpu, 1).train.distributed == "auto"
    assert choose_distributed(cfg, folders["70b"], lengths, None, 2).train.distributed == "ddp"


def test_a_model_family_without_the_fast_path_is_refused_before_loading(tiny_train_config, tmp_path):
    from transformers import Gemma3TextConfig, GPT2Config

    from kotune.training.build import refuse_unsharded_recipe
    from kotune.training.fsdp import CannotShard

    GPT2Config(n_embd=64, n_layer=1, n_head=2).save_pretrained(tmp_path / "gpt2")
    cfg = tiny_train_config(tmp_path / "run", {"model.quantization": "4bit", "model.path": str(tmp_path / "gpt2")})
    with pytest.raises(CannotShard, match="model type 'gpt2'"):
        refuse_unsharded_recipe(cfg, str(tmp_path / "gpt2"))
    Gemma3TextConfig(hidden_size=64, num_hidden_layers=1).save_pretrained(tmp_path / "gemma")  # fast, not sharded
    cfg = tiny_train_config(tmp_path / "run2", {"model.quantization": "4bit", "model.path": str(tmp_path / "gemma")})
    with pytest.raises(CannotShard, match="model type 'gemma3_text'.*loader"):
        refuse_unsharded_recipe(cfg, str(tmp_path / "gemma"))
