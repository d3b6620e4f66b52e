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
   and cut + within is the total pair weight, the same for every partition.
   Methods:
   - ``dp``: the partition into exactly k phases of at least `min_length`
     layers with the smallest within(P) (= the largest cut), by dynamic
     programming over the last phase's start, O(k L^2) with the within-phase
     sums read from 2-D prefix sums. Ties (equal totals) go to the partition
     whose last boundary is earliest, then the one before it, and so on.
   - ``bisect``: the reference's recursive bisection (KempnerInstitute/raptor,
     raptor/max_cut_dinov2_base.ipynb), restricted to contiguous splits. Start
     from the single phase 1..L and repeatedly make the split with the largest
     gain: over every phase of at least `min_split` layers (the reference never
     splits a phase under 4 layers), its best two-way contiguous split, whose
     gain is the crossing weight sum of W[i, j] with i left and j right of it
     (both parts at least `min_length` long). Stops at k phases, or, with
     `eps`, when no split gains more than eps x the total pair weight (the
     reference's rule; `eps` alone, without k, decides the number of phases).
     With k, a split is admissible only if k phases stay reachable. Ties: the
     earliest split point within a phase, then the phase covering the lowest
     layers. The reference visits its phases in another order but splits every
     phase whose gain exceeds eps (whatever the order), so each partition its
     rule gives is one this greedy order passes through, at that many phases
     (the largest gain first). On the reference's DINOv2-B matrix (tests/data)
     its eps of 0.2, 0.1, 0.09 and k = 2, 3, 4 both give [7], [7, 10],
     [4, 7, 10]. The reference's splits are unconstrained max-cuts (any subset);
     on that matrix they are contiguous.
   - random contiguous partitions (uniform over all partitions with phases of
     at least `min_length` layers), seeded, as baselines.
   `split_gains(P)` orders a partition's boundaries as bisect would make them
   (top-down, largest gain first) and lists the gains: bisect maximises them one
   at a time, dp their sum (the cut). Both are reported for both methods
   (docs/PHASES.md).

`raptor phases CONFIG [key=value ...]` streams `phases.num_images` images of the
`phases.split` split through the teacher and writes `phases.json` (both methods'
partitions and objectives), `similarity.npy` and `phases.png` into the run folder;
`raptor phases --matrix FILE --k K` partitions a given matrix and prints
{"boundaries": [...], "objectives": {...}, "total_weight": ...}.
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
from raptor.model.partition import Partition

TOKEN_MODES = ("all", "cls+patchmean")
METHODS = ("dp", "bisect")
KINDS = ("similarity", "distance")
SPLITS = ("train", "val")
MIN_SPLIT = 4  # bisect never splits a phase of fewer layers (the reference's 2 x min_size 2)
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
    edges = Partition(w.shape[0], boundaries).edges
    return float(sum(np.triu(w[a:b, a:b], 1).sum() for a, b in zip(edges, edges[1:])))


def total_weight(w: np.ndarray) -> float:
    """Sum of w[i, j] over all unordered pairs i < j (= cut + within of any partition)."""
    return float(np.triu(w, 1).sum())


def cut_value(w: np.ndarray, boundaries: Sequence[int]) -> float:
    """Sum of w[i, j] over unordered pairs i < j of layers in different phases."""
    return total_weight(w) - within_cost(w, boundaries)


def split_gains(w: np.ndarray, boundaries: Sequence[int]) -> list[float]:
    """The crossing weights of a partition's splits in the order bisect makes them:
    from 1..L, repeatedly split a phase at the remaining boundary whose split crosses
    the most weight (earliest on ties). They sum to the partition's cut."""
    p = _prefix(w)
    segments, todo, gains = [(0, w.shape[0])], set(boundaries), []
    while todo:
        gain, c = max(
            (_block_sum(p, a, c, c, b), -c) for a, b in segments for c in todo if a < c < b
        )
        c = -c
        todo.remove(c)
        gains.append(float(gain))
        i = next(i for i, (a, b) in enumerate(segments) if a < c < b)
        segments[i : i + 1] = [(segments[i][0], c), (c, segments[i][1])]
    return gains


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


def _capacities(num_layers: int, min_length: int, min_split: int) -> list[int]:
    """cap[n]: the most phases bisect can make of a phase of n layers."""
    cap = [0] * (num_layers + 1)
    for n in range(1, num_layers + 1):
        cuts = range(min_length, n - min_length + 1) if n >= min_split else ()
        cap[n] = max([1, *(cap[c] + cap[n - c] for c in cuts)])
    return cap


def partition_bisect(
    w: np.ndarray,
    k: Optional[int],
    min_length: int = 1,
    min_split: int = MIN_SPLIT,
    eps: Optional[float] = None,
) -> list[int]:
    """Greedy top-down contiguous bisection (see the module docstring): until k phases
    (k None: until the eps rule stops it), never splitting a phase of fewer than
    `min_split` layers; with `eps`, only splits gaining more than eps x total_weight(w).
    May return fewer than k phases when eps stops it first."""
    L = w.shape[0]
    if k is None and eps is None:
        raise UserError("bisect needs k (the number of phases) or eps (its stopping rule)")
    if min_split < 1 or min_length < 1:
        raise UserError(f"min_split and min_length must be >= 1, got {min_split}, {min_length}")
    cap = _capacities(L, min_length, min_split)
    if k is not None:
        _check_k(L, k, min_length)
        if k > cap[L]:
            raise UserError(
                f"bisect cannot split {L} layers into k={k} phases: it never splits a phase of "
                f"fewer than min_split={min_split} layers (at most {cap[L]} phases)"
            )
    threshold = -np.inf if eps is None else eps * total_weight(w)
    p = _prefix(w)
    segments = [(0, L)]  # 0-based half-open [a, b)
    capacity = cap[L]  # most phases the segments can still give
    while k is None or len(segments) < k:
        best = None  # (crossing weight, segment index, split point)
        for i, (a, b) in enumerate(segments):
            if b - a < min_split:
                continue
            splits = np.arange(a + min_length, b - min_length + 1)  # left [a, c), right [c, b)
            if k is not None:
                after = capacity - cap[b - a] + np.array([cap[c - a] + cap[b - c] for c in splits])
                splits = splits[after >= k]
            if splits.size == 0:
                continue
            cross = _block_sum(p, a, splits, splits, b)
            j = int(np.argmax(cross))  # earliest split on ties
            if best is None or cross[j] > best[0]:  # earliest segment on ties
                best = (cross[j], i, int(splits[j]))
        if best is None or not best[0] > threshold:
            break
        _, i, c = best
        a, b = segments[i]
        capacity += cap[c - a] + cap[b - c] - cap[b - a]
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
    matrix: np.ndarray,
    k: Optional[int],
    method: str = "dp",
    kind: str = "similarity",
    min_length: int = 1,
    min_split: int = MIN_SPLIT,
    eps: Optional[float] = None,
) -> list[int]:
    """Boundaries of a k-phase partition of a layer similarity/distance matrix
    (`min_split` and `eps` apply to bisect; bisect with eps and no k picks the count)."""
    if method not in METHODS:
        raise UserError(f"partition method must be one of {METHODS}, got '{method}'")
    w = dissimilarity(matrix, kind)
    if method == "dp":
        if k is None:
            raise UserError("dp needs k, the number of phases")
        return partition_dp(w, int(k), int(min_length))
    found = partition_bisect(w, k, int(min_length), int(min_split), eps)
    if k is not None and len(found) + 1 < k:
        raise UserError(
            f"bisect stopped at {len(found) + 1} phases, short of k={k}: no split gains more "
            f"than eps={eps} of the total pair weight (lower eps, or leave it unset to stop at k)"
        )
    return found


