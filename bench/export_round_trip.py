"""Round trip of an exported GGUF through transformers: logits against the merged model on held-out prompts.

    python bench/export_round_trip.py MERGED_DIR --quant f16 bf16 q8_0 [--rows 30]

For each quantization: ``kotune export`` the merged folder, load the GGUF back with transformers (``gguf_file=``,
dequantized to float32) and compare its logits with the merged model's over every position of the held-out
prompts + reference answers (``data/ko-instruct-demo-heldout.jsonl``), prompts built as training built them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    sys.path.insert(0, str(ROOT / "src"))
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    from kotune.export.gguf import export_gguf
    from kotune.inference.generate import encode_prompt, row_prompt
    from kotune.inference.load import load_model
    from kotune.run_folder import open_folder

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("merged")
    parser.add_argument("--quant", nargs="+", default=["f16", "bf16", "q8_0"])
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args()
    folder = open_folder(args.merged)
    model, tokenizer = load_model(folder)
    model = model.float()
    heldout = ROOT / "data" / "ko-instruct-demo-heldout.jsonl"
    rows = [json.loads(line) for line in heldout.read_text(encoding="utf-8").splitlines()[: args.rows]]
    inputs = [
        encode_prompt(tokenizer, row_prompt(r, folder.fmt, folder, tokenizer, "held-out"))
        + tokenizer(r["output"], add_special_tokens=False)["input_ids"]
        for r in rows
    ]
    with torch.no_grad():
        source = [model(torch.tensor([ids])).logits[0] for ids in inputs]
    for quant in args.quant:
        out = Path(args.merged).parent / f"{Path(args.merged).name}-roundtrip-{quant}.gguf"  # beside, not in, the merge
        if not out.exists():
            export_gguf(args.merged, quant, out)
        back = AutoModelForCausalLM.from_pretrained(
            out.parent, gguf_file=out.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        ).eval()
        deltas, agree, total, max_delta = [], 0, 0, 0.0
        with torch.no_grad():
            for ids, a in zip(inputs, source, strict=True):
                b = back(torch.tensor([ids])).logits[0]
                deltas.append((a - b).abs().mean().item())
                max_delta = max(max_delta, (a - b).abs().max().item())
                agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
                total += a.shape[0]
        print(
            json.dumps(
                {
                    "quant": quant,
                    "rows": len(rows),
                    "positions": total,
                    "top1_agreement": round(agree / total, 5),
                    "mean_abs_delta_logit": float(f"{sum(deltas) / len(deltas):.3g}"),
                    "max_abs_delta_logit": float(f"{max_delta:.3g}"),
                    "size_mib": round(out.stat().st_size / 2**20, 1),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
