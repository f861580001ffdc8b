"""A1111 model hashes: sha256 of the file, first 10 hex digits, cached by path, size and mtime."""

from __future__ import annotations

import hashlib
import json
import os

from dapple.infotext import parse_infotext
from dapple.models.hashing import cache_file, model_sha256, short_hash


def test_the_short_hash_is_the_first_ten_hex_digits_of_the_files_sha256(tmp_path) -> None:
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"weights" * 1000)
    assert model_sha256(file) == hashlib.sha256(file.read_bytes()).hexdigest()
    assert short_hash(file) == hashlib.sha256(file.read_bytes()).hexdigest()[:10]


def test_the_cache_answers_for_an_unchanged_file_and_not_for_a_changed_one(tmp_path) -> None:
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"a" * 100)
    real = model_sha256(file)
    cache = json.loads(cache_file().read_text())
    key = next(k for k in cache if str(file.resolve()) in k)
    cache[key] = "f" * 64  # a planted digest proves the cache is what answers
    cache_file().write_text(json.dumps(cache))
    assert model_sha256(file) == "f" * 64
    stat = file.stat()
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # touched: hashed again
    assert model_sha256(file) == real


def test_infotexts_carry_the_model_hash(pipe, tiny_model_dir) -> None:
    text = pipe.generate("a red circle", steps=1, seed=1).infotexts[0]
    assert parse_infotext(text)["Model hash"] == short_hash(tiny_model_dir)