def compare_methods(
    matrix: np.ndarray,
    k: Optional[int],
    method: str,
    kind: str = "similarity",
    min_length: int = 1,
    min_split: int = MIN_SPLIT,
    eps: Optional[float] = None,
) -> dict[str, dict[str, Any]]:
    """Both methods' partitions with the phase count of `method`'s (which must exist),
    each with its objectives: {name: {"boundaries", "within", "split_gains"}}, or
    {"boundaries": None, "error": why} for the other method when it has none."""
    w = dissimilarity(matrix, kind)
    options = dict(kind=kind, min_length=min_length, min_split=min_split, eps=eps)
    chosen = partition(matrix, k, method, **options)
    out = {}
    for name in METHODS:
        try:
            found = (
                chosen if name == method else partition(matrix, len(chosen) + 1, name, **options)
            )
        except UserError as exc:
            out[name] = {"boundaries": None, "error": str(exc)}
            continue
        out[name] = {
            "boundaries": found,
            "within": within_cost(w, found),
            "split_gains": split_gains(w, found),
        }
    return out


def describe(objectives: Mapping[str, Mapping[str, Any]], method: str, total: float) -> str:
    """One line: `method`'s partition, then the other's, each with its within cost and its
    split gains as fractions of the total pair weight `total`."""

    def one(name):
        r = objectives[name]
        if r["boundaries"] is None:
            return f"{name}: none ({r['error']})"
        gains = ", ".join(f"{g / total:.1%}" for g in r["split_gains"]) or "-"
        return f"{name} {r['boundaries']} (within {r['within']:.4f}, split gains {gains})"

    return "  |  ".join(one(name) for name in sorted(objectives, key=lambda n: n != method))


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
    run_dir. Skipped (the existing phases.json is returned) when phases.json exists.
    With several ranks (torchrun, a pipeline's DDP) rank 0 computes it on the images one
    process reads, then the others read its phases.json."""
    distributed.join_process_group(str(cfg.trainer.accelerator))
    return distributed.rank_zero_first(lambda: _discover(cfg, Path(run_dir), loggers))


def _discover(cfg: Any, run_dir: Path, loggers: Optional[list]) -> dict[str, Any]:
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
    most = _capacities(L, pc.min_length, pc.min_split)[L] if pc.method == "bisect" else L
    for k in pc.ks:
        if int(k) * pc.min_length > L or int(k) > most:
            raise ConfigError(
                f"phases.ks: k={k} phases of >= {pc.min_length} layer(s) do not fit in {L} layers"
                + (f" with phases.min_split={pc.min_split}" if pc.method == "bisect" else "")
            )
    device = distributed.device(cfg.trainer.accelerator)
    teacher.to(device)
    data = ShardDataModule(cfg.data, teacher.data_config, ranks=(0, 1))  # every image
    loader = data.train_dataloader() if pc.split == "train" else data.val_dataloader()
    similarity, used = layer_similarity(teacher, loader, pc.num_images, pc.token_mode, device)
    if used < pc.num_images:
        print(f"[phases] the {pc.split} stream ended after {used} of {pc.num_images} images")
    run_dir.mkdir(parents=True, exist_ok=True)
    np.save(run_dir / MATRIX_FILE, similarity)

    w = dissimilarity(similarity, "similarity")
    options = dict(min_length=pc.min_length, min_split=pc.min_split, eps=pc.eps)
    try:
        objectives = {
            str(k): compare_methods(similarity, int(k), pc.method, **options) for k in pc.ks
        }
    except UserError as exc:
        raise UserError(
            f"{exc}; the similarity matrix is in {run_dir / MATRIX_FILE}: try other settings "
            "with `raptor phases --matrix FILE`"
        ) from None
    partitions = {k: o[pc.method]["boundaries"] for k, o in objectives.items()}
    randoms = {
        str(k): random_partitions(L, int(k), pc.random_partitions, pc.seed + int(k), pc.min_length)
        for k in pc.ks
    }
    result = {
        "num_layers": L,
        "method": pc.method,
        "token_mode": pc.token_mode,
        "kind": "similarity",
        "split": pc.split,
        "min_length": int(pc.min_length),
        "min_split": int(pc.min_split),
        "eps": pc.eps,
        "num_images": used,
        "partitions": partitions,
        "cut": {k: cut_value(w, b) for k, b in partitions.items()},
        "objectives": objectives,  # per k, both methods: boundaries, within, split_gains
        "total_weight": total_weight(w),
        "random": randoms,
        "random_cut": {k: [cut_value(w, b) for b in bs] for k, bs in randoms.items()},
        "seed": int(pc.seed),
    }
    fig = phases_figure(
        similarity, partitions, f"{cfg.teacher.name}: {pc.token_mode}, {used} images, {pc.method}"
    )
    save_figure(
        fig, run_dir, "phases", make_loggers(cfg, run_dir, "phases") if loggers is None else loggers
    )
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    return result
