"""Streamed moments equal those of the concatenated data, on one process and merged over DDP."""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dmd import MomentAccumulator, fit
from dmd.sweeps import BudgetMoments

L, T, D = 4, 5, 3
ENDS = [(0, 2), (1, 4)]
TOKENS = slice(1, None)


def _traj(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, L + 1, T, D, generator=g, dtype=torch.float64) + 0.5


def _direct(traj):
    """Every moment from the concatenated rows, NumPy float64."""
    x = traj[:, :, TOKENS].numpy()
    rows = [x[:, j].reshape(-1, D) for j in range(L + 1)]
    return {
        "grams": np.stack([r.T @ r for r in rows]),
        "crosses": np.stack([rows[j + 1].T @ rows[j] for j in range(L)]),
        "ends": np.stack([rows[b].T @ rows[a] for a, b in ENDS]),
        "sums": np.stack([r.sum(0) for r in rows]),
        "rows": rows[0].shape[0],
        "images": x.shape[0],
    }


def _assert_equal(acc, want, rtol=1e-12):
    for name in ("grams", "crosses", "ends", "sums"):
        np.testing.assert_allclose(getattr(acc, name).numpy(), want[name], rtol=rtol, err_msg=name)
    assert acc.rows == want["rows"] and acc.images == want["images"]


def test_streamed_batches_equal_concatenated_data():
    traj = _traj()
    acc = MomentAccumulator(L, D, endpoints=ENDS + [(2, 3)], tokens=TOKENS)
    assert acc.endpoints == ENDS  # consecutive pairs are not duplicated
    for chunk in (slice(0, 5), slice(5, 6), slice(6, None)):
        acc.update(traj[chunk])
    _assert_equal(acc, _direct(traj))


def test_invalid_rows_and_low_precision_inputs():
    traj = _traj(seed=1)
    valid = torch.ones(12, dtype=torch.bool)
    valid[[2, 7]] = False
    junk = traj.clone()
    junk[~valid] = 1e3
    acc = MomentAccumulator(L, D, endpoints=ENDS, tokens=TOKENS)
    acc.update(junk[:6], valid[:6])
    acc.update(junk[6:], valid[6:])
    _assert_equal(acc, _direct(traj[valid]))
    # float32 / bf16 batches, float32 products: still accumulated in float64
    for dtype in (torch.float32, torch.bfloat16):
        low = traj.to(dtype)
        acc32 = MomentAccumulator(L, D, endpoints=ENDS, tokens=TOKENS, compute_dtype=torch.float32)
        acc32.update(low)
        assert acc32.buffer.dtype == torch.float64
        _assert_equal(acc32, _direct(low.double()), rtol=1e-5)


def test_pair_moments_pool_stored_moments():
    traj = _traj(seed=2)
    acc = MomentAccumulator(L, D, endpoints=ENDS, tokens=TOKENS)
    acc.update(traj)
    pm = acc.pair_moments([(0, 1), (1, 2), (0, 2)])
    x = traj[:, :, TOKENS]
    X = torch.cat([x[:, 0], x[:, 1], x[:, 0]]).reshape(-1, D)
    Y = torch.cat([x[:, 1], x[:, 2], x[:, 2]]).reshape(-1, D)
    n = X.shape[0]
    assert pm.n == n
    assert torch.allclose(pm.cxx, X.T @ X / n) and torch.allclose(pm.cyx, Y.T @ X / n)
    assert torch.allclose(pm.cyy, Y.T @ Y / n) and torch.allclose(pm.my, Y.mean(0))
    with pytest.raises(ValueError, match=r"trajectory must be \(B, 5, T, 3\)"):
        acc.update(traj[:, :3])


def _ddp_worker(rank, world, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    traj = _traj(n=10, seed=3)
    acc = MomentAccumulator(L, D, endpoints=ENDS, tokens=TOKENS)
    mine = traj[:4] if rank == 0 else traj[4:]  # unequal shares
    for batch in mine.split(3):
        acc.update(batch)
    acc.all_reduce()
    if rank == 0:
        torch.save(acc.buffer, path)
    dist.destroy_process_group()


def test_ddp_merge_equals_one_process(tmp_path, free_port):
    path = tmp_path / "buffer.pt"
    mp.spawn(_ddp_worker, args=(2, free_port, str(path)), nprocs=2, join=True)
    single = MomentAccumulator(L, D, endpoints=ENDS, tokens=TOKENS)
    single.update(_traj(n=10, seed=3))
    merged = single.clone()
    merged.buffer.copy_(torch.load(path, weights_only=True))
    _assert_equal(merged, _direct(_traj(n=10, seed=3)))
    assert torch.allclose(merged.buffer, single.buffer, rtol=1e-12)
    # the merged moments fit what least squares on the pooled rows gives: the span (0, 3)
    # pools the pairs (x_l, x_l+1), l = 0..2, of every token row
    x = _traj(n=10, seed=3)[:, :, TOKENS]
    X = torch.cat([x[:, j].reshape(-1, D) for j in range(3)]).numpy()
    Y = torch.cat([x[:, j + 1].reshape(-1, D) for j in range(3)]).numpy()
    K = np.linalg.lstsq(X, Y, rcond=None)[0].T
    np.testing.assert_allclose(fit(merged, (0, 3), "span", "ridge", alpha=0.0).K, K, atol=1e-10)


@pytest.mark.parametrize("rows", [1, 2, 7, 9])  # token pieces, one image, two images a block
def test_row_blocks_give_the_moments_of_the_whole_batch(rows):
    traj = _traj(seed=4)
    valid = torch.ones(12, dtype=torch.bool)
    valid[[0, 5, 6]] = False  # three runs of images
    # max_update_bytes holding `rows` rows of three float64 blocks, the product and sums
    acc = MomentAccumulator(
        L,
        D,
        endpoints=ENDS,
        tokens=TOKENS,
        max_update_bytes=D * D * 8 + 2 * D * 8 + rows * 3 * D * 8,
    )
    assert acc.block_rows == rows
    acc.update(traj, valid)
    _assert_equal(acc, _direct(traj[valid]))
    with pytest.raises(ValueError, match="max_update_bytes=100 cannot hold one row block"):
        MomentAccumulator(L, D, max_update_bytes=100)


def test_budget_moments_are_those_of_the_first_images():
    traj, valid = _traj(seed=5), torch.ones(12, dtype=torch.bool)
    valid[3] = False
    stream = BudgetMoments(
        [4, 9, 2], lambda: MomentAccumulator(L, D, endpoints=ENDS, tokens=TOKENS)
    )
    for chunk in (slice(0, 5), slice(5, 7), slice(7, None)):  # batches across the budgets
        stream.update(traj[chunk], valid[chunk])
    totals = stream.totals()
    assert sorted(totals) == [2, 4, 9] and stream.images == 9
    kept = traj[valid]
    for budget, acc in totals.items():
        _assert_equal(acc, _direct(kept[:budget]))
