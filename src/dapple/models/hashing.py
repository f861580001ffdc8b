"""Model hashes as AUTOMATIC1111 shows them, cached on disk.

A1111 names a checkpoint by the sha256 of its file and shows the first 10 hex digits ("short hash") in infotexts,
`/sdapi/v1/sd-models` and its model lists. Hashing a multi-GB file takes a while, so each digest is cached in
a JSON file keyed by the file's resolved path, size and modification time: a changed file is hashed again.
A diffusers folder has no single file; its hash is that of its UNet weight files read in name order.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

SHORT_HASH_LENGTH = 10


def cache_file() -> Path:
    """Where digests are kept: $DAPPLE_CACHE_DIR/hashes.json, else ~/.cache/dapple/hashes.json."""
    root = Path(os.environ.get("DAPPLE_CACHE_DIR") or Path.home() / ".cache" / "dapple")
    return root / "hashes.json"


def _hashed_files(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    return sorted((source / "unet").glob("*.safetensors")) or sorted((source / "unet").glob("*.bin"))


def _read_cache(path: Path) -> dict[str, str]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a missing or damaged cache only costs a re-hash


def model_sha256(source: str | Path) -> str:
    """The sha256 hex digest of a checkpoint file (or a diffusers folder's UNet weights), from the cache when
    the file is unchanged."""
    source = Path(source).expanduser().resolve()
    files = _hashed_files(source)
    if not files:
        raise FileNotFoundError(f"{source}: no weight file to hash")
    key = "|".join(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    cache_path = cache_file()
    cache = _read_cache(cache_path)
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    cache = _read_cache(cache_path)  # another process may have added entries meanwhile
    cache[key] = digest.hexdigest()
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(cache, indent=0, sort_keys=True))
        temporary.replace(cache_path)
    except OSError:
        pass  # a read-only home still gets the hash, only not cached
    return cache[key]


def short_hash(source: str | Path) -> str:
    """A1111's short hash: the first 10 hex digits of the sha256."""
    return model_sha256(source)[:SHORT_HASH_LENGTH]
