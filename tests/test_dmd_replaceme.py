"""alpha_mode against a float64 closed form, the fit warnings, and the ReplaceMe map
against a least-squares solution computed here from the teacher's own block outputs."""

import warnings

import numpy as np
import pytest
import torch
from conftest import make_vit

from dmd import MomentAccumulator, fit
from dmd.fit import DMDFitWarning
from raptor.model.teacher import Teacher


def _pairs(sv, n=400, seed=0):
    """Trajectories (n, 2, 1, D) with x of singular values sv and y = A x + noise, float64."""
    g = torch.Generator().manual_seed(seed)
    D = len(sv)
    Q = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64)).Q
    x = (torch.randn(n, D, generator=g, dtype=torch.float64) * sv) @ Q.T
    A = torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5
    y = x @ A.T + 1e-3 * torch.randn(n, D, generator=g, dtype=torch.float64)
    return torch.stack([x, y], 1)[:, :, None]


def _acc(traj, dtype=torch.float64):
    acc = MomentAccumulator(1, traj.shape[-1], compute_dtype=dtype)
    acc.update(traj)
    return acc


def test_absolute_alpha_equals_the_closed_form_and_differs_from_relative():
    traj = _pairs(torch.full((6,), 3.0))  # mean eigenvalue of C_xx about 9, not 1
    X, Y = traj[:, 0, 0].numpy(), traj[:, 1, 0].numpy()
    n, a = len(X), 0.5
    K_ref = np.linalg.solve(X.T @ X / n + a * np.eye(6), X.T @ Y / n).T  # (C_xx + aI)^-1 C_xy
    op = fit(_acc(traj), (0, 1), "span", "ridge", alpha=a, alpha_mode="absolute")
    np.testing.assert_allclose(op.K.numpy(), K_ref, rtol=0, atol=1e-12)
    rel = fit(_acc(traj), (0, 1), "span", "ridge", alpha=a, alpha_mode="relative")
    assert np.abs(rel.K.numpy() - K_ref).max() > 1e-3
    for solver in ("pcr", "rrr"):  # full rank: the same closed form
        full = fit(_acc(traj), (0, 1), "span", solver, alpha=a, alpha_mode="absolute")
        np.testing.assert_allclose(full.K.numpy(), K_ref, rtol=0, atol=1e-10)


def _warnings(traj, dtype=torch.float64, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        op = fit(_acc(traj, dtype), (0, 1), "span", "ridge", **kw)
    return op, [str(w.message) for w in caught if w.category is DMDFitWarning]


def test_pseudo_inverse_warns_with_the_number_of_dropped_directions():
    sv = torch.tensor([1.0, 1.0, 0.5, 0.5, 0.0, 0.0], dtype=torch.float64)  # rank 4 of 6
    op, caught = _warnings(_pairs(sv), alpha=0.0)
    assert op.info["dropped"] == 2 and len(caught) == 1
    assert "dropped 2 direction(s)" in caught[0]
    assert f"{op.info['threshold']:.3g}" in caught[0]
    # the safe cases: every direction kept
    assert _warnings(_pairs(sv), alpha=1e-6)[1] == []
    assert _warnings(_pairs(torch.ones(6, dtype=torch.float64)), alpha=0.0)[1] == []


def test_float32_products_warn_at_a_high_condition_number_only():
    traj = _pairs(torch.logspace(0, -5, 8, dtype=torch.float64))  # cond(C_xx) ~ 1e10
    op, caught = _warnings(traj, torch.float32, alpha=1e-8)
    assert op.info["cond"] > 1e7 and sum("float32 products" in c for c in caught) == 1
    # the same tiny alpha with float64 products, and float32 with a ridge that bounds cond
    assert _warnings(traj, torch.float64, alpha=1e-8)[1] == []
    op, caught = _warnings(traj, torch.float32, alpha=1e-2)
    assert op.info["cond"] < 1e4 and caught == []


def _teacher():
    vit = make_vit(
        img_size=16, patch_size=8, embed_dim=16, depth=4, num_heads=2, reg_tokens=1,
        init_values=0.3,
    )  # fmt: skip
    return Teacher(vit)


def _mlp_by_hook(teacher, traj, block):
    """MLP output of a block, read by a hook on its MLP while the block runs, times LayerScale."""
    blk, seen = teacher.vit.blocks[block - 1], []
    handle = blk.mlp.register_forward_hook(lambda mod, inp, out: seen.append(out))
    with torch.no_grad():
        out = blk(traj[:, block - 1])
    handle.remove()
    torch.testing.assert_close(out, traj[:, block], rtol=0, atol=1e-6)
    return seen[0] * blk.ls2.gamma


def test_replaceme_map_equals_least_squares_on_the_mlp_output():
    teacher = _teacher()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(24, 3, 16, 16, generator=g)
    valid = torch.arange(24) % 5 != 3
    i, p = 1, 2
    acc = MomentAccumulator(4, 16, mlp_spans=[(i, p)])
    trajs = []
    for rows in (slice(0, 10), slice(10, 24)):
        traj, mlp = teacher.trajectory(images[rows], mlp_out=True)
        torch.testing.assert_close(traj, teacher.trajectory(images[rows]), rtol=0, atol=0)
        torch.testing.assert_close(mlp[:, i - 1], _mlp_by_hook(teacher, traj, i))
        acc.update(traj, valid[rows], mlp)
        trajs.append((traj[valid[rows]], mlp[valid[rows]]))
    traj = torch.cat([t for t, _ in trajs]).double()
    m = torch.cat([m for _, m in trajs]).double()[:, i - 1].reshape(-1, 16).numpy()
    x_in, x_end = (traj[:, j].reshape(-1, 16).numpy() for j in (i, i + p))
    T = np.linalg.lstsq(m, x_end - (x_in - m), rcond=None)[0]  # rows: y_i + m T ~ x_{i+p}

    op = fit(acc, (i, p), "replaceme", "ridge", alpha=0.0)
    np.testing.assert_allclose(op.K.numpy(), T.T, rtol=0, atol=1e-8)
    assert op.stride == p and op.info["train_mse"] == pytest.approx(
        ((x_end - (x_in - m) - m @ T) ** 2).sum(1).mean(), rel=1e-8
    )
    pred = op.predict(torch.tensor(x_in), 1, torch.tensor(m))[:, 0].numpy()
    np.testing.assert_allclose(pred, x_in - m + m @ T, rtol=0, atol=1e-8)
    with pytest.raises(ValueError, match="i >= 1"):
        fit(acc, (0, 2), "replaceme", "ridge")
