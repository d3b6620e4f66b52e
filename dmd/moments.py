"""Streamed second moments of a depth trajectory, the only thing DMD fits need.

One pass over the data accumulates, in float64,

- the Gram matrix of every layer,           G_l    = sum_rows x_l x_l^T,      l = 0..L
- the cross moment of consecutive layers,   C_l    = sum_rows x_{l+1} x_l^T,  l = 0..L-1
- the cross moment of requested pairs,      E_(a,b) = sum_rows x_b x_a^T      (a < b)
- the sum of every layer, sum_rows x_l (for centred fits), and the row count,

where a *row* is one token of one image (X_l has tokens as rows). Memory is
O((2L + 1 + E) d^2) whatever the number of images. Every moment of a set of
(input layer, output layer) pairs is a sum of stored moments (`pair_moments`),
so all cut starts and prune lengths come from the same pass.

All state lives in one flat float64 buffer, so merging DDP ranks is a single
`all_reduce` of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class PairMoments:
    """Moments of the pooled pairs (x -> y), normalised by the row count n.

    cxx = E[x x^T], cyx = E[y x^T], cyy = E[y y^T] (each d x d), mx = E[x], my = E[y],
    n = number of (x, y) rows (tokens x images x pairs). All float64.
    """

    cxx: Tensor
    cyx: Tensor
    cyy: Tensor
    mx: Tensor
    my: Tensor
    n: float

    def centered(self) -> PairMoments:
        """Covariances about the means (for a fit with an affine offset)."""
        return PairMoments(
            cxx=self.cxx - torch.outer(self.mx, self.mx),
            cyx=self.cyx - torch.outer(self.my, self.mx),
            cyy=self.cyy - torch.outer(self.my, self.my),
            mx=torch.zeros_like(self.mx),
            my=torch.zeros_like(self.my),
            n=self.n,
        )

    def mse(self, K: Tensor, b: Optional[Tensor] = None) -> Tensor:
        """Mean over rows of ||y - K x - b||^2, from the moments alone."""
        K = K.to(self.cxx)
        err = torch.trace(self.cyy) - 2 * torch.sum(K * self.cyx) + torch.sum((K @ self.cxx) * K)
        if b is not None:
            b = b.to(self.cxx)
            err = err + 2 * b @ (K @ self.mx - self.my) + b @ b
        return err


def moment_dtype(name: str | torch.dtype) -> torch.dtype:
    """ "float64" | "float32" (or the dtype) -> the dtype of the per-batch moment products."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else name
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"moment compute dtype must be float64 or float32, got {name!r}")
    return dtype


