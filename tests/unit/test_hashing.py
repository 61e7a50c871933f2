"""The content hashes every record shares: a file's sha256 read in blocks, and the tokenizer hash's parts."""

from __future__ import annotations

import hashlib

from kotune.hashing import file_sha256, tokenizer_hash


def test_file_sha256_is_the_hash_of_the_bytes(tmp_path):
    path = tmp_path / "weights.bin"
    data = bytes(range(256)) * 5000  # more than one MiB block
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()


def test_the_tokenizer_hash_sees_what_changes_the_ids(mock_dir):
    from transformers import AutoTokenizer

    def loaded():
        return AutoTokenizer.from_pretrained(mock_dir)

    base = tokenizer_hash(loaded())
    assert tokenizer_hash(loaded()) == base
    added = loaded()
    added.add_tokens(["답변"])
    split = loaded()
    split.split_special_tokens = True
    padded = loaded()
    padded.pad_token = padded.eos_token
    assert len({base, tokenizer_hash(added), tokenizer_hash(split), tokenizer_hash(padded)}) == 4
