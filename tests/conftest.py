"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory):
    """Folder of digits shards written once per session by `raptor.shards.write_shards`:
    shard size 256, val fraction 0.2, seed 0 -> train 1438 samples in 6 shards (5 x 256 +
    158), val 359 in 2 (256 + 103), 8x8 grayscale PNGs, labels 0..9, manifest.json."""
    from raptor.shards import write_shards

    out = tmp_path_factory.mktemp("digits_shards")
    write_shards("digits", out, shard_size=256, val_fraction=0.2, seed=0, progress=False)
    return out
