"""Phase discovery: where along depth one recurrent block should hand over to the next.

1. Similarity. For layers l, m in 1..L, S[l, m] is the cosine similarity of the
   hidden states a_l and a_m of the same image and token, averaged over tokens
   and over N images (every image weighs the same). Token modes:
   - ``all``: every token (cls, registers, patches);
   - ``cls+patchmean``: two vectors per image, the CLS token and the mean of the
     patch tokens (registers excluded), as the Raptor reference does.
   `LayerSimilarity` accumulates the sums in float64 batch by batch, so the
   result equals the computation on all images at once.

2. Partition. A partition splits 1..L into k contiguous phases, written as
   boundaries (the last layer of every phase but the last: [7, 10] for L = 12
   is 1-7, 8-10, 11-12). The graph weight of a pair of layers is the
   dissimilarity W = 1 - S (``--kind similarity``) or the matrix itself
   (``--kind distance``), symmetrised W <- (W + W^T) / 2. Only pairs of distinct
   layers count: for unordered pairs i < j,
       cut(P)    = sum of W[i, j] over pairs in different phases,
       within(P) = sum of W[i, j] over pairs in the same phase,
   and cut + within is the same for every partition, so maximising the cut is
   minimising the within-phase dissimilarity. Methods:
   - ``dp``: the optimal partition into exactly k phases of at least
     `min_length` layers each, by dynamic programming over the last phase's
     start, O(k L^2) with the within-phase sums read from 2-D prefix sums.
     Ties (equal totals) go to the partition whose last boundary is earliest,
     then the one before it, and so on.
   - ``bisect``: greedy top-down bisection, compatible with the reference's
     recursive max-cut. Start from the single segment 1..L; while there are
     fewer than k segments, compute for every segment its best two-way
     contiguous split (the split point maximising the crossing dissimilarity,
     sum of W[i, j] with i left and j right of the split, both parts at least
     `min_length` long) and split the segment whose best split is largest.
     A split is admissible only if k phases stay reachable (the segments'
     capacities, sum of floor(length / min_length), remain >= k).
     Ties: the earliest split point within a segment, the segment covering the
     lowest layers between segments. (The reference, KempnerInstitute/raptor
     src/000_max_cut_dinov2_base.ipynb, bisects with an unconstrained max-cut
     and stops at a cut-weight threshold instead of a number of phases; here
     every split is contiguous and k fixes when to stop.)
   - random contiguous partitions (uniform over all partitions with phases of
     at least `min_length` layers), seeded, as baselines.

`raptor phases CONFIG [key=value ...]` streams `phases.num_images` validation
images through the teacher and writes `phases.json`, `similarity.npy` and
`phases.png` into the run folder; `raptor phases --matrix FILE --k K` partitions
a given matrix and prints {"boundaries": [...]}.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from dmd.stream import stream_trajectories
from raptor import distributed
from raptor.config import ConfigError
from raptor.errors import UserError, read_json

TOKEN_MODES = ("all", "cls+patchmean")
METHODS = ("dp", "bisect")
KINDS = ("similarity", "distance")
PHASES_FILE = "phases.json"
MATRIX_FILE = "similarity.npy"
_CHUNK_ELEMENTS = 1 << 25  # float64 values per chunk of the similarity update (256 MiB)


# --------------------------------------------------------------------------- similarity


class LayerSimilarity:
    """Streamed mean cosine similarity between the layers 1..L of a trajectory.

    update(trajectory (B, L+1, T, D), groups, valid=None): layer 0 is ignored;
    `groups` holds the token slices "cls" and "patch" (needed by
    ``cls+patchmean``); `valid` (B,) bool drops padding rows.
    compute() -> (L, L) float64 numpy array S with
        S[l, m] = mean over images n and vectors t of cos(a_l[n, t], a_m[n, t]),
    the vectors t being every token (``all``) or [CLS, mean of patch tokens]
    (``cls+patchmean``). A zero vector has cosine 0 with everything.
    """

    def __init__(
        self, num_layers: int, token_mode: str = "cls+patchmean", eps: float = 1e-8
    ) -> None:
        if token_mode not in TOKEN_MODES:
            raise ValueError(f"token mode must be one of {TOKEN_MODES}, got '{token_mode}'")
        self.num_layers = int(num_layers)
        self.token_mode = token_mode
        self.eps = eps
        self.sum = torch.zeros(self.num_layers, self.num_layers, dtype=torch.float64)
        self.num_images = 0
        self.num_vectors = 0  # per image and layer

    def _vectors(self, states: Tensor, groups: Optional[Mapping[str, slice]]) -> Tensor:
        """(b, L, T, D) float64 -> (b, L, V, D) unit vectors."""
        if self.token_mode == "cls+patchmean":
            if not groups or "cls" not in groups or "patch" not in groups:
                raise ValueError(
                    "token mode 'cls+patchmean' needs groups with 'cls' and 'patch' slices"
                )
            cls = states[:, :, groups["cls"]]
            patch = states[:, :, groups["patch"]].mean(dim=2, keepdim=True)
            states = torch.cat([cls, patch], dim=2)
        norms = states.norm(dim=-1, keepdim=True).clamp_min(self.eps)
        return states / norms

    @torch.no_grad()
    def update(
        self,
        trajectory: Tensor,
        groups: Optional[Mapping[str, slice]] = None,
        valid: Optional[Tensor] = None,
    ) -> None:
        if trajectory.ndim != 4 or trajectory.shape[1] != self.num_layers + 1:
            raise ValueError(
                f"trajectory must be (B, {self.num_layers + 1}, T, D) (layers 0..L), got {tuple(trajectory.shape)}"
            )
        if valid is not None:
            trajectory = trajectory[valid.to(trajectory.device, torch.bool)]
        B, _, T, D = trajectory.shape
        if B == 0:
            return
        if self.sum.device != trajectory.device:
            self.sum = self.sum.to(trajectory.device)
        per_image = self.num_layers * T * D
        chunk = max(1, _CHUNK_ELEMENTS // per_image)
        for part in trajectory[:, 1:].split(chunk):
            u = self._vectors(part.double(), groups)  # (b, L, V, D)
            flat = u.transpose(0, 1).reshape(self.num_layers, -1)
            self.sum += flat @ flat.T
            self.num_vectors = u.shape[2]
        self.num_images += B

    def compute(self) -> np.ndarray:
        if self.num_images == 0:
            raise UserError(
                "LayerSimilarity.compute: no image was added (is the validation data empty? "
                "check data.val_urls)"
            )
        return (self.sum / (self.num_images * self.num_vectors)).cpu().numpy()


# --------------------------------------------------------------------------- partitions


def dissimilarity(matrix: np.ndarray, kind: str = "similarity") -> np.ndarray:
    """The symmetrised pair weights W (L, L) of a similarity or distance matrix."""
    if kind not in KINDS:
        raise UserError(f"matrix kind must be one of {KINDS}, got '{kind}'")
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 1:
        raise UserError(f"expected a square L x L matrix, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise UserError("the matrix holds NaN or infinite values")
    w = 1.0 - m if kind == "similarity" else m
    return (w + w.T) / 2


def _prefix(w: np.ndarray) -> np.ndarray:
    """P with P[i, j] = sum of w[:i, :j], shape (L+1, L+1)."""
    p = np.zeros((w.shape[0] + 1, w.shape[1] + 1))
    p[1:, 1:] = w.cumsum(0).cumsum(1)
    return p


def _block_sum(p: np.ndarray, r0, r1, c0, c1):
    """Sum of w[r0:r1, c0:c1] (0-based half-open) from the prefix sums (broadcasts)."""
    return p[r1, c1] - p[r0, c1] - p[r1, c0] + p[r0, c0]


def _check_k(num_layers: int, k: int, min_length: int) -> None:
    if min_length < 1:
        raise UserError(f"min_length must be >= 1, got {min_length}")
    if k < 1 or k * min_length > num_layers:
        raise UserError(
            f"cannot split {num_layers} layers into k={k} phases of at least {min_length} layer(s)"
        )


def within_cost(w: np.ndarray, boundaries: Sequence[int]) -> float:
    """Sum of w[i, j] over unordered pairs i < j of layers in the same phase."""
    edges = [0, *boundaries, w.shape[0]]
    return float(sum(np.triu(w[a:b, a:b], 1).sum() for a, b in zip(edges, edges[1:])))


def cut_value(w: np.ndarray, boundaries: Sequence[int]) -> float:
    """Sum of w[i, j] over unordered pairs i < j of layers in different phases."""
    return float(np.triu(w, 1).sum()) - within_cost(w, boundaries)


def partition_dp(w: np.ndarray, k: int, min_length: int = 1) -> list[int]:
    """Optimal contiguous k-partition of the layers of the pair weights `w`
    (minimum within-phase sum = maximum cut; see the module docstring)."""
    L = w.shape[0]
    _check_k(L, k, min_length)
    p = _prefix(w)
    trace = np.concatenate([[0.0], np.cumsum(np.diag(w))])
    idx = np.arange(L + 1)
    s, e = np.meshgrid(idx, idx, indexing="ij")  # phase = layers s+1..e (1-based)
    cost = (_block_sum(p, s, e, s, e) - (trace[e] - trace[s])) / 2  # pairs i < j inside
    cost[e - s < min_length] = np.inf
    best = np.full(L + 1, np.inf)
    best[0] = 0.0  # covering zero layers with zero phases
    choices = []
    for _ in range(k):
        total = best[:, None] + cost  # [s, e]: previous phases end at s, this one at e
        choice = np.argmin(total, axis=0)  # first (earliest) s on ties
        best = total[choice, idx]
        choices.append(choice)
    boundaries, end = [], L
    for choice in reversed(choices[1:]):
        end = int(choice[end])
        boundaries.append(end)
    return boundaries[::-1]


def partition_bisect(w: np.ndarray, k: int, min_length: int = 1) -> list[int]:
    """Greedy top-down contiguous bisection into k phases (see the module docstring)."""
    L = w.shape[0]
    _check_k(L, k, min_length)
    p = _prefix(w)
    segments = [(0, L)]  # 0-based half-open [a, b)
    capacity = L // min_length  # most phases of >= min_length the segments can still give
    while len(segments) < k:
        best = None  # (crossing weight, segment index, split point)
        for i, (a, b) in enumerate(segments):
            splits = np.arange(a + min_length, b - min_length + 1)  # left = [a, c), right = [c, b)
            after = (
                capacity
                - (b - a) // min_length
                + (splits - a) // min_length
                + (b - splits) // min_length
            )
            splits = splits[after >= k]
            if splits.size == 0:
                continue
            cross = _block_sum(p, a, splits, splits, b)
            j = int(np.argmax(cross))  # earliest split on ties
            if best is None or cross[j] > best[0]:  # earliest segment on ties
                best = (cross[j], i, int(splits[j]))
        assert best is not None, "k * min_length <= L keeps a split admissible"
        _, i, c = best
        a, b = segments[i]
        capacity += (c - a) // min_length + (b - c) // min_length - (b - a) // min_length
        segments[i : i + 1] = [(a, c), (c, b)]
    return [b for _, b in segments[:-1]]


def random_partitions(
    num_layers: int, k: int, count: int, seed: int = 0, min_length: int = 1
) -> list[list[int]]:
    """`count` partitions drawn uniformly among all contiguous k-partitions of
    1..num_layers with phases of at least `min_length` layers (with replacement)."""
    _check_k(num_layers, k, min_length)
    rng = np.random.default_rng(seed)
    slack = num_layers - k * (
        min_length - 1
    )  # phases of length >= 1 after removing min_length-1 each
    out = []
    for _ in range(count):
        cuts = np.sort(rng.choice(np.arange(1, slack), size=k - 1, replace=False))
        out.append([int(c) + (i + 1) * (min_length - 1) for i, c in enumerate(cuts)])
    return out


def partition(
    matrix: np.ndarray, k: int, method: str = "dp", kind: str = "similarity", min_length: int = 1
) -> list[int]:
    """Boundaries of a k-phase partition of a layer similarity/distance matrix."""
    if method not in METHODS:
        raise UserError(f"partition method must be one of {METHODS}, got '{method}'")
    w = dissimilarity(matrix, kind)
    solve = partition_dp if method == "dp" else partition_bisect
    return solve(w, int(k), int(min_length))


# --------------------------------------------------------------------------- files


def read_matrix(path: str | Path) -> np.ndarray:
    """An L x L matrix from a .npy file or whitespace-separated text."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"matrix file not found: {path} (check --matrix)")
    try:
        m = (
            np.load(path, allow_pickle=False)
            if path.suffix == ".npy"
            else np.loadtxt(path, ndmin=2)
        )
    except ValueError as exc:
        raise UserError(f"cannot read matrix file {path}: {exc}") from None
    m = np.asarray(m, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise UserError(f"matrix file {path}: expected a square L x L matrix, got shape {m.shape}")
    return m


# --------------------------------------------------------------------------- discovery


def layer_similarity(
    teacher: Any,
    batches: Iterable[Mapping[str, Tensor]],
    num_images: int,
    token_mode: str,
    device: torch.device,
) -> tuple[np.ndarray, int]:
    """Stream up to `num_images` valid images of `batches` through the teacher;
    returns (S (L, L), images used)."""
    acc = LayerSimilarity(teacher.num_layers, token_mode)
    for traj, _, _ in stream_trajectories(
        batches,
        teacher.trajectory,
        device,
        images=num_images,
        only_valid=True,
        progress="phases: layer similarity",
    ):
        acc.update(traj, teacher.groups)
    return acc.compute(), acc.num_images


def phases_figure(similarity: np.ndarray, partitions: Mapping[str, Sequence[int]], title: str = ""):
    """Heat-map of S with each partition's boundaries drawn, one panel per k."""
    from matplotlib.figure import Figure

    L = similarity.shape[0]
    ks = sorted(partitions, key=int)
    fig = Figure(figsize=(4.2 * len(ks) + 0.8, 4.0))
    axes = fig.subplots(1, len(ks), squeeze=False)
    for ax, k in zip(axes[0], ks):
        im = ax.imshow(similarity, extent=(0.5, L + 0.5, L + 0.5, 0.5), cmap="viridis")
        for b in partitions[k]:
            ax.axhline(b + 0.5, color="white", lw=1.5)
            ax.axvline(b + 0.5, color="white", lw=1.5)
        ax.set_title(f"k={k}: boundaries {list(partitions[k])}", fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="cosine similarity")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def discover_phases(
    cfg: Any, run_dir: str | Path, loggers: Optional[list] = None
) -> dict[str, Any]:
    """Similarity matrix of the teacher and its partitions for every k in
    `phases.ks`; writes phases.json (last), similarity.npy and phases.png into
    run_dir. Skipped (the existing phases.json is returned) when phases.json exists."""
    run_dir = Path(run_dir)
    out = run_dir / PHASES_FILE
    if out.is_file():
        print(f"[phases] {out} exists: skipped (delete it to recompute)")
        return read_json(out, "phases file")
    pc = cfg.phases
    from dmd.plots import save_figure
    from raptor.data.stream import ShardDataModule
    from raptor.model.teacher import Teacher
    from raptor.train.runs import make_loggers

    teacher = Teacher.from_config(cfg.teacher)
    L = teacher.num_layers
    for k in pc.ks:
        if int(k) * pc.min_length > L:
            raise ConfigError(
                f"phases.ks: k={k} phases of >= {pc.min_length} layer(s) do not fit in {L} layers"
            )
    device = distributed.device(cfg.trainer.accelerator)
    teacher.to(device)
    data = ShardDataModule(cfg.data, teacher.data_config)
    similarity, used = layer_similarity(
        teacher, data.val_dataloader(), pc.num_images, pc.token_mode, device
    )
    if used < pc.num_images:
        print(f"[phases] the validation stream ended after {used} of {pc.num_images} images")

    w = dissimilarity(similarity, "similarity")
    partitions = {
        str(k): partition(similarity, int(k), pc.method, "similarity", pc.min_length) for k in pc.ks
    }
    randoms = {
        str(k): random_partitions(L, int(k), pc.random_partitions, pc.seed + int(k), pc.min_length)
        for k in pc.ks
    }
    result = {
        "num_layers": L,
        "method": pc.method,
        "token_mode": pc.token_mode,
        "kind": "similarity",
        "min_length": int(pc.min_length),
        "num_images": used,
        "partitions": partitions,
        "cut": {k: cut_value(w, b) for k, b in partitions.items()},
        "random": randoms,
        "random_cut": {k: [cut_value(w, b) for b in bs] for k, bs in randoms.items()},
        "seed": int(pc.seed),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    np.save(run_dir / MATRIX_FILE, similarity)
    fig = phases_figure(
        similarity, partitions, f"{cfg.teacher.name}: {pc.token_mode}, {used} images, {pc.method}"
    )
    save_figure(fig, run_dir, "phases", make_loggers(cfg, run_dir) if loggers is None else loggers)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    return result
