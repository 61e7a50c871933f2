"""DPO on one GPU: kotune's preference loop against TRL's ``DPOTrainer``, same pairs, same 4-bit base, same LoRA.

    python bench/pref_bench.py --tool kotune       # kotune: train.objective dpo (sigmoid, beta 0.1), fast path
    python bench/pref_bench.py --tool kotune --kernels off   # kotune's plain path (transformers forward)
    python bench/pref_bench.py --tool trl          # TRL 1.15 DPOTrainer, ref_model=None (adapter off)
    python bench/pref_bench.py --dry               # CPU: build the pairs, check TRL's tokenization, print shapes
    python bench/pref_bench.py --dry --tool kotune # CPU: also two steps of one pair on a tiny random model

The model is a random-weight Llama-3-8B (weights do not change speed) written once to ``--model-dir`` in
``anchor_bench.py``'s layout (``../shared/gpu``): bf16 safetensors and a word-level tokenizer where the word
``t<id>`` is token ``id``, so both tools tokenize the pairs to the same ids. The GPU host has no network, so the
pairs are synthetic: prompt and response lengths drawn from seeded log-normal distributions of the size of
public preference sets (median prompt 180 tokens, responses 260; see ``LENGTHS``).

Both tools: NF4 double-quant base with bf16 compute, LoRA r16 / alpha 16 / dropout 0 on q,k,v,o, gradient
checkpointing, paged_adamw_8bit, the same micro-batch and accumulation, the pairs in the same order (no shuffle).
Each prints ``RESULT {json}``: tokens/s over the timed steps (warm-up steps excluded, GPU synchronised), counting
the non-padding tokens of prompt + chosen + rejected of each pair once (``pair_tokens``) and as fed to the model,
the prompt twice (``input_tokens``), the same counts for both tools; peak memory (allocated and reserved, reset
after the model loads) and the first losses.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

MODEL_DIR = os.environ.get("BENCH_MODEL_DIR", "/tmp/llama3-8b-rand")
"""anchor_bench.py's folder: a run after the anchor's reuses its 16 GB model."""
VOCAB, FIRST_ID, BOS, EOS = 128000, 10, 128000, 128001
LENGTHS = {"prompt": (180, 0.8, 8, 512), "response": (260, 0.7, 8, 1024)}
"""(median, log-normal sigma, shortest, longest) in tokens: prompts up to kotune's default max_prompt_len."""
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def word_tokenizer():
    """The bench tokenizer: word ``t<i>`` is id i (i < 128000), then Llama-3's first special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|eot_id|>"]
    vocab.update({s: VOCAB + i for i, s in enumerate(specials)})
    words = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=words, bos_token=specials[0], eos_token=specials[1], unk_token="t0", pad_token=specials[1]
    )


def build_model_dir(path: str, layers: int) -> None:
    """Write the random Llama-3-8B folder once (on the GPU: ~20 s); an existing folder is reused."""
    if Path(path, "config.json").is_file():
        return
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB + 256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False, torch_dtype="bfloat16",
    )  # fmt: skip
    started = time.perf_counter()
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="5GB")
    del model
    torch.cuda.empty_cache()
    word_tokenizer().save_pretrained(path)
    print(f"built {path} in {time.perf_counter() - started:.1f}s", flush=True)


def build_tiny_model_dir(path: str) -> None:
    """A two-layer float32 Llama with the bench vocabulary, for the CPU dry run."""
    if Path(path, "config.json").is_file():
        return
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB + 256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    word_tokenizer().save_pretrained(path)


def _length(rnd: random.Random, kind: str) -> int:
    median, sigma, shortest, longest = LENGTHS[kind]
    return min(longest, max(shortest, round(rnd.lognormvariate(math.log(median), sigma))))


def make_pairs(n: int, seed: int) -> list[tuple[list[int], list[int], list[int]]]:
    """``n`` (prompt, chosen, rejected) id lists, seeded; the responses without their EOS (each tool adds it)."""
    rnd = random.Random(seed)

    def ids(kind: str) -> list[int]:
        return [rnd.randrange(FIRST_ID, VOCAB) for _ in range(_length(rnd, kind))]

    return [(ids("prompt"), ids("response"), ids("response")) for _ in range(n)]


def words(ids: list[int]) -> str:
    return " ".join(f"t{i}" for i in ids)


def trl_rows(pairs) -> list[dict]:
    """TRL's text format; responses start with a space so that prompt + response splits into the same words."""
    return [{"prompt": words(p), "chosen": " " + words(c), "rejected": " " + words(r)} for p, c, r in pairs]