class MomentAccumulator:
    """Streams the moments of trajectories (B, L+1, T, D) (module docstring).

    Args:
        num_layers: L (the trajectory holds layers 0..L).
        dim: D.
        endpoints: extra (a, b) layer pairs, a < b, whose cross moment is kept
            (e.g. (i, i + p) for the endpoint map of a span); consecutive pairs
            are always kept.
        tokens: the token rows used (a slice along T, e.g. one token group).
        device: where the moments live and the products run (default: CPU; put
            it on the trajectory's device).
        compute_dtype: dtype of the per-batch products: float64 (default) or
            float32 (faster on GPUs without fast float64; the products are still
            accumulated in float64).
    """

    def __init__(
        self,
        num_layers: int,
        dim: int,
        endpoints: Iterable[Sequence[int]] = (),
        tokens: slice = slice(None),
        device: Optional[torch.device | str] = None,
        compute_dtype: torch.dtype | str = torch.float64,
    ) -> None:
        if num_layers < 1 or dim < 1:
            raise ValueError(
                f"MomentAccumulator: need num_layers >= 1 and dim >= 1, got {num_layers}, {dim}"
            )
        compute_dtype = moment_dtype(compute_dtype)
        if not isinstance(tokens, slice):
            raise TypeError(
                f"MomentAccumulator: tokens must be a slice, got {type(tokens).__name__}"
            )
        L, D = int(num_layers), int(dim)
        pairs = []
        for pair in endpoints:
            a, b = (int(v) for v in pair)
            if not 0 <= a < b <= L:
                raise ValueError(
                    f"MomentAccumulator: endpoint pair {(a, b)} must satisfy 0 <= a < b <= {L}"
                )
            if b > a + 1 and (a, b) not in pairs:
                pairs.append((a, b))
        self.num_layers, self.dim, self.tokens = L, D, tokens
        self.endpoints: list[tuple[int, int]] = sorted(pairs)
        self.compute_dtype = compute_dtype
        E = len(self.endpoints)
        n_mat = (L + 1) + L + E
        self._sizes = {"mats": n_mat * D * D, "sums": (L + 1) * D, "counts": 2}
        self.buffer = torch.zeros(sum(self._sizes.values()), dtype=torch.float64, device=device)
        self.merged = False
        self._views()

    def _views(self) -> None:
        L, D, E = self.num_layers, self.dim, len(self.endpoints)
        mats, sums, counts = self.buffer.split(list(self._sizes.values()))
        mats = mats.view(-1, D, D)
        self.grams = mats[: L + 1]  # (L+1, D, D)
        self.crosses = mats[L + 1 : 2 * L + 1]  # (L, D, D): x_{l+1} x_l^T
        self.ends = mats[2 * L + 1 : 2 * L + 1 + E]  # (E, D, D): x_b x_a^T
        self.sums = sums.view(L + 1, D)
        self.counts = counts  # [rows per layer, images]
        self._ends_a = torch.tensor([a for a, _ in self.endpoints], dtype=torch.long)
        self._ends_b = torch.tensor([b for _, b in self.endpoints], dtype=torch.long)

    # ------------------------------------------------------------------ streaming

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    @property
    def rows(self) -> int:
        """Rows (tokens x images) seen per layer."""
        return int(self.counts[0].item())

    @property
    def images(self) -> int:
        return int(self.counts[1].item())

    @torch.no_grad()
    def update(self, trajectory: Tensor, valid: Optional[Tensor] = None) -> None:
        """Add a batch: trajectory (B, L+1, T, D) any float dtype; valid bool (B,) keeps rows."""
        if self.merged:
            raise RuntimeError("MomentAccumulator: already merged across ranks; start a new one")
        L, D = self.num_layers, self.dim
        if trajectory.ndim != 4 or trajectory.shape[1] != L + 1 or trajectory.shape[-1] != D:
            raise ValueError(
                f"MomentAccumulator: trajectory must be (B, {L + 1}, T, {D}), got {tuple(trajectory.shape)}"
            )
        x = trajectory[:, :, self.tokens]
        if valid is not None:
            x = x[valid.to(device=x.device, dtype=torch.bool)]
        images = x.shape[0]
        # (L+1, N, D): the layers are the batch of every product below
        x = x.to(device=self.device, dtype=self.compute_dtype).transpose(0, 1).reshape(L + 1, -1, D)
        xt = x.transpose(1, 2)
        self._add(self.grams, xt, x)
        self._add(self.crosses, xt[1:], x[:-1])
        if self.endpoints:
            self._add(self.ends, xt[self._ends_b], x[self._ends_a])
        self.sums += x.sum(1, dtype=torch.float64)
        self.counts[0] += x.shape[1]
        self.counts[1] += images

    def _add(self, dest: Tensor, left: Tensor, right: Tensor) -> None:
        """dest += left @ right, batched over the leading (layer) dim."""
        if left.dtype == torch.float64:
            dest.baddbmm_(left, right)
        else:
            dest += torch.bmm(left, right)

    @torch.no_grad()
    def all_reduce(self, group=None) -> MomentAccumulator:
        """Sum the moments of every DDP rank (one all_reduce); a no-op without torch.distributed.

        Every rank must call it; afterwards the accumulator takes no more updates."""
        import torch.distributed as dist

        if self.merged:
            raise RuntimeError("MomentAccumulator: all_reduce called twice")
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.buffer, op=dist.ReduceOp.SUM, group=group)
        self.merged = True
        return self

    def clone(self, device: Optional[torch.device | str] = None) -> MomentAccumulator:
        """An independent copy, optionally on another device (e.g. a snapshot at a
        calibration budget, or the moments moved to where the fits run)."""
        new = object.__new__(MomentAccumulator)
        new.__dict__.update(self.__dict__)
        new.buffer = self.buffer.to(device or self.device, copy=True)
        new._views()
        return new

    # ------------------------------------------------------------------ reading

    def cross(self, a: int, b: int) -> Tensor:
        """sum_rows x_b x_a^T (d x d) for a stored pair: a == b (Gram), b == a + 1, or an endpoint."""
        if a == b and 0 <= a <= self.num_layers:
            return self.grams[a]
        if b == a + 1 and 0 <= a < self.num_layers:
            return self.crosses[a]
        if (a, b) in self.endpoints:
            return self.ends[self.endpoints.index((a, b))]
        raise KeyError(
            f"moments of layer pair ({a}, {b}) were not accumulated: consecutive pairs and the "
            f"endpoints {self.endpoints} are; pass endpoints=[({a}, {b})] to MomentAccumulator"
        )

    def pair_moments(self, pairs: Iterable[Sequence[int]]) -> PairMoments:
        """Pooled moments of the (input layer a -> output layer b) pairs, normalised by rows."""
        pairs = [(int(a), int(b)) for a, b in pairs]
        if not pairs:
            raise ValueError("pair_moments: no pairs given")
        if self.rows == 0:
            raise ValueError("pair_moments: no data accumulated yet")
        n = float(self.rows * len(pairs))
        cxx = sum(self.cross(a, a) for a, _ in pairs) / n
        cyx = sum(self.cross(a, b) for a, b in pairs) / n
        cyy = sum(self.cross(b, b) for _, b in pairs) / n
        mx = sum(self.sums[a] for a, _ in pairs) / n
        my = sum(self.sums[b] for _, b in pairs) / n
        return PairMoments(cxx=cxx, cyx=cyx, cyy=cyy, mx=mx, my=my, n=n)
