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

An update streams: the valid rows are cut into blocks (whole images when one
image's tokens fit, else pieces of one image's tokens), and within a block the
layers are visited in order, each copied once into a (rows, d) scratch slot in
the compute dtype; every product is one (d, rows) x (rows, d) matrix product in
that dtype whose result is added into the float64 moments. What an update
allocates is the scratch (three slots and one d x d product), sized from
`max_update_bytes` whatever the batch, depth or token count: no float64 copy of
the (B, L+1, T, D) batch is made. With float32 products the moments differ from
an all-float64 pass by rounding inside each block's products only (measured and
bounded on ViT-like data in tests/test_dmd_moments_precision.py; `dmd.fit`
warns where that rounding can move K).
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
    """ "float64" | "float32" (or the dtype) -> the dtype of the moment products."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else name
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"moment compute dtype must be float64 or float32, got {name!r}")
    return dtype


MiB = 2**20
UPDATE_BYTES = 256 * MiB  # default bound on what one update allocates


def _runs(indices: Sequence[int]) -> list[slice]:
    """Sorted indices as maximal runs of consecutive ones (slices)."""
    runs, start = [], 0
    for k in range(1, len(indices) + 1):
        if k == len(indices) or indices[k] != indices[k - 1] + 1:
            runs.append(slice(indices[start], indices[k - 1] + 1))
            start = k
    return runs


class _Block:
    """Some images x some tokens of a batch: copies one layer at a time of the trajectory
    (or of the MLP outputs) into a (rows, D) scratch slot, in the compute dtype."""

    def __init__(
        self,
        trajectory: Tensor,
        mlp: Optional[Tensor],
        images: list[slice],
        tokens: slice,
        scratch: Tensor,
    ) -> None:
        self.trajectory, self.mlp_out, self.images, self.tokens = trajectory, mlp, images, tokens
        self.width = len(range(trajectory.shape[2])[tokens])
        self.rows = sum(r.stop - r.start for r in images) * self.width
        self.scratch = scratch[:, : self.rows]

    def _copy(self, source: Tensor, index: int, slot: int) -> Tensor:
        out, start = self.scratch[slot], 0
        for run in self.images:
            n = (run.stop - run.start) * self.width
            out[start : start + n].view(-1, self.width, out.shape[-1]).copy_(
                source[run, index, self.tokens]
            )
            start += n
        return out

    def layer(self, layer: int, slot: int) -> Tensor:
        """x_layer of the block's rows (rows, D)."""
        return self._copy(self.trajectory, layer, slot)

    def mlp(self, i: int, slot: int) -> Tensor:
        """m_i, block i's MLP output, of the block's rows (rows, D)."""
        return self._copy(self.mlp_out, i - 1, slot)


def block_rows(dim: int, compute_dtype: torch.dtype | str, max_update_bytes: int) -> int:
    """Rows per block of an update that may allocate `max_update_bytes`: three (rows, dim)
    slots in the compute dtype, the dim x dim product, its float64 cast (adding it to a
    moment makes one) and two row sums. ValueError when not even one row fits."""
    dtype = moment_dtype(compute_dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    fixed = dim * dim * (itemsize + (8 if itemsize != 8 else 0)) + 2 * dim * 8
    rows = (int(max_update_bytes) - fixed) // (3 * dim * itemsize)
    if rows < 1:
        raise ValueError(
            f"max_update_bytes={max_update_bytes} cannot hold one row block at width {dim} "
            f"in {dtype}: need at least {fixed + 3 * dim * itemsize} bytes"
        )
    return rows


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
        compute_dtype: dtype of the products: float64 (default here, exact) or
            float32 (1.6-1.7x faster per update on CPU; each block's products are
            still added into the float64 moments). `raptor dmd` and the callback
            take it from `dmd.compute_dtype` (float32 by default).
        mlp_spans: spans (i, p), i >= 1, whose ReplaceMe moments are kept; `update`
            then needs the blocks' MLP outputs. Their endpoint pairs (i, i + p) are
            kept too.
        max_update_bytes: the most one `update` allocates (its scratch: three blocks of
            rows in the compute dtype, one d x d product and, below float64, that
            product's float64 cast), whatever the batch, depth or number of tokens; it
            sets the rows per block (`block_rows`).
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
        max_update_bytes: int = UPDATE_BYTES,
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
        self.block_rows = block_rows(D, compute_dtype, max_update_bytes)
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
        mlp_spans (ignored otherwise). Streams over blocks of rows and, in each, over the
        layers (module docstring), so it allocates at most `max_update_bytes`."""
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
        keep = range(trajectory.shape[0])
        if valid is not None:
            keep = torch.nonzero(valid.bool().cpu()).flatten().tolist()
        tokens = range(trajectory.shape[2])[self.tokens]
        if not keep or not tokens:
            return
        rows = self.block_rows
        per_image = max(rows // len(tokens), 1)
        step = rows if per_image == 1 else len(tokens)  # tokens per block
        buffers = torch.empty(
            3, min(rows, len(keep) * len(tokens)), D, dtype=self.compute_dtype, device=self.device
        )
        product = torch.empty(D, D, dtype=self.compute_dtype, device=self.device)
        for i in range(0, len(keep), per_image):
            images = _runs(keep[i : i + per_image])
            for t in range(0, len(tokens), step):
                part = tokens[t : t + step]
                block = _Block(
                    trajectory, mlp, images, slice(part.start, part.stop, part.step), buffers
                )
                self._add_block(block, product)
        self.counts[0] += len(keep) * len(tokens)
        self.counts[1] += len(keep)

    def _add_block(self, block: _Block, product: Tensor) -> None:
        """The moments of one block of rows, layer after layer."""
        prev = None
        for layer in range(self.num_layers + 1):
            cur = block.layer(layer, slot=layer % 2)
            self._add(self.grams[layer], cur, cur, product)
            self.sums[layer] += cur.sum(0)
            if prev is not None:
                self._add(self.crosses[layer - 1], cur, prev, product)
            for k, (a, b) in enumerate(self.endpoints):
                if b == layer:
                    self._add(self.ends[k], cur, block.layer(a, slot=2), product)
            if layer in self.mlp_layers:
                k = self.mlp_layers.index(layer)
                m = block.mlp(layer, slot=2)
                self._add(self.mlp_grams[k], m, m, product)
                self.mlp_sums[k] += m.sum(0)
            for k, (i, b) in enumerate(self.mlp_pairs):
                if b == layer:
                    self._add(self.mlp_crosses[k], cur, block.mlp(i, slot=2), product)
            prev = cur

    def _add(self, dest: Tensor, left: Tensor, right: Tensor, product: Tensor) -> None:
        """dest += left^T @ right: in float64 directly, else the product in the compute
        dtype (into the scratch `product`) added to the float64 moment."""
        if left.dtype == torch.float64:
            dest.addmm_(left.T, right)
        else:
            dest += torch.mm(left.T, right, out=product)

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

    @torch.no_grad()
    def add_(self, other: MomentAccumulator) -> MomentAccumulator:
        """Add the moments of `other` (same layers, width, pairs and tokens) into these."""
        layout = ("num_layers", "dim", "endpoints", "mlp_pairs", "tokens")
        if any(getattr(self, k) != getattr(other, k) for k in layout):
            raise ValueError("MomentAccumulator.add_: the two accumulators keep different moments")
        self.buffer += other.buffer.to(self.device)
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
