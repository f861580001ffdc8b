"""Rebuild the CLIP BPE tokenizer files that Dapple ships, fully offline.

OpenAI's CLIP tokenizer is a byte-level BPE (Radford et al., 2021, "Learning Transferable Visual Models From
Natural Language Supervision") whose merge list ships as `bpe_simple_vocab_16e6.txt.gz` inside the
open_clip_torch wheel. This script rebuilds from it, exactly as CLIP's SimpleTokenizer does, the Hugging Face
files (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json) that transformers'
CLIPTokenizer reads, so that Dapple tokenizes like CLIP without contacting a model hub.

    python scripts/build_clip_tokenizer.py                 # pip-downloads the wheel (PyPI only)
    python scripts/build_clip_tokenizer.py --wheel FILE    # or use a wheel you already have

The output goes to src/dapple/models/assets/clip_tokenizer/ unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "dapple" / "models" / "assets" / "clip_tokenizer"
# CLIP keeps the first 49152 - 256 - 2 merges of the file (line 0 is a version header).
MERGE_COUNT = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values, code_points = printable[:], printable[:]
    extra = 0
    for b in range(256):
        if b not in byte_values:
            byte_values.append(b)
            code_points.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, (chr(c) for c in code_points)))


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token -> id in CLIP's order: bytes, bytes + '</w>', one token per merge, then the two specials."""
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens]
    tokens += ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


def read_merges(wheel: Path) -> list[tuple[str, str]]:
    with zipfile.ZipFile(wheel) as archive:
        lines = gzip.decompress(archive.read(BPE_MEMBER)).decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1 : MERGE_COUNT + 1]]  # type: ignore[misc]


def download_wheel(into: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "open_clip_torch", "-d", str(into)],
        check=True,
    )
    return next(into.glob("open_clip_torch-*.whl"))


def write_tokenizer(merges: list[tuple[str, str]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    vocab = build_vocab(merges)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2"] + [" ".join(pair) for pair in merges]
    (out / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    specials = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",  # openai/clip-vit-large-patch14, as SD 1.x uses it
    }
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    config = {
        **specials,
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", type=Path, help="an open_clip_torch wheel already on disk")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or download_wheel(Path(tmp))
        merges = read_merges(wheel)
    write_tokenizer(merges, args.out)
    print(f"wrote {len(merges)} merges and {len(merges) + 514} tokens to {args.out}")


if __name__ == "__main__":
    main()
