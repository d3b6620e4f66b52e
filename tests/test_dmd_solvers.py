"""DMD fits: planted systems, closed forms in NumPy/SciPy, span = concatenated pairs."""

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.linear_model import Ridge

from dmd import MomentAccumulator, fit
from dmd.solvers import ridge_term

D, L = 6, 5


def _planted(A, n_images=40, tokens=5, seed=0):
    """Trajectories x_{l+1} = A x_l (tokens as rows): (B, L+1, T, D) float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_images, tokens, A.shape[0], generator=g, dtype=torch.float64)
    layers = [x]
    for _ in range(L):
        layers.append(layers[-1] @ A.T)
    return torch.stack(layers, dim=1)


def _moments(traj, endpoints=()):
    acc = MomentAccumulator(L, traj.shape[-1], endpoints=endpoints)
    acc.update(traj)
    return acc


def _match(got, want):
    """Max distance between two eigenvalue sets under the best one-to-one matching."""
    got, want = np.asarray(got), np.asarray(want)
    cost = np.abs(got[:, None] - want[None, :])
    r, c = linear_sum_assignment(cost)
    return cost[r, c].max()


def _random_A(rank=None, seed=1):
    rng = np.random.default_rng(seed)
    Q1 = np.linalg.qr(rng.standard_normal((D, D)))[0]
    Q2 = np.linalg.qr(rng.standard_normal((D, D)))[0]
    s = rng.uniform(0.6, 1.1, D)
    if rank is not None:
        s[rank:] = 0
    return torch.tensor(Q1 @ np.diag(s) @ Q2.T)


def test_planted_full_rank_ridge_recovers_A_and_eigenvalues():
    A = _random_A()
    op = fit(_moments(_planted(A)), (0, L), "span", "ridge", alpha=0.0)
    assert torch.allclose(op.K, A, atol=1e-6, rtol=0)
    assert _match(op.eigenvalues().numpy(), np.linalg.eigvals(A.numpy())) < 1e-6
    lam, modes = op.modes()
    assert torch.allclose(A.to(modes) @ modes, modes * lam, atol=1e-6)


def test_planted_low_rank_rrr_recovers_A_and_eigenvalues():
    r = 3
    A = _random_A(rank=r)
    op = fit(_moments(_planted(A)), (0, L), "span", "rrr", rank=r, alpha=0.0)
    assert torch.allclose(op.K, A, atol=1e-6, rtol=0)
    lam_A = np.linalg.eigvals(A.numpy())
    lam_A = lam_A[np.argsort(-np.abs(lam_A))][:r]  # the non-zero ones
    lam = op.eigenvalues()
    assert lam.shape == (r,) and _match(lam.numpy(), lam_A) < 1e-6
    lam, modes = op.modes()  # exact-DMD modes are eigenvectors of K
    assert torch.allclose(A.to(modes) @ modes, modes * lam, atol=1e-6)


def _random_pairs(seed=2):
    g = torch.Generator().manual_seed(seed)
    traj = torch.randn(30, L + 1, 4, D, generator=g, dtype=torch.float64)
    traj = traj + torch.linspace(0, 1, D, dtype=torch.float64)  # non-zero mean
    return traj


def _concat(traj, pairs):
    X = np.concatenate([traj[:, a].reshape(-1, D).numpy() for a, _ in pairs])
    Y = np.concatenate([traj[:, b].reshape(-1, D).numpy() for _, b in pairs])
    return X, Y


@pytest.mark.parametrize(
    "selection,pairs",
    [("span", [(1, 2), (2, 3), (3, 4)]), ("anchor", [(1, 2)]), ("endpoint", [(1, 4)])],
)
def test_solvers_equal_numpy_closed_forms_on_concatenated_pairs(selection, pairs):
    traj = _random_pairs()
    acc = _moments(traj, endpoints=[(1, 4)])
    X, Y = _concat(traj, pairs)
    n = X.shape[0]
    cxx, cyx = X.T @ X / n, Y.T @ X / n
    alpha, rank = 1e-3, 3
    a = alpha * np.trace(cxx) / D
    B = cxx + a * np.eye(D)

    ridge = fit(acc, (1, 3), selection, "ridge", alpha=alpha)
    np.testing.assert_allclose(ridge.K.numpy(), cyx @ np.linalg.inv(B), atol=1e-10)

    s, U = np.linalg.eigh(cxx)
    Ur, sr = U[:, ::-1][:, :rank], s[::-1][:rank]
    K_pcr = cyx @ Ur @ np.diag(1 / (sr + a)) @ Ur.T
    pcr = fit(acc, (1, 3), selection, "pcr", rank=rank, alpha=alpha)
    np.testing.assert_allclose(pcr.K.numpy(), K_pcr, atol=1e-10)
    # exact DMD: eigenvalues of the projection onto the POD basis
    lam_ref = np.linalg.eigvals(Ur.T @ K_pcr @ Ur)
    assert _match(pcr.eigenvalues().numpy(), lam_ref) < 1e-10

    _, V = scipy.linalg.eigh(cyx.T @ cyx, B, subset_by_index=[D - rank, D - 1])
    np.testing.assert_allclose(V.T @ B @ V, np.eye(rank), atol=1e-10)
    rrr = fit(acc, (1, 3), selection, "rrr", rank=rank, alpha=alpha)
    np.testing.assert_allclose(rrr.K.numpy(), cyx @ V @ V.T, atol=1e-10)
    assert rrr.stride == (3 if selection == "endpoint" else 1)

    # train error from moments = direct mean squared error over rows
    for op in (ridge, pcr, rrr):
        direct = ((Y - X @ op.K.numpy().T) ** 2).sum(1).mean()
        assert op.info["train_mse"] == pytest.approx(direct, rel=1e-10)


def test_centered_ridge_equals_sklearn_ridge_with_intercept():
    traj = _random_pairs(3)
    pairs = [(0, 1), (1, 2)]
    X, Y = _concat(traj, pairs)
    op = fit(_moments(traj), (0, 2), "span", "ridge", alpha=1e-2, center=True)
    cov = np.cov(X.T, bias=True)
    a = ridge_term(torch.tensor(cov), 1e-2)
    ref = Ridge(alpha=a * X.shape[0], fit_intercept=True, solver="cholesky").fit(X, Y)
    np.testing.assert_allclose(op.K.numpy(), ref.coef_, atol=1e-9)
    np.testing.assert_allclose(op.b.numpy(), ref.intercept_, atol=1e-9)
    pred = op.predict(torch.tensor(X[:3]), 1)[:, 0]
    np.testing.assert_allclose(pred.numpy(), ref.predict(X[:3]), atol=1e-9)


def test_rrr_train_error_at_most_pcr_at_equal_rank():
    traj = _random_pairs(4)
    acc = _moments(traj)
    for rank in range(1, D + 1):
        e_rrr = fit(acc, (0, 3), "span", "rrr", rank=rank, alpha=0.0).info["train_mse"]
        e_pcr = fit(acc, (0, 3), "span", "pcr", rank=rank, alpha=0.0).info["train_mse"]
        assert e_rrr <= e_pcr + 1e-12, rank


def test_predict_keeps_every_step_and_identity():
    A = _random_A(seed=5)
    traj = _planted(A, n_images=2)
    op = fit(_moments(traj), (0, L), "span", "ridge", alpha=0.0)
    pred = op.predict(traj[:, 0].float(), steps=4)  # (B, T, D) -> (B, T, 4, D)
    assert pred.shape == (2, 5, 4, D) and pred.dtype == torch.float32
    for q in range(4):
        assert torch.allclose(pred[:, :, q].double(), traj[:, q + 1], atol=1e-4)
    ident = fit(_moments(traj), (1, 2), "identity")
    assert torch.equal(ident.predict(traj[:, 1], 2)[:, :, 1], traj[:, 1])


def test_bad_input_errors():
    acc = _moments(_random_pairs())
    with pytest.raises(ValueError, match="i \\+ p <= L"):
        fit(acc, (3, 4))
    with pytest.raises(ValueError, match="unknown DMD solver 'svd'"):
        fit(acc, (0, 2), solver="svd")
    with pytest.raises(ValueError, match="unknown pair selection"):
        fit(acc, (0, 2), selection="full")
    with pytest.raises(KeyError, match="endpoints"):
        fit(acc, (0, 3), selection="endpoint")
    with pytest.raises(ValueError, match="rank must be in 1..6"):
        fit(acc, (0, 2), solver="rrr", rank=7)
