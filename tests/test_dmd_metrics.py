"""TrajectoryMetrics vs a float64 direct computation on the concatenated data."""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import r2_score

from dmd.metrics import METRICS, FidelityTable, TrajectoryMetrics, trajectory_metrics

GROUPS = {"cls": slice(0, 1), "reg": slice(1, 3), "patch": slice(3, None)}
B, S, T, D = 7, 3, 9, 5


def _data(seed=0, n=B):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(n, S, T, D, generator=g, dtype=torch.float64) + 2.0
    pred = target + 0.4 * torch.randn(n, S, T, D, generator=g, dtype=torch.float64)
    return pred, target


def _affine_r2(p, y):
    """Appendix B.2 by brute force: each row of y regressed on [p, 1] by least squares over
    the features, the R^2 of that fit, averaged over rows."""
    out = []
    for pi, yi in zip(p, y):
        design = np.stack([pi, np.ones_like(pi)], axis=1)
        coef = np.linalg.lstsq(design, yi, rcond=None)[0]
        out.append(1 - ((yi - design @ coef) ** 2).sum() / ((yi - yi.mean()) ** 2).sum())
    return np.mean(out)


def _direct(pred, target):
    """Reference: every metric from the concatenated rows, float64 NumPy."""
    out = {}
    groups = dict(GROUPS, all=slice(None))
    for name, sl in groups.items():
        vals = {m: [] for m in METRICS}
        for s in range(pred.shape[1]):
            p = pred[:, s, sl].reshape(-1, D).numpy()
            y = target[:, s, sl].reshape(-1, D).numpy()
            sse = ((p - y) ** 2).sum()
            vals["r2"].append(1 - sse / ((y - y.mean(0)) ** 2).sum())
            vals["r2_ref"].append(1 - sse / ((p - p.mean()) ** 2).sum())
            vals["r2_affine"].append(_affine_r2(p, y))
            pn, yn = np.linalg.norm(p, axis=1), np.linalg.norm(y, axis=1)
            vals["cos"].append(((p * y).sum(1) / (pn * yn)).mean())
            vals["rel_l2"].append((np.linalg.norm(p - y, axis=1) / yn).mean())
            vals["norm_ratio"].append((pn / yn).mean())
        for m in METRICS:
            out[f"{m}/{name}"] = np.array(vals[m])
    return out


def _assert_close(got, want):
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k].numpy(), want[k], rtol=1e-10, atol=1e-12, err_msg=k)


def test_streamed_equals_direct_and_sklearn():
    pred, target = _data()
    metric = TrajectoryMetrics(S, GROUPS)
    for chunk in (slice(0, 2), slice(2, 3), slice(3, None)):
        metric.update(pred[chunk].float(), target[chunk].float())  # float32 in, float64 inside
    got = metric.compute()
    want = _direct(pred.float().double(), target.float().double())
    for k in want:
        np.testing.assert_allclose(got[k].numpy(), want[k], rtol=1e-9, err_msg=k)
    for s in range(S):
        y = target[:, s].float().double().reshape(-1, D).numpy()
        p = pred[:, s].float().double().reshape(-1, D).numpy()
        sk = r2_score(y, p, multioutput="variance_weighted")
        assert got["r2/all"][s].item() == pytest.approx(sk, rel=1e-10)
    assert got["r2/all"].dtype == torch.float64 and got["cos/cls"].shape == (S,)


def test_one_step_keeps_shape():
    pred, target = _data(4)
    got = trajectory_metrics(pred[:, :1], target[:, :1], {"cls": slice(0, 1)})
    assert got["r2/all"].shape == (1,)
    assert got["cos/cls"].item() == pytest.approx(_direct(pred, target)["cos/cls"][0], rel=1e-10)


def test_invalid_rows_are_ignored():
    pred, target = _data(1)
    valid = torch.tensor([True, False, True, True, False, True, True])
    junk_pred = pred.clone()
    junk_pred[~valid] = 1e6  # would dominate every metric if counted
    got = trajectory_metrics(junk_pred, target, GROUPS, valid=valid)
    _assert_close(got, _direct(pred[valid], target[valid]))


