"""The dynamics statistics (raptor.eval.dynamics, dmd.exact) against known answers on
hand-made trajectories, and streaming over chunks against one pass."""

import math

import pytest
import torch

from dmd.exact import exact_dmd
from raptor.eval.dynamics import updates
from raptor.eval.dynamics.accumulate import Dynamics
from raptor.eval.dynamics.sensitivity import sensitivity


def f64(values):
    return torch.tensor(values, dtype=torch.float64)


GROUPS = {"cls": slice(0, 1), "reg": slice(1, 2), "patch": slice(2, None)}


def rotating(B=3, L=6, T=5, D=7, theta=0.3, seed=0):
    """Every token turns by `theta` per layer in its own random plane, its norm growing by a
    random factor per layer: x_l = r_l (cos(l theta) e + sin(l theta) f), e and f orthonormal."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(B, T, D, 2, generator=g, dtype=torch.float64))[0]
    e, f = q[..., 0], q[..., 1]
    ls = torch.arange(L + 1, dtype=torch.float64)[None, :, None, None]
    scale = torch.rand(B, L + 1, T, 1, generator=g, dtype=torch.float64) * 5 + 0.5
    return scale * (torch.cos(ls * theta) * e[:, None] + torch.sin(ls * theta) * f[:, None])


def test_constant_angle_rotation_has_that_angular_speed_and_cosine_convergence():
    theta, L = 0.3, 6
    d = Dynamics(L, 7, GROUPS, classes=0, rank=10, eps=0.1)
    d.update(rotating(L=L, theta=theta))
    out = d.compute()
    for g in ("cls", "reg", "patch", "all"):
        torch.testing.assert_close(
            f64(out["speed"][g]["mean"]), torch.full((L,), theta, dtype=torch.float64)
        )
        assert max(out["speed"][g]["std"]) < 1e-6
        expected = torch.cos((L - torch.arange(L + 1, dtype=torch.float64)) * theta)
        torch.testing.assert_close(f64(out["gamma"][g]["mean"]), expected)


def direct_ranks(delta):
    s = torch.linalg.svdvals(delta)
    p = s / s.sum()
    p = p[p > 0]
    return float((s**2).sum() / s[0] ** 2), float(torch.exp(-(p * p.log()).sum()))


@pytest.mark.parametrize("r", [1, 2, 3])
def test_rank_r_updates_have_stable_and_effective_rank_at_most_r(r):
    g = torch.Generator().manual_seed(r)
    delta = torch.randn(2, 3, 12, r, generator=g, dtype=torch.float64) @ torch.randn(
        r, 9, generator=g, dtype=torch.float64
    )
    stable, effective = updates.ranks(delta)
    assert (stable <= r + 1e-9).all() and (effective <= r + 1e-9).all()
    assert (stable >= 1 - 1e-9).all() and (effective >= 1 - 1e-9).all()
    for b in range(2):
        for layer in range(3):
            s, e = direct_ranks(delta[b, layer])
            assert stable[b, layer].item() == pytest.approx(s, rel=1e-9)
            assert effective[b, layer].item() == pytest.approx(e, rel=1e-9)
    if r == 1:
        torch.testing.assert_close(stable, torch.ones_like(stable))


def test_identical_updates_have_coherence_one_and_opposite_ones_zero():
    d = torch.randn(9, dtype=torch.float64)
    same = d.expand(1, 1, 6, 9)
    assert updates.coherence(same).item() == pytest.approx(1.0, abs=1e-12)
    assert updates.ranks(same)[0].item() == pytest.approx(1.0)
    half = torch.cat([d.expand(3, 9), -d.expand(3, 9)])[None, None]  # mean 0: no direction
    assert updates.coherence(half).item() == pytest.approx(0.0, abs=1e-12)
    # tokens moving together along depth: each layer's updates identical over tokens
    traj = rotating(B=1, T=1, L=5)[:, :, :1].expand(2, 6, 4, 7) * 3.0
    out = Dynamics(5, 7, {"cls": slice(0, 1), "patch": slice(1, None)}, 0, 10, 0.1)
    out.update(traj)
    kappa = out.compute()["coherence"]["patch"]["mean"]
    assert kappa == pytest.approx([1.0] * 5, abs=1e-9)


def test_rotation_on_the_sphere_gives_dmd_eigenvalues_on_the_unit_circle_at_that_angle():
    theta, L = 0.4, 8
    x = rotating(B=1, T=1, L=L, theta=theta)[0, :, 0]  # (L+1, D), norms vary, not unit
    x = x / x.norm(dim=-1, keepdim=True)
    fit = exact_dmd(x[:-1].T, x[1:].T, rank=10)
    assert fit.rank == 2  # the rotation's plane: rank 10 is cut to the data's
    torch.testing.assert_close(fit.eigenvalues.abs(), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(
        fit.eigenvalues.angle().abs(), torch.full((2,), theta, dtype=torch.float64)
    )
    # the group-averaged unit states of a model rotating every token the same way
    traj = x[None, :, None].expand(2, L + 1, 4, x.shape[-1]) * 2.5
    d = Dynamics(L, x.shape[-1], {"cls": slice(0, 1), "patch": slice(1, None)}, 0, 10, 0.1)
    d.update(traj)
    e = d.compute()["dmd"]["patch"]
    lam = f64(e["real"]) + 1j * f64(e["imag"])
    assert lam.numel() == 4  # two per image
    torch.testing.assert_close(lam.abs(), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(lam.angle().abs(), torch.full((4,), theta, dtype=torch.float64))


def test_exact_dmd_of_a_full_rank_linear_map_recovers_its_eigenvalues():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 5, generator=g, dtype=torch.float64) / 3
    x = [torch.randn(5, generator=g, dtype=torch.float64)]
    for _ in range(7):
        x.append(A @ x[-1])
    X = torch.stack(x, 1)
    fit = exact_dmd(X[:, :-1], X[:, 1:], rank=5)
    want = torch.linalg.eigvals(A)
    got = fit.eigenvalues
    assert sorted(want.abs().tolist()) == pytest.approx(sorted(got.abs().tolist()), rel=1e-6)
    # modes are eigenvectors of A: A phi = lambda phi
    torch.testing.assert_close(
        A.to(torch.complex128) @ fit.modes, fit.modes * got, atol=1e-8, rtol=1e-6
    )


def test_a_contraction_to_a_fixed_point_damps_perturbations_instead_of_growing_them():
    L, c, eps = 5, 0.5, 1e-3
    p = torch.randn(2, 3, 4, dtype=torch.float64) + 2

    def step(a, layer):
        return p + c * (a - p)

    traj = p[:, None].expand(2, L + 1, 3, 4)  # the fixed point: x_l = p
    u = torch.randn(2, 1, 3, 4, dtype=torch.float64).expand(2, L + 1, 3, 4)  # same u at every l
    sens = sensitivity(step, traj, eps, u)
    for layer in range(L + 1):  # closed form: x_L = p + c^(L-l) eps u
        x = p + c ** (L - layer) * eps * u[:, layer]
        want = (1 - torch.nn.functional.cosine_similarity(x, p, dim=-1)) / eps
        torch.testing.assert_close(sens[:, layer], want)
    assert (sens[:, :-1] < sens[:, 1:]).all()  # no growth: damped by the layers after it
    collapse = sensitivity(lambda a, layer: p, traj, eps, u)  # c = 0: forgotten in one step
    assert collapse[:, :-1].abs().max() < 1e-12  # rounding of 1 - cos only


def test_streaming_over_chunks_equals_one_pass():
    L, T, D = 4, 6, 5
    g = torch.Generator().manual_seed(1)
    traj = torch.randn(11, L + 1, T, D, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 1, 0, 7, -1, 2, 2, 1])
    noise = torch.randn(traj.shape, generator=g)
    W = torch.randn(D, D, generator=g) / 2

    def step(a, layer):
        return a + torch.tanh(a @ W) * layer

    one = Dynamics(L, D, GROUPS, 3, 3, 0.05)
    one.update(traj, labels, step, noise)
    chunked = Dynamics(L, D, GROUPS, 3, 3, 0.05)
    for part in ([0, 1, 2], [3], [4, 5, 6, 7, 8], [9, 10]):
        chunked.update(traj[part], labels[part], step, noise[part])
    a, b = one.compute(), chunked.compute()
    assert a.keys() == b.keys() and a["images"] == 11
    flat_a, flat_b = flat(a), flat(b)
    assert flat_a.keys() == flat_b.keys()
    for key, value in flat_a.items():
        if isinstance(value, str):
            assert flat_b[key] == value, key
        else:
            assert flat_b[key] == pytest.approx(value, rel=1e-9, abs=1e-9, nan_ok=True), key
    assert a["class_paths"]["classes"] == [0, 1, 2]


def flat(x, prefix=""):
    if isinstance(x, dict):
        return {k: v for key, val in x.items() for k, v in flat(val, f"{prefix}{key}.").items()}
    if isinstance(x, list):
        return {k: v for i, val in enumerate(x) for k, v in flat(val, f"{prefix}{i}.").items()}
    return {prefix: x if isinstance(x, (int, float)) or x is None else str(x)}


def test_wrong_trajectory_shape_is_refused_with_the_expected_shape():
    d = Dynamics(4, 5, GROUPS, 0, 3, 0.1)
    with pytest.raises(ValueError, match=r"trajectory must be \(B, 5, T, 5\)"):
        d.update(torch.zeros(2, 4, 3, 5))
    assert math.isnan(d.compute()["images"] or math.nan)