def step_token_counts(pairs, per_step: int) -> list[dict]:
    """Per optimizer step: pair tokens (prompt + chosen + rejected, EOS included) and input tokens (prompt twice)."""
    out = []
    for k in range(0, len(pairs), per_step):
        step = pairs[k : k + per_step]
        responses = sum(len(c) + len(r) + 2 for _, c, r in step)
        prompts = sum(len(p) for p, _, _ in step)
        out.append({"pair_tokens": prompts + responses, "input_tokens": 2 * prompts + responses})
    return out


def check_trl_tokenization(pairs, tokenizer) -> None:
    """TRL tokenizes ``prompt`` and ``prompt + response + eos`` as text: the ids must be the pairs' own."""
    for (p, c, r), row in zip(pairs, trl_rows(pairs), strict=True):
        assert tokenizer(row["prompt"])["input_ids"] == p  # no BOS: the word tokenizer adds none, nor does kotune here
        for ids, key in ((c, "chosen"), (r, "rejected")):
            text = row["prompt"] + row[key] + tokenizer.eos_token
            assert tokenizer(text)["input_ids"] == p + ids + [EOS], key


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak() -> dict:
    if not torch.cuda.is_available():
        return {"peak_allocated_gib": 0.0, "peak_reserved_gib": 0.0}
    return {
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
    }


def summarise(tool: str, args, seconds: list[float], counts: list[dict], losses: list[float]) -> dict:
    timed_s = sum(seconds[args.warm :])
    timed = counts[args.warm : len(seconds)]
    pair_tokens, input_tokens = sum(c["pair_tokens"] for c in timed), sum(c["input_tokens"] for c in timed)
    return {
        "tool": tool,
        "steps_timed": len(seconds) - args.warm,
        "warm": args.warm,
        "micro_batch": args.mbs,
        "accumulation": args.ga,
        "s_per_step": round(timed_s / max(1, len(seconds) - args.warm), 3),
        "tokens_per_s": round(pair_tokens / timed_s, 1) if timed_s else None,
        "input_tokens_per_s": round(input_tokens / timed_s, 1) if timed_s else None,
        "pair_tokens_timed": pair_tokens,
        "input_tokens_timed": input_tokens,
        **peak(),
        "losses": [round(x, 5) for x in losses[:6]],
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }


class SequentialPairs:
    """The loop's order (``data.order.DataOrder``), replaced: the pairs as given, micro-batch after micro-batch
    (TRL: sequential), on one process."""

    def __init__(self, size: int, accumulation: int):
        self.size, self.accumulation = size, accumulation
        self.per_epoch = 1 << 30

    def passes(self, micro_step: int) -> list[list[int]]:
        first = micro_step * self.size
        return [list(range(first + k * self.size, first + (k + 1) * self.size)) for k in range(self.accumulation)]

    def step_rows(self, micro_step: int) -> list[int]:
        return [i for p in self.passes(micro_step) for i in p]


def run_kotune(args, pairs, counts) -> dict:
    from kotune.config_load import load_config
    from kotune.data.preference import PreferencePair
    from kotune.training.build import load_for_training
    from kotune.training.loop import Fit
    from kotune.training.preference import PreferenceObjective

    values = {
        "model.path": args.model_dir,
        "lora.r": 16,
        "lora.alpha": 16,
        "lora.dropout": 0.0,
        "lora.target_modules": "[" + ",".join(QKVO) + "]",
        "train.objective": "dpo",
        "preference.beta": 0.1,
        "preference.loss_type": "sigmoid",
        "train.micro_batch_size": args.mbs,
        "train.gradient_accumulation_steps": args.ga,
        "train.learning_rate": args.lr,
        "train.warmup_steps": 0,
        "train.optimizer": "paged_adamw_8bit",
        "train.kernels": args.kernels,
        "train.max_steps": args.warm + args.steps,
        "train.seed": 42,
    }
    if not torch.cuda.is_available():  # the dry run's tiny model: no 4-bit, float32, torch's AdamW
        values.update({"model.quantization": "none", "model.compute_dtype": "float32"})
        values["train.optimizer"] = "adamw_torch"
    cfg = load_config(None, [f"{k}={v}" for k, v in values.items()])
    trained = load_for_training(cfg, args.model_dir)
    if trained.fast is None and args.kernels == "auto" and not torch.cuda.is_available():
        from kotune import fast  # the CPU dry run: the fast path forced on, to run its code

        trained.fast = fast.build(trained.peft, cfg)
    rows = [PreferencePair(i, p, [*c, EOS], [*r, EOS]) for i, (p, c, r) in enumerate(pairs)]
    objective = PreferenceObjective(cfg, trained.peft, EOS, False, trained.fast is not None, None)
    fit = Fit(cfg, trained, objective, rows, [], Path(tempfile.mkdtemp()))
    fit.order = SequentialPairs(args.mbs, args.ga)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    seconds, losses = [], []
    while fit.state.step < fit.steps:
        sync()
        start = time.perf_counter()
        fit.step()
        losses.append(fit.settle(fit.state.step)[0]["loss"])
        sync()
        seconds.append(time.perf_counter() - start)
    return {**summarise("kotune", args, seconds, counts, losses), "fast_path": trained.fast is not None}


