"""Seeds derived from structured coordinates, so every random draw is a pure function of where it is."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple of ints and strings (e.g. seed, epoch, shard, position)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
