"""Streamed second moments of a depth trajectory, the only thing DMD fits need.

One pass over the data accumulates, in float64,

- the Gram matrix of every layer,           G_l    = sum_rows x_l x_l^T,      l = 0..L
- the cross moment of consecutive layers,   C_l    = sum_rows x_{l+1} x_l^T,  l = 0..L-1
- the cross moment of requested pairs,      E_(a,b) = sum_rows x_b x_a^T      (a < b)
- the sum of every layer, sum_rows x_l (for centred fits), and the row count,
- for ReplaceMe spans (i, p) (`mlp_spans`), from block i's MLP output m_i (the
  branch block i adds to the residual stream, x_i = y_i + m_i): its Gram matrix,
  its sum and the cross moments sum_rows x_b m_i^T for b = i and b = i + p
  (`replaceme_moments`),

where a *row* is one token of one image (X_l has tokens as rows). Memory is
O((2L + 1 + E + M) d^2) whatever the number of images. Every moment of a set of
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
        mlp_spans: spans (i, p), i >= 1, whose ReplaceMe moments are kept; `update`
            then needs the blocks' MLP outputs. Their endpoint pairs (i, i + p) are
            kept too.
    """

    def __init__(
        self,
        num_layers: int,
        dim: int,
        endpoints: Iterable[Sequence[int]] = (),
        tokens: slice = slice(None),
        device: Optional[torch.device | str] = None,
        compute_dtype: torch.dtype | str = torch.float64,
        mlp_spans: Iterable[Sequence[int]] = (),
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
        mlp_pairs = set()
        for i, p in ((int(i), int(p)) for i, p in mlp_spans):
            if not (1 <= i and p >= 1 and i + p <= L):
                raise ValueError(
                    f"MomentAccumulator: ReplaceMe span (i={i}, p={p}) must satisfy 1 <= i "
                    f"(the block whose MLP output is read), p >= 1, i + p <= {L}"
                )
            mlp_pairs |= {(i, i), (i, i + p)}
        endpoints = list(endpoints) + [(i, b) for i, b in mlp_pairs if b > i]
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
        self.mlp_pairs: list[tuple[int, int]] = sorted(mlp_pairs)  # (i, b): sum x_b m_i^T
        self.mlp_layers: list[int] = sorted({i for i, _ in mlp_pairs})
        self.compute_dtype = compute_dtype
        E, M = len(self.endpoints), len(self.mlp_layers) + len(self.mlp_pairs)
        n_mat = (L + 1) + L + E + M
        sums = (L + 1 + len(self.mlp_layers)) * D
        self._sizes = {"mats": n_mat * D * D, "sums": sums, "counts": 2}
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
        nm = len(self.mlp_layers)
        self.mlp_grams = mats[2 * L + 1 + E : 2 * L + 1 + E + nm]  # m_i m_i^T
        self.mlp_crosses = mats[2 * L + 1 + E + nm :]  # (i, b) of mlp_pairs: x_b m_i^T
        sums = sums.view(-1, D)
        self.sums, self.mlp_sums = sums[: L + 1], sums[L + 1 :]
        self.counts = counts  # [rows per layer, images]
        self._ends_a = torch.tensor([a for a, _ in self.endpoints], dtype=torch.long)
        self._ends_b = torch.tensor([b for _, b in self.endpoints], dtype=torch.long)
        # MLP outputs are indexed by block: m_i at mlp[:, i - 1]
        self._mlp_blocks = torch.tensor([i - 1 for i in self.mlp_layers], dtype=torch.long)
        self._mlp_a = torch.tensor(
            [self.mlp_layers.index(i) for i, _ in self.mlp_pairs], dtype=torch.long
        )
        self._mlp_b = torch.tensor([b for _, b in self.mlp_pairs], dtype=torch.long)

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
    def update(
        self, trajectory: Tensor, valid: Optional[Tensor] = None, mlp: Optional[Tensor] = None
    ) -> None:
        """Add a batch: trajectory (B, L+1, T, D) any float dtype; valid bool (B,) keeps rows;
        mlp (B, L, T, D) the blocks' MLP outputs (block l at index l - 1), needed with
        mlp_spans (ignored otherwise)."""
        if self.merged:
            raise RuntimeError("MomentAccumulator: already merged across ranks; start a new one")
        L, D = self.num_layers, self.dim
        if trajectory.ndim != 4 or trajectory.shape[1] != L + 1 or trajectory.shape[-1] != D:
            raise ValueError(
                f"MomentAccumulator: trajectory must be (B, {L + 1}, T, {D}), got {tuple(trajectory.shape)}"
            )
        if self.mlp_layers and (mlp is None or mlp.shape[:2] != (trajectory.shape[0], L)):
            got = None if mlp is None else tuple(mlp.shape)
            raise ValueError(
                f"MomentAccumulator: ReplaceMe spans need the blocks' MLP outputs "
                f"(B, {L}, T, {D}) with the trajectory, got {got}"
            )
        x = trajectory[:, :, self.tokens]
        if valid is not None:
            keep = valid.to(device=x.device, dtype=torch.bool)
            x = x[keep]
            mlp = None if mlp is None else mlp[keep.to(mlp.device)]
        images = x.shape[0]
        # (L+1, N, D): the layers are the batch of every product below
        x = x.to(device=self.device, dtype=self.compute_dtype).transpose(0, 1).reshape(L + 1, -1, D)
        xt = x.transpose(1, 2)
        self._add(self.grams, xt, x)
        self._add(self.crosses, xt[1:], x[:-1])
        if self.endpoints:
            self._add(self.ends, xt[self._ends_b], x[self._ends_a])
        self.sums += x.sum(1, dtype=torch.float64)
        if self.mlp_layers:
            m = mlp[:, self._mlp_blocks.to(mlp.device)][:, :, self.tokens]
            m = (
                m.to(device=self.device, dtype=self.compute_dtype)
                .transpose(0, 1)
                .reshape(-1, x.shape[1], D)
            )
            self._add(self.mlp_grams, m.transpose(1, 2), m)
            self._add(self.mlp_crosses, xt[self._mlp_b], m[self._mlp_a])
            self.mlp_sums += m.sum(1, dtype=torch.float64)
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

    def replaceme_moments(self, span: Sequence[int]) -> PairMoments:
        """ReplaceMe's regression for span (i, p), normalised by rows: input m_i (block i's
        MLP output), target t = x_{i+p} - y_i = x_{i+p} - x_i + m_i, so that
        x_{i+p} ~ y_i + K m_i (+ b)."""
        i, p = int(span[0]), int(span[1])
        if (i, i + p) not in self.mlp_pairs:
            raise KeyError(
                f"ReplaceMe moments of span ({i}, {p}) were not accumulated; pass "
                f"mlp_spans=[({i}, {p})] to MomentAccumulator (have {self.mlp_pairs})"
            )
        if self.rows == 0:
            raise ValueError("replaceme_moments: no data accumulated yet")
        n, j = float(self.rows), i + p
        k = self.mlp_layers.index(i)
        mm = self.mlp_grams[k]
        xm_end = self.mlp_crosses[self.mlp_pairs.index((i, j))]  # sum x_{i+p} m^T
        xm_in = self.mlp_crosses[self.mlp_pairs.index((i, i))]  # sum x_i m^T
        cross = self.cross(i, j)  # sum x_{i+p} x_i^T
        tm = xm_end - xm_in + mm  # sum t m^T
        tt = self.cross(j, j) + self.cross(i, i) + mm - cross - cross.T
        tt = tt + xm_end + xm_end.T - xm_in - xm_in.T
        ms = self.mlp_sums[k]
        return PairMoments(
            cxx=mm / n,
            cyx=tm / n,
            cyy=tt / n,
            mx=ms / n,
            my=(self.sums[j] - self.sums[i] + ms) / n,
            n=n,
        )
