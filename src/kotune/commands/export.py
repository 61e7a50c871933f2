"""``kotune export RUN_DIR|MERGED_DIR --format gguf|ollama [--quant QUANT] [--out PATH]``"""

from __future__ import annotations

from kotune.export.gguf import QUANTS

FORMATS = ("gguf", "ollama")


def register(sub) -> None:
    p = sub.add_parser("export", help="write GGUF (llama.cpp, LM Studio) or an Ollama Modelfile with its GGUF")
    p.add_argument("path", help="a training run's output folder (merged first, into RUN_DIR/merged) or a merged folder")
    p.add_argument(
        "--format",
        choices=FORMATS,
        required=True,
        help="gguf: one .gguf file with tokenizer and chat template; ollama: a folder with the .gguf and a Modelfile",
    )
    p.add_argument(
        "--quant",
        choices=QUANTS,
        default="f16",
        help="weight type: f32, f16 (default), bf16, q8_0 (llama.cpp's 8-bit blocks), or the k-quants q4_k_m, q5_k_m, "
        "q6_k (llama.cpp's quantizer: pip install 'kotune[quantize]'); norms stay f32",
    )
    p.add_argument(
        "--out",
        default=None,
        help="gguf: the file (default PATH/NAME-QUANT.gguf); ollama: the folder (default PATH/ollama)",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    if args.format == "gguf":
        from kotune.export.gguf import export_gguf

        export_gguf(args.path, args.quant, args.out)
    else:
        from kotune.export.ollama import export_ollama

        export_ollama(args.path, args.quant, args.out)
    return 0
