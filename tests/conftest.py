"""Shared pytest fixtures."""

from __future__ import annotations

import socket

import pytest


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory):
    """Folder of digits shards written once per session by `raptor.data.shards.write_shards`:
    shard size 256, val fraction 0.2, seed 0 -> train 1438 samples in 6 shards (5 x 256 +
    158), val 359 in 2 (256 + 103), 8x8 grayscale PNGs, labels 0..9, manifest.json."""
    from raptor.data.shards import write_shards

    out = tmp_path_factory.mktemp("digits_shards")
    write_shards("digits", out, shard_size=256, val_fraction=0.2, seed=0, progress=False)
    return out


@pytest.fixture(autouse=True)
def _isolate_process_state():
    """Commands run in-process change process-wide state: torch's thread count
    (`trainer.num_threads`) and environment variables (Lightning's PL_GLOBAL_SEED /
    PL_SEED_WORKERS, which subprocesses inherit). Restore both after every test so a
    test's settings cannot change the numerics of the tests after it."""
    import os

    import torch

    threads, env = torch.get_num_threads(), dict(os.environ)
    yield
    torch.set_num_threads(threads)
    os.environ.clear()
    os.environ.update(env)


@pytest.fixture
def free_port() -> int:
    """A free TCP port on the loopback interface, for a gloo process group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