def run_trl(args, pairs, counts) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from kotune.model.load import nf4_config

    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            sync()
            marks.append(time.perf_counter())

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    quant = nf4_config(torch.bfloat16, storage=torch.uint8)  # TRL's default storage, as its users load
    gpu = torch.cuda.is_available()  # else the dry run's tiny model: no 4-bit, float32, torch's AdamW
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(),
        model_init_kwargs={"dtype": "bfloat16", "device_map": {"": 0}} if gpu else {"dtype": "float32"},
        per_device_train_batch_size=args.mbs,
        gradient_accumulation_steps=args.ga,
        max_steps=args.warm + args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        beta=0.1,
        loss_type=["sigmoid"],
        max_length=None,  # the pairs are within length already; kotune cuts none either
        pad_to_multiple_of=8,
        bf16=gpu,
        use_cpu=not gpu,
        gradient_checkpointing=True,
        optim="paged_adamw_8bit" if gpu else "adamw_torch",
        train_sampling_strategy="sequential",  # the same order as kotune's run
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=42,
    )
    peft_config = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=QKVO, task_type="CAUSAL_LM")
    trainer = DPOTrainer(
        model=args.model_dir,
        ref_model=None,  # the reference is the base: the adapter switched off
        args=config,
        train_dataset=Dataset.from_list(trl_rows(pairs)),
        processing_class=tokenizer,
        quantization_config=quant if gpu else None,
        peft_config=peft_config,
        callbacks=[Clock()],
    )
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    sync()
    marks.append(time.perf_counter())
    trainer.train()
    seconds = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return summarise("trl", args, seconds, counts, losses)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tool", choices=["kotune", "trl"])
    ap.add_argument("--dry", action="store_true", help="CPU: build and check the pairs, print the planned shapes")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--warm", type=int, default=3, help="warm-up steps, not timed")
    ap.add_argument("--mbs", type=int, default=1, help="pairs per micro-batch")
    ap.add_argument("--ga", type=int, default=8, help="gradient accumulation (micro-batches per step)")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--kernels", choices=["auto", "off"], default="auto", help="kotune's train.kernels")
    ap.add_argument("--seed", type=int, default=0, help="seed of the pairs")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--model-dir", default=MODEL_DIR)
    args = ap.parse_args()
    if args.dry:  # a warm-up and a timed step of one pair each: the CPU computes 128k-wide logits slowly
        args.steps, args.warm, args.mbs, args.ga = 1, 1, 1, 1
    per_step = args.mbs * args.ga
    pairs = make_pairs((args.warm + args.steps) * per_step, args.seed)
    counts = step_token_counts(pairs, per_step)
    if args.dry:
        check_trl_tokenization(pairs, word_tokenizer())
        longest = max(len(p) + max(len(c), len(r)) + 1 for p, c, r in pairs)
        plan = {"pairs": len(pairs), "per_step": per_step, "steps": counts, "longest_row": longest}
        print("PLAN " + json.dumps(plan), flush=True)
        if args.tool is None:
            return
        args.model_dir = str(Path(tempfile.gettempdir()) / "pref-bench-tiny")
        build_tiny_model_dir(args.model_dir)
    elif args.tool is None:
        sys.exit("pref_bench.py: --tool kotune or --tool trl (or --dry)")
    else:
        build_model_dir(args.model_dir, args.layers)
    run = run_kotune if args.tool == "kotune" else run_trl
    print("RESULT " + json.dumps(run(args, pairs, counts)), flush=True)


if __name__ == "__main__":
    main()