def test_r2_affine_ignores_a_scale_and_shift_per_row():
    """A prediction off by its own scale and shift in every row has regression R^2 1 (while
    R^2 is far below); a constant row explains nothing (0); independent rows give ~0."""
    _, target = _data(6)
    g = torch.Generator().manual_seed(7)
    scale = torch.rand(B, S, T, 1, generator=g, dtype=torch.float64) * 4 - 2
    shift = torch.randn(B, S, T, 1, generator=g, dtype=torch.float64) * 3
    pred = scale * target + shift
    got = trajectory_metrics(pred, target, GROUPS)
    np.testing.assert_allclose(got["r2_affine/all"].numpy(), np.ones(S), rtol=1e-12)
    assert (got["r2/all"] < 0.5).all()
    pred[:, :, 0] = 5.0  # every cls row constant
    got = trajectory_metrics(pred, target, GROUPS)
    assert got["r2_affine/cls"].tolist() == [0.0] * S
    np.testing.assert_allclose(got["r2_affine/patch"].numpy(), np.ones(S), rtol=1e-12)
    noise = torch.randn(400, 1, 4, 64, generator=g, dtype=torch.float64)
    other = torch.randn(noise.shape, generator=g, dtype=torch.float64)
    got = trajectory_metrics(noise, other, {})
    assert 0 < got["r2_affine/all"].item() < 0.04  # E[corr^2] = 1 / (D - 1) for D = 64


def test_perfect_prediction_and_bad_input():
    _, target = _data(2)
    got = trajectory_metrics(target, target, GROUPS)
    for group in ("cls", "reg", "patch", "all"):
        assert torch.allclose(got[f"r2/{group}"], torch.ones(S, dtype=torch.float64))
        assert torch.allclose(got[f"cos/{group}"], torch.ones(S, dtype=torch.float64))
        assert torch.allclose(got[f"rel_l2/{group}"], torch.zeros(S, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected 3 steps"):
        TrajectoryMetrics(S, GROUPS).update(target[:, :2], target[:, :2])
    with pytest.raises(ValueError, match="reserved"):
        TrajectoryMetrics(S, {"all": slice(None)})


def test_fidelity_table_names_rows_and_json():
    """The table of a metric's results: every logged name (as `raptor fit` and the DMD
    callback log them), every CSV row and the nested JSON hold the direct values."""
    pred, target = _data(5)
    metric = TrajectoryMetrics(S, GROUPS)
    metric.update(pred, target)
    layers = [4, 5, 6]  # steps predict layers 4..6
    table = metric.table(layers)
    want = _direct(pred, target)

    flat = table.flat("val", mean=True)
    expected = {}
    for m in METRICS:
        for group in ("cls", "reg", "patch", "all"):
            tag = m if group == "all" else f"{m}_{group}"
            for s, layer in enumerate(layers):
                expected[f"val/{tag}/L{layer}"] = want[f"{m}/{group}"][s]
        expected[f"val/{m}/mean"] = want[f"{m}/all"].mean()
    assert set(flat) == set(expected)
    for key, value in expected.items():
        assert flat[key] == pytest.approx(value, rel=1e-10), key
    only_all = table.flat("val_dmd/x", groups=False, tag="final_")
    assert set(only_all) == {f"val_dmd/x/final_{m}/L{layer}" for m in METRICS for layer in layers}

    rows = table.rows()
    assert [(r["group"], r["layer"]) for r in rows] == [
        (g, layer) for g in ("all", "cls", "patch", "reg") for layer in layers
    ]
    for r in rows:
        for m in METRICS:
            assert r[m] == pytest.approx(want[f"{m}/{r['group']}"][layers.index(r["layer"])])
    assert [r["layer"] for r in table.rows("cls")] == layers

    nested = table.to_json()
    assert list(nested) == list(METRICS) and list(nested["r2"]) == ["cls", "reg", "patch", "all"]
    assert FidelityTable.from_json(nested, layers) == table
    aligned = table.aligned([3, 5])
    assert aligned["cos"]["patch"] == [None, pytest.approx(want["cos/patch"][1])]


def _ddp_worker(rank, world, port, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    pred, target = _data(3, n=8)
    metric = TrajectoryMetrics(S, GROUPS)
    mine = slice(rank * 4, rank * 4 + 4)
    metric.update(pred[mine], target[mine])
    out = metric.compute()  # torchmetrics syncs (sums) the states across ranks
    if rank == 0:
        torch.save({k: v.cpu() for k, v in out.items()}, result_path)
    dist.destroy_process_group()


def test_ddp_two_ranks_equal_one_process(tmp_path, free_port):
    path = tmp_path / "out.pt"
    mp.spawn(_ddp_worker, args=(2, free_port, str(path)), nprocs=2, join=True)
    got = torch.load(path, weights_only=True)
    pred, target = _data(3, n=8)
    _assert_close(got, _direct(pred, target))
