"""llama.cpp's k-quants (``q4_k_m``, ``q5_k_m``, ``q6_k``), written by llama.cpp's own quantizer.

The ``gguf`` library can read k-quant blocks but not write them, and the quantizer is not a thing to port by hand:
its mixtures (``_M`` keeps some tensors, such as half of the attention-value and feed-forward-down weights, at a
higher type) and its block search change with llama.cpp. kotune writes a 16-bit GGUF first and hands it to
``llama_model_quantize`` from ``llama-cpp-python`` (the ``quantize`` extra: ``pip install 'kotune[quantize]'``,
which compiles llama.cpp once), the function behind llama.cpp's ``llama-quantize`` tool.

A tensor whose rows are not a multiple of the 256-value k-quant block gets llama.cpp's fallback type, as in
``llama-quantize``.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from kotune.export.gguf_tokenizer import ExportError

K_QUANTS = {
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}
"""``--quant`` names of the k-quants and llama.cpp's file types for them."""

SIZE_FRACTION = {"q4_k_m": 0.36, "q5_k_m": 0.42, "q6_k": 0.5}
"""An upper bound on the quantized file's size as a share of the 16-bit file's (4.9, 5.7 and 6.6 bits a weight,
and embeddings or output layers llama.cpp keeps at a higher type), for the free-space check."""

INSTALL = "pip install 'kotune[quantize]' (llama-cpp-python; it compiles llama.cpp once, a few minutes)"


def quantizer(quant: str):
    """``quantize(source, target)`` for ``quant``: llama.cpp's quantizer, checked before any file is written."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise ExportError(
            f"--quant {quant} is written by llama.cpp's quantizer, which is not installed here ({exc}); {INSTALL}, "
            "or export q8_0 / f16"
        ) from None
    ftype = getattr(llama_cpp, K_QUANTS[quant], None)
    if ftype is None:
        raise ExportError(f"this llama-cpp-python ({llama_cpp.__version__}) has no {K_QUANTS[quant]}; {INSTALL}")

    def quantize(source: Path, target: Path) -> None:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = os.cpu_count() or 1
        _silence(llama_cpp)
        failed = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
        if failed:
            raise ExportError(f"llama.cpp's quantizer could not write {quant} from {source.name} (code {failed})")

    return quantize


_SILENT = []  # the no-op log callback, kept alive while llama.cpp holds it


def _silence(llama_cpp) -> None:
    """llama.cpp's per-tensor log lines go nowhere (its default logger prints them all to stderr)."""
    if not _SILENT:
        _SILENT.append(llama_cpp.llama_log_callback(lambda level, text, data: None))
        llama_cpp.llama_log_set(_SILENT[0], ctypes.c_void_p(0))
