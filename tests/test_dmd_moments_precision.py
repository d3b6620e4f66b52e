"""Float32 moment products against an all-float64 pass on ViT-like ill-conditioned
trajectories (the bound the `dmd.compute_dtype` default rests on), and the memory one
update allocates, measured from torch's CPU allocator."""

import math
import warnings

import torch

from dmd import MomentAccumulator, fit
from dmd.fit import DMDFitWarning
from raptor.bench.dmd import allocator_peak  # checked on a known sequence in test_bench_dmd

MiB = 2**20


def vit_like(images, num_layers, tokens, dim, seed=0):
    """(images, L+1, T, D) float32, shaped like a ViT's residual stream: a large mean with
    two massive dimensions (60 and -40, the rest about 0.5) plus tokens whose spread has a
    geometric spectrum over three decades, rotated slowly along depth with fresh noise of
    the same spectrum; the uncentred Gram's condition number is about 5e9."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    basis = torch.linalg.qr(randn(dim, dim)).Q
    spread = torch.logspace(0, -3, dim, dtype=torch.float64)
    mean = 0.5 * randn(dim)
    mean[:2] = torch.tensor([60.0, -40.0])
    skew = randn(dim, dim)
    step = torch.linalg.matrix_exp(0.025 * (skew - skew.T))  # a rotation near I
    z = (randn(images, tokens, dim) * spread) @ basis.T
    layers = [mean + z]
    for layer in range(num_layers):
        z = 0.99 * z @ step.T + 0.05 * (randn(images, tokens, dim) * spread) @ basis.T
        layers.append((1 + 0.02 * layer) * mean + z)
    return torch.stack(layers, 1).float()  # what a float32 teacher hands over


def _relative(a, b):
    return float((a - b).norm() / b.norm())


def test_float32_products_stay_within_the_measured_bound_of_float64():
    L, D = 3, 96
    traj = vit_like(12, L, 197, D)
    exact = MomentAccumulator(L, D, endpoints=[(0, 3)])
    exact.update(traj)
    ev = torch.linalg.eigvalsh(exact.grams[0])
    assert ev[-1] / ev[0] > 1e9  # as ill-conditioned as a ViT's moments
    for block in (256 * MiB, MiB):  # one block of rows, or 3 (partial sums in float64)
        low = MomentAccumulator(
            L, D, endpoints=[(0, 3)], compute_dtype=torch.float32, max_update_bytes=block
        )
        low.update(traj)
        for name in ("grams", "crosses", "ends", "sums"):
            for got, want in zip(getattr(low, name), getattr(exact, name)):
                assert _relative(got, want) < 1e-6, name  # measured: at most 1.5e-7
        # K at the paper's alphas, relative 1e-4 (the default) and 1e-5 (measured: K 3.6e-3
        # and 1.8e-2, predictions 1.2e-5 and 4.3e-5). The error of K grows with
        # cond(C_xx + a I); that of its predictions, sqrt(tr(dK C_xx dK^T) / tr(K C_xx K^T)),
        # stays small
        pm = exact.pair_moments([(0, 1), (1, 2), (2, 3)])
        for alpha, mode, k_bound in ((1e-4, "relative", 2e-2), (1e-5, "relative", 1e-1)):
            want = fit(exact, (0, L), "span", "ridge", alpha=alpha, alpha_mode=mode).K
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DMDFitWarning)
                got = fit(low, (0, L), "span", "ridge", alpha=alpha, alpha_mode=mode).K
            dK = got - want
            pred = math.sqrt(torch.trace(dK @ pm.cxx @ dK.T) / torch.trace(want @ pm.cxx @ want.T))
            assert _relative(got, want) < k_bound, (alpha, block)
            assert pred < 1e-4, (alpha, block)


def test_an_update_at_a_large_trajectory_stays_within_its_memory_setting():
    limit_mib = 2
    L, T, D = 24, 197, 256  # a (B, 25, 197, 256) float32 batch: 19 MiB for B = 4
    g = torch.Generator().manual_seed(0)
    traj = torch.randn(4, L + 1, T, D, generator=g)
    valid = torch.tensor([True, False, True, True])
    acc = MomentAccumulator(
        L, D, endpoints=[(0, 12)], compute_dtype="float32", max_update_bytes=limit_mib * MiB
    )
    peak = allocator_peak(lambda: acc.update(traj, valid))
    assert 3 * acc.block_rows * D * 4 <= peak <= limit_mib * MiB  # its scratch, nothing more
    x = traj[valid].double()  # the moments are still those of the valid rows
    for a, b, got in ((0, 0, acc.grams[0]), (11, 12, acc.crosses[11]), (0, 12, acc.ends[0])):
        want = torch.einsum("itd,ite->de", x[:, b], x[:, a])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)
    assert acc.rows == 3 * T and acc.images == 3
