"""Streaming webdataset shards to every rank: `ShardDataModule` and its loaders.

Batches are dicts::

    {"image": float (B, 3, H, W) normalized, "label": long (B,) (-1: no label),
     "valid": bool (B,) (False only for validation padding rows),
     "target": dense shards read with a target kind (`ShardDataModule(target=...)`) only:
               seg long (B, H, W) class indices, 255 void (also padding rows); depth float
               (B, H, W) metres, 0 where there is no depth (also padding rows),
     "missing": long () (validation: samples of the reader's planned share that it could
                not deliver, missing from a shard or skipped as bad; set on its last batch
                only, so the sum over a pass is 0 exactly when every sample was scored)}

Shards come from a URL pattern with brace expansion (`/data/train-{000000..000127}.tar`,
several patterns joined by `::`), or from a local folder with a `manifest.json` written by
`raptor shards`. Local paths are opened directly, other URLs through fsspec (`s3://`,
`gs://`, `https://` with the matching fsspec backend); `pipe:` URLs run a shell command and
are refused unless `data.allow_pipe`. A `manifest.json` next to the shards supplies the
sample count of every shard.

Splitting, with R ranks and W dataloader workers per rank (G = R x W readers):

- training: every epoch all ranks shuffle the shard list with the same seed (`data.seed`,
  epoch); reader g of G reads the shards `split_shards` gives it (readers share a shard and
  take every m-th sample of it when shards < G), repeats them endlessly, shuffles samples
  in a buffer and yields exactly its share of `num_train_batches` batches; so every rank
  yields the same number of batches, whatever the shard sizes.
- validation: `plan_validation` gives every sample to exactly one reader (whole shards
  balanced by the manifest's counts, or every G-th sample without a manifest); each rank
  pads its last batches with valid=False rows and adds all-padding batches up to the
  largest rank's count, so all ranks run the same number of batches.

Dense targets (`{key}.seg.png` / `{key}.depth.png`, `raptor.data.dense`) go through the
image's geometry (resize of the shorter side, center crop) with nearest-neighbour
resampling; the image is not augmented. A sample whose image cannot be decoded, whose
target is missing, undecodable, of another size than its image or (seg) holds a label
outside the manifest's classes (other than 255), whose label is outside the head's classes
(`num_classes`), or whose label is missing/bad (when `data.require_labels`) is skipped,
counted (`skip_stats()`) and reported by a rate-limited warning naming shard and key.
Every shard's samples are counted as it is read; at its end a count below the manifest's
(a tar cut inside a header or a member, or a manifest that overstates it) is warned about,
naming the shard with the expected and read counts, and the missing samples count as
bad. A tar that breaks off without a manifest count counts as one bad sample. When more
than `data.max_bad_fraction` of a worker's samples are bad (after at least 50 read and 3
bad) the run stops with `BadDataError` naming the shard and the reasons.

The training loader is resumable mid-epoch: `state_dict()` holds (epoch, batches consumed)
and Lightning stores it in checkpoints; after `load_state_dict` the next iteration replays
the epoch's stream and starts at the next batch (workers re-read and drop the consumed
batches; no training compute). Its epoch follows `trainer.current_epoch` when attached
to a Trainer (set `loader.epoch` otherwise), so each epoch reshuffles.
"""

from __future__ import annotations

import io
import itertools
import math
import multiprocessing
import posixpath
import random
import time
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple
from urllib.parse import urlparse

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from raptor import distributed
from raptor.data.shards import (
    MANIFEST,
    TarSamples,
    count_problem,
    parse_manifest,
    read_manifest,
    resize_center_crop,
)
from raptor.errors import RunFailed, UserError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")
MIN_SEEN, MIN_BAD = 50, 3  # the bad-fraction limit applies after this many read / bad
WARN_FIRST, WARN_EVERY_S = 5, 60.0  # warn for the first bad samples, then once a minute


class BadDataError(RunFailed):
    """Too many bad samples: the data (or a shard) is broken."""


class BadSampleWarning(UserWarning):
    """A sample was skipped."""


# --------------------------------------------------------------------------- URLs


@dataclass
class ShardSet:
    """Shard URLs of one split; `counts` (samples per shard) when a manifest lists them;
    `stored_crop`: the side of the crops they store (`raptor shards --crop`), per the manifest."""

    urls: List[str]
    counts: Optional[List[int]] = None
    classes: Optional[List[str]] = None
    stored_crop: Optional[int] = None
    dense: Optional[Dict[str, Any]] = None  # the manifest's "dense" section

    @property
    def total(self) -> Optional[int]:
        return None if self.counts is None else sum(self.counts)


def check_url(url: str, allow_pipe: bool) -> None:
    if url.startswith("pipe:") and not allow_pipe:
        raise UserError(
            f"shard URL '{url}' is a pipe: URL, which runs a shell command; "
            "set data.allow_pipe=true to allow it"
        )


def _is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file") and not url.startswith("pipe:")


def resolve_shards(spec: str, split: str, allow_pipe: bool = False) -> ShardSet:
    """The shards named by `spec`: a local folder holding manifest.json (its `split`), or a
    URL pattern (brace expansion, `::` between patterns)."""
    import webdataset as wds

    if _is_local(spec) and Path(spec).is_dir():
        manifest = read_manifest(spec)
        if split not in manifest["splits"]:
            raise UserError(
                f"{Path(spec) / MANIFEST} has no '{split}' split (it has {sorted(manifest['splits'])})"
            )
        shards = manifest["splits"][split]["shards"]
        found = ShardSet(
            [str(Path(spec) / s["name"]) for s in shards],
            [int(s["num_samples"]) for s in shards],
            manifest.get("classes"),
            _stored_crop(manifest),
            manifest.get("dense"),
        )
    else:
        urls = wds.shardlists.expand_urls(spec)
        if not urls:
            raise UserError(f"shard pattern '{spec}' names no shards")
        for url in urls:
            check_url(url, allow_pipe)
        found = ShardSet(urls, *_manifest_counts(urls))
    _check_local_files(found.urls)
    return found


def _check_local_files(urls: Sequence[str]) -> None:
    """UserError naming the local shard files that do not exist (checked before reading)."""
    missing = [u for u in urls if _is_local(u) and not Path(_local_path(u)).is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(
            f"{len(missing)} of {len(urls)} shards not found: {', '.join(missing[:3])}{more}"
        )


def _stored_crop(manifest: Dict[str, Any]) -> Optional[int]:
    return (manifest.get("options") or {}).get("crop")


def _manifest_counts(urls: List[str]) -> tuple:
    """Per-shard counts, classes, stored crop side and dense section from a manifest.json in
    the shards' common folder, if it lists them all (Nones otherwise)."""
    nothing = None, None, None, None
    folders = {posixpath.dirname(u) for u in urls}
    if len(folders) != 1 or urls[0].startswith("pipe:"):
        return nothing
    import fsspec

    path = posixpath.join(folders.pop(), MANIFEST)
    try:
        with fsspec.open(path, "rt") as fh:
            text = fh.read()
    except (OSError, ImportError, UnicodeDecodeError):  # no (readable) manifest: count later
        return nothing
    manifest = parse_manifest(text, path)
    counts = {
        s["name"]: s["num_samples"] for sp in manifest["splits"].values() for s in sp["shards"]
    }
    names = [posixpath.basename(u) for u in urls]
    if not all(n in counts for n in names):
        return nothing
    return (
        [counts[n] for n in names],
        manifest.get("classes"),
        _stored_crop(manifest),
        manifest.get("dense"),
    )


def _local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file:") else url


def open_url(url: str):
    """A binary stream for a shard URL (local file, `pipe:` command, or fsspec URL);
    UserError naming a shard that does not exist."""
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    try:
        if _is_local(url):
            return open(_local_path(url), "rb")
        import fsspec

        return fsspec.open(url, "rb").open()
    except FileNotFoundError:
        raise UserError(f"shard {url} not found") from None


def shard_samples(url: str) -> Iterator[Dict[str, Any]]:
    """Raw samples of one tar shard, dicts {"__key__", "__url__", ext: bytes, ...}; returns
    (as the generator's value) its TarSamples: the count read and why the tar broke off."""
    stream = open_url(url)
    tar = TarSamples(stream, url)
    try:
        yield from tar
    finally:
        stream.close()
    return tar


def count_samples(urls: Sequence[str]) -> int:
    """Samples in the shards, by reading them (used only when no manifest lists them); a
    damaged tar counts the samples before the damage, which readers then report."""
    return sum(1 for url in urls for _ in shard_samples(url))


# --------------------------------------------------------------------------- splitting


@dataclass(frozen=True)
class ShardSlice:
    """Samples i of shard `index` with i % stride == offset."""

    index: int
    stride: int = 1
    offset: int = 0


def epoch_shard_order(num_shards: int, seed: int, epoch: int) -> List[int]:
    """A permutation of the shards, the same on every rank for (seed, epoch)."""
    order = list(range(num_shards))
    random.Random(f"shards-{seed}-{epoch}").shuffle(order)
    return order


def split_shards(num_shards: int, num_parts: int) -> List[List[ShardSlice]]:
    """Split shards over `num_parts` readers so that no sample is read twice per pass.

    With at least as many shards as readers, reader g reads shards g, g+P, g+2P, ...
    With fewer, reader g reads shard g % S and shares it with the other readers of that
    shard, taking every m-th sample (m = number of readers of the shard).
    """
    if num_shards >= num_parts:
        return [[ShardSlice(i) for i in range(g, num_shards, num_parts)] for g in range(num_parts)]
    parts = []
    for g in range(num_parts):
        shard = g % num_shards
        sharers = len(range(shard, num_parts, num_shards))
        parts.append([ShardSlice(shard, sharers, g // num_shards)])
    return parts


def worker_batch_plan(
    worker: int, num_workers: int, start: int, total: int
) -> Tuple[int, int, int]:
    """(role, skip, count) for one dataloader worker of an epoch of `total` batches that
    resumes at batch `start`.

    A DataLoader takes batches round-robin from its workers, so in an uninterrupted epoch
    batch i comes from worker i % W. Resuming at `start`, worker w plays the role
    r = (start + w) % W (so the round-robin continues with batch start, start+1, ...),
    first drops its role's `skip` batches before `start`, then yields `count` batches.
    """
    role = (start + worker) % num_workers
    skip = len(range(role, start, num_workers))
    count = len(range(role, total, num_workers)) - skip
    return role, skip, count


def balance(sizes: Sequence[int], num_bins: int) -> List[List[int]]:
    """Greedy balanced partition of items (largest first, into the least-loaded bin, ties
    to the lowest bin); deterministic, every rank computes the same. Returns item indices."""
    bins: List[List[int]] = [[] for _ in range(num_bins)]
    load = [0] * num_bins
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        b = min(range(num_bins), key=lambda b: (load[b], b))
        bins[b].append(i)
        load[b] += sizes[i]
    return [sorted(b) for b in bins]


@dataclass(frozen=True)
class ValPart:
    """What one validation reader reads: shards `shards` concatenated, keeping samples
    j % stride == offset of that stream; `num_samples` expected."""

    shards: Tuple[int, ...]
    stride: int
    offset: int
    num_samples: int


def plan_validation(
    num_shards: int, counts: Optional[Sequence[int]], total: int, num_ranks: int, num_workers: int
) -> List[List[ValPart]]:
    """parts[rank][worker]: every sample to exactly one reader.

    With per-shard counts (manifest), whole shards are balanced over ranks, then over the
    rank's workers. Without, reader g = rank * W + worker takes every G-th sample of all
    shards (each reader reads every shard: fine for validation-sized sets).
    """
    if counts is not None:
        plan = []
        for rank_shards in balance(counts, num_ranks):
            local = balance([counts[i] for i in rank_shards], num_workers)
            plan.append(
                [
                    ValPart(
                        tuple(rank_shards[j] for j in ws),
                        1,
                        0,
                        sum(counts[rank_shards[j]] for j in ws),
                    )
                    for ws in local
                ]
            )
        return plan
    g_all = num_ranks * num_workers
    return [
        [
            ValPart(
                tuple(range(num_shards)),
                g_all,
                r * num_workers + w,
                len(range(r * num_workers + w, total, g_all)),
            )
            for w in range(num_workers)
        ]
        for r in range(num_ranks)
    ]


def val_batches_per_rank(plan: List[List[ValPart]], batch_size: int) -> List[int]:
    """Batches each rank yields before padding (each worker batches its own samples)."""
    return [sum(math.ceil(p.num_samples / batch_size) for p in parts) for parts in plan]


# --------------------------------------------------------------------------- samples


class _Bad(Exception):
    """A sample that cannot be used: `kind` (e.g. "missing label") and a detail."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}{': ' + detail if detail else ''}")
        self.kind = kind


def decode_sample(
    sample: Dict[str, Any],
    transform: Callable,
    require_labels: bool,
    num_classes: Optional[int] = None,
    target: Optional[DenseTarget] = None,
) -> tuple:
    """(transformed image, label) of a raw sample, or with `target` (image, label, target)
    through a `DenseTransform`; raises _Bad for a corrupt one, or for a label outside
    0..num_classes-1 (when num_classes is given)."""
    ext = next((k for k in IMAGE_KEYS if k in sample), None)
    if ext is None:
        found = sorted(k for k in sample if not k.startswith("__"))
        raise _Bad("no image", f"expected one of .{'/.'.join(IMAGE_KEYS)}, found {found}")
    if getattr(transform, "encoded", False):  # data.decode=gpu: decoded later, on the device
        try:
            rgb = transform(sample[ext], ext)
        except ValueError as exc:
            raise _Bad("undecodable image", str(exc)) from None
    else:
        try:
            with Image.open(io.BytesIO(sample[ext])) as img:
                img.load()  # full decode: a truncated file fails here
                rgb = img.convert("RGB")
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt files
            raise _Bad("undecodable image", f".{ext}: {exc}") from None
    label = -1
    raw = sample.get("cls")
    try:
        label = int(raw.decode("ascii").strip()) if raw is not None else -1
    except (ValueError, UnicodeDecodeError, AttributeError):
        if require_labels:
            raise _Bad("bad label", f".cls={raw[:20]!r}") from None
    if require_labels and label < 0:
        raise _Bad("missing label", "no .cls member" if raw is None else f".cls={raw[:20]!r}")
    if num_classes and label >= num_classes:
        raise _Bad("label out of range", f"{label} is not a class of the {num_classes}-way head")
    if target is not None:
        mask = target.read(sample, rgb.size)
        try:
            image, dense = transform(rgb, mask)
        except Exception as exc:  # noqa: BLE001
            raise _Bad("transform failed", str(exc)) from None
        return image, label, target.tensor(dense)
    if getattr(transform, "encoded", False):
        return rgb, label
    try:
        return transform(rgb), label
    except Exception as exc:  # noqa: BLE001
        raise _Bad("transform failed", str(exc)) from None


@dataclass(frozen=True)
class DenseTarget:
    """Which dense target a stream yields: `kind` seg or depth; seg: `num_classes` (a label
    >= it other than 255 is a bad sample); depth: `scale`, metres per depth.png unit."""

    kind: str
    num_classes: int = 0
    scale: float = 1.0

    @classmethod
    def from_manifest(cls, dense: Optional[Dict[str, Any]], kind: str, where: str) -> DenseTarget:
        """The target `kind` as the manifest's "dense" section describes it; UserError
        naming `where` when the shards do not carry it."""
        info = (dense or {}).get(kind)
        if not isinstance(info, dict):
            raise UserError(
                f'{where}: the shards carry no {kind} targets (their manifest\'s "dense" '
                f"section has {sorted(dense or {})}); write them from a dense source "
                "(digit_scenes, ade20k:PATH, nyuv2:PATH)"
            )
        if kind == "seg":
            return cls(kind, num_classes=len(info["classes"]))
        return cls(kind, scale=float(info["scale"]))

    @property
    def fill(self) -> float:
        """The target value of padding rows (and of nothing): void or no depth."""
        return 255 if self.kind == "seg" else 0.0

    def read(self, sample: Dict[str, Any], size: Tuple[int, int]) -> Image.Image:
        """The sample's target PNG, checked against its image's (width, height); _Bad."""
        member = f"{self.kind}.png"
        if member not in sample:
            raise _Bad(f"no {self.kind} target", f"expected a .{member} member")
        try:
            with Image.open(io.BytesIO(sample[member])) as img:
                img.load()
                mask = img.copy()
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt files
            raise _Bad(f"undecodable {self.kind} target", str(exc)) from None
        if mask.size != size:
            raise _Bad(f"{self.kind} target size", f"{mask.size} differs from the image's {size}")
        if self.kind == "seg":
            labels = np.asarray(mask)
            bad = (labels >= self.num_classes) & (labels != 255)
            if bad.any():
                raise _Bad(
                    "label out of range",
                    f"seg label {int(labels[bad][0])} is not one of the {self.num_classes} classes",
                )
        return mask

    def tensor(self, mask: Image.Image) -> torch.Tensor:
        """seg: long class indices; depth: float32 metres."""
        arr = np.asarray(mask)
        if self.kind == "seg":
            return torch.from_numpy(arr.astype(np.int64))
        return torch.from_numpy(arr.astype(np.float32) * np.float32(self.scale))


class BadSampleCounter:
    """Counts one worker's samples read and skipped, warns (rate-limited) about skipped
    ones, and raises BadDataError past `max_fraction`. Totals go to `stats[2*slot:2*slot+2]`
    (shared memory read by the main process), added to what the slot held."""

    def __init__(self, max_fraction: float, stats=None, slot: int = 0):
        self.max_fraction, self.stats, self.slot = max_fraction, stats, slot
        self.seen = self.bad = self._suppressed = 0
        self.by_shard: Counter = Counter()
        self.by_kind: Counter = Counter()
        self._last_warn = -math.inf
        self._base = (stats[2 * slot], stats[2 * slot + 1]) if stats is not None else (0, 0)

    def record(self, url: str, key: Optional[str] = None, bad: Optional[_Bad] = None) -> None:
        """One sample read from `url`; `bad` set when it was skipped."""
        self.seen += 1
        if bad is not None:
            self.bad += 1
            self.by_shard[url] += 1
            self.by_kind[bad.kind] += 1
            self._warn(f"skipped sample {key} of {url}: {bad}")
        self._update(url)

    def shard_end(self, url: str, tar: TarSamples, expected: Optional[int], share=(1, 0)):
        """Shard `url` was read to its end: samples the manifest lists (`expected`) but the
        tar did not hold count as bad (only those of this reader's `share` (stride, offset)
        of the shard); without a count, a tar that broke off counts as one bad sample."""
        if expected is None:
            missing = 1 if tar.error else 0
            message = f"shard {url} broke off after {tar.count} samples: {tar.error}"
        else:
            stride, offset = share
            missing = len(range(offset, expected, stride)) - len(range(offset, tar.count, stride))
            message = f"shard {url}: {count_problem(expected, tar.count, tar.error)}"
        if missing <= 0:
            return
        self.seen, self.bad = self.seen + missing, self.bad + missing
        self.by_shard[url] += missing
        self.by_kind["missing from its shard"] += missing
        self._warn(f"{message}; {missing} samples counted as bad", always=True)
        self._update(url)

    def _update(self, url: str) -> None:
        """Publish the totals; BadDataError past the limit."""
        if self.stats is not None:
            self.stats[2 * self.slot] = self._base[0] + self.seen
            self.stats[2 * self.slot + 1] = self._base[1] + self.bad
        if (
            self.seen >= MIN_SEEN
            and self.bad >= MIN_BAD
            and self.bad > self.max_fraction * self.seen
        ):
            worst = ", ".join(f"{u} ({n})" for u, n in self.by_shard.most_common(5))
            kinds = ", ".join(f"{k}: {n}" for k, n in self.by_kind.most_common())
            raise BadDataError(
                f"{self.bad} of {self.seen} samples read by this worker are bad ({kinds}; "
                f"{self.bad / self.seen:.1%} > data.max_bad_fraction={self.max_fraction}); "
                f"stopped in shard {url}. Shards with bad samples: {worst}"
            )

    def _warn(self, message: str, always: bool = False) -> None:
        now = time.monotonic()
        if not always and self.bad > WARN_FIRST and now - self._last_warn < WARN_EVERY_S:
            self._suppressed += 1
            return
        more = (
            f"; {self._suppressed} more skipped since the last warning" if self._suppressed else ""
        )
        warnings.warn(
            f"{message} ({self.bad} skipped of {self.seen} read by this worker{more})",
            BadSampleWarning,
            stacklevel=3,
        )
        self._last_warn, self._suppressed = now, 0


def _shard_samples(
    url: str, counter: BadSampleCounter, expected: Optional[int] = None, share=(1, 0)
) -> Iterator[Dict[str, Any]]:
    """Samples of a shard, then its count checked against `expected` (`counter.shard_end`)."""
    tar = yield from shard_samples(url)
    counter.shard_end(url, tar, expected, share)


def validation_complete(missing: int, what: str) -> bool:
    """Whether a validation pass scored every sample (`missing`: the sum of its batches'
    "missing"); warns, saying `what` is not over the full set, when it did not."""
    if missing:
        warnings.warn(
            f"validation incomplete ({what} not over the full set): {missing} samples of the "
            "validation set were missing from their shards or skipped as bad (see the "
            "bad-sample warnings; `raptor shards verify DIR` checks the shards)",
            BadSampleWarning,
            stacklevel=2,
        )
    return not missing


def _collate(
    rows: List[tuple],
    size: int,
    shape: Tuple[int, ...],
    missing: int = 0,
    target: Optional[DenseTarget] = None,
) -> Dict[str, torch.Tensor]:
    """A batch of `size` rows: the samples ((image, label[, target]) each), then padding rows
    (zeros, label -1, valid False, target `target.fill`). With data.decode=gpu the images are
    JPEG bytes (uint8, one tensor each) and stay a list, padded with empty tensors."""
    pad = size - len(rows)
    images = [r[0] for r in rows]
    encoded = bool(images) and images[0].dtype == torch.uint8
    batch = {
        "image": images + [torch.empty(0, dtype=torch.uint8)] * pad
        if encoded
        else torch.stack(images + [torch.zeros(shape)] * pad),
        "label": torch.tensor([r[1] for r in rows] + [-1] * pad, dtype=torch.long),
        "valid": torch.tensor([True] * len(rows) + [False] * pad),
        "missing": torch.tensor(missing, dtype=torch.long),
    }
    if target is not None:
        dtype = torch.long if target.kind == "seg" else torch.float32
        filler = torch.full(tuple(shape[1:]), target.fill, dtype=dtype)
        batch["target"] = torch.stack([r[2] for r in rows] + [filler] * pad)
    return batch


def _worker() -> Tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


# --------------------------------------------------------------------------- datasets


class _ShardStream(IterableDataset):
    """Common state of the train and validation streams (set in the main process, copied
    into each worker when an epoch starts)."""

    def __init__(
        self,
        shards: ShardSet,
        transform: Callable,
        image_shape: Tuple[int, ...],
        batch_size: int,
        rank: int,
        world_size: int,
        num_workers: int,
        require_labels: bool,
        max_bad_fraction: float,
        stats=None,
        num_classes: Optional[int] = None,
        target: Optional[DenseTarget] = None,
    ):
        self.shards, self.transform, self.image_shape = shards, transform, tuple(image_shape)
        self.target = target
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers = max(1, num_workers)
        self.require_labels, self.max_bad_fraction, self.stats = (
            require_labels,
            max_bad_fraction,
            stats,
        )
        self.num_classes = num_classes

    def _expected(self, index: int) -> Optional[int]:
        """Samples the manifest lists for shard `index` (None without one)."""
        return None if self.shards.counts is None else self.shards.counts[index]

    def _counter(self, slot: int) -> BadSampleCounter:
        return BadSampleCounter(self.max_bad_fraction, self.stats, slot)

    def _decoded(self, samples: Iterator[Dict[str, Any]], counter: BadSampleCounter):
        """(image, label[, target]) of every good sample; bad ones are counted and dropped."""
        for s in samples:
            try:
                row = decode_sample(
                    s, self.transform, self.require_labels, self.num_classes, self.target
                )
            except _Bad as exc:
                counter.record(s.get("__url__", "?"), s.get("__key__"), exc)
                continue
            counter.record(s["__url__"])
            yield row


class TrainStream(_ShardStream):
    """Endless shuffled training samples, batched; each worker yields exactly its share of
    `num_batches` for the epoch (`epoch` and resume point `start` set before iterating)."""

    def __init__(self, *args, num_batches: int, seed: int, shuffle_buffer: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_batches, self.seed, self.shuffle_buffer = num_batches, seed, shuffle_buffer
        self.epoch, self.start = 0, 0

    def __iter__(self):
        worker, num_workers = _worker()
        role, skip, count = worker_batch_plan(worker, num_workers, self.start, self.num_batches)
        part, num_parts = self.rank * num_workers + role, self.world_size * num_workers
        order = epoch_shard_order(len(self.shards.urls), self.seed, self.epoch)
        slices = [
            replace(s, index=order[s.index]) for s in split_shards(len(order), num_parts)[part]
        ]
        rng = random.Random(f"samples-{self.seed}-{self.epoch}-{part}")
        if get_worker_info() is not None:  # augmentation randomness, reproducible on resume
            s = rng.getrandbits(63)
            torch.manual_seed(s)
            random.seed(s)
            np.random.seed(s % 2**32)
        counter = self._counter(role)
        samples = shuffled(self._repeat(slices, counter), self.shuffle_buffer, rng)
        return itertools.islice(self._batches(self._decoded(samples, counter)), skip, skip + count)

    def _repeat(self, slices: List[ShardSlice], counter: BadSampleCounter):
        """The reader's slices, read again and again."""
        while True:
            n = 0
            for sl in slices:
                url = self.shards.urls[sl.index]
                share = (sl.stride, sl.offset)
                samples = _shard_samples(url, counter, self._expected(sl.index), share)
                for i, sample in enumerate(samples):
                    if i % sl.stride == sl.offset:
                        n += 1
                        yield sample
            if n == 0:
                names = [self.shards.urls[sl.index] for sl in slices]
                raise ValueError(f"training reader got no samples from its shards {names}")

    def _batches(self, decoded):
        while True:
            rows = list(itertools.islice(decoded, self.batch_size))
            yield _collate(rows, len(rows), self.image_shape, target=self.target)


def shuffled(samples: Iterator, buffer_size: int, rng: random.Random) -> Iterator:
    """Shuffle a stream through a buffer of `buffer_size` items (yield a random one, put the
    next in its place; drain at the end). A size below 2 does not shuffle."""
    if buffer_size < 2:
        yield from samples
        return
    buf: List[Any] = []
    for s in samples:
        if len(buf) < buffer_size:
            buf.append(s)
            continue
        i = rng.randrange(buffer_size)
        buf[i], s = s, buf[i]
        yield s
    rng.shuffle(buf)
    yield from buf


class ValStream(_ShardStream):
    """Validation batches: every sample once across ranks, `num_batches` on every rank
    (padding rows/batches have valid=False)."""

    def __init__(self, *args, plan: List[List[ValPart]], **kwargs):
        super().__init__(*args, **kwargs)
        self.parts = plan[self.rank]
        per_rank = val_batches_per_rank(plan, self.batch_size)
        self.num_batches = max(per_rank)
        self.extra = self.num_batches - per_rank[self.rank]  # all-padding batches, from worker 0

    def __iter__(self):
        worker, _ = _worker()
        part = self.parts[worker]
        counter = self._counter(worker)
        planned = math.ceil(part.num_samples / self.batch_size) + (self.extra if worker == 0 else 0)
        stream = itertools.islice(self._read(part, counter), part.offset, None, part.stride)
        rows = self._decoded(self._checked(stream, part), counter)
        batches = iter(lambda: list(itertools.islice(rows, self.batch_size)), [])
        # each batch is held back until the next one is read, so that the last one (or the
        # first padding batch) can carry how many planned samples never arrived
        held, delivered, emitted = None, 0, 0
        for batch in batches:
            if held is not None:
                yield _collate(held, self.batch_size, self.image_shape, target=self.target)
            held, delivered, emitted = batch, delivered + len(batch), emitted + 1
        rest = ([held] if held is not None else []) + [[]] * (planned - emitted)
        for i, rows in enumerate(rest):
            missing = part.num_samples - delivered if i == 0 else 0
            yield _collate(rows, self.batch_size, self.image_shape, missing, self.target)

    def _read(self, part: ValPart, counter: BadSampleCounter):
        for i in part.shards:
            yield from _shard_samples(self.shards.urls[i], counter, self._expected(i))

    def _checked(self, stream, part: ValPart):
        for n, sample in enumerate(stream, 1):
            if n > part.num_samples:
                names = [self.shards.urls[i] for i in part.shards]
                raise UserError(
                    f"validation shards {names} hold more samples than expected ({part.num_samples}): "
                    f"the {MANIFEST} (or data.val_samples) does not match the shards"
                )
            yield sample


# --------------------------------------------------------------------------- loaders


class ShardLoader(DataLoader):
    """DataLoader over a Train/ValStream: len() is the batches per rank per epoch.

    `epoch` (set directly, or read from `epoch_source()` at each iteration, e.g. the
    trainer's current epoch) selects the shuffle; when no source gives it, it advances
    after each complete pass. `state_dict()` = {"epoch", "batches" consumed, ...}; after
    `load_state_dict` the next iteration of that epoch starts at the next batch.
    """

    def __init__(
        self,
        stream: _ShardStream,
        num_workers: int,
        epoch_source: Optional[Callable[[], Optional[int]]] = None,
        on_batch: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None,
    ):
        super().__init__(
            stream, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available()
        )
        # Lightning warns that an IterableDataset's len() may be wrong; ours is exact by
        # construction (every worker yields its planned share).
        warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
        self.stream, self.epoch_source, self.on_batch = stream, epoch_source, on_batch
        self.epoch, self.batches_consumed = 0, 0
        self._resume: Optional[Dict[str, int]] = None

    def __len__(self) -> int:
        return self.stream.num_batches

    def __iter__(self):
        source = self.epoch_source() if self.epoch_source is not None else None
        epoch = self.epoch if source is None else int(source)
        start = 0
        if self._resume is not None and self._resume["epoch"] == epoch:
            start = min(int(self._resume["batches"]), len(self))
        self._resume = None
        self.epoch, self.batches_consumed = epoch, start
        if isinstance(self.stream, TrainStream):
            self.stream.epoch, self.stream.start = epoch, start
        for batch in super().__iter__():
            self.batches_consumed += 1
            yield batch if self.on_batch is None else self.on_batch(batch)
        if source is None:  # not driven by a trainer: the next pass is the next epoch
            self.epoch, self.batches_consumed = epoch + 1, 0

    def _signature(self) -> Dict[str, int]:
        s = self.stream
        return {
            "world_size": s.world_size,
            "num_workers": s.num_workers,
            "batch_size": s.batch_size,
            "num_batches": s.num_batches,
            "seed": getattr(s, "seed", 0),
        }

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "batches": self.batches_consumed, **self._signature()}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        changed = {
            k: (state[k], v) for k, v in self._signature().items() if k in state and state[k] != v
        }
        if changed:
            warnings.warn(
                f"resuming the data stream with different settings {changed} (saved, now): "
                "the remaining batches of the epoch are skipped by count, not replayed exactly",
                stacklevel=2,
            )
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}
        self.epoch = int(state["epoch"])


# --------------------------------------------------------------------------- transforms


def resolve_transform_config(
    data_config: Optional[Dict[str, Any]], overrides: Any = None
) -> Dict[str, Any]:
    """timm's data config (input_size (3,H,W), interpolation, mean, std, crop_pct, crop_mode)
    with every key set in `overrides` (data.transform) replacing it; timm defaults without
    a teacher. `resize` (the shorter side before the center crop) is added when
    data.transform.resize is set."""
    from timm.data import resolve_data_config

    cfg = dict(data_config) if data_config else resolve_data_config(args={"input_size": None})
    get = (lambda k: getattr(overrides, k, None)) if overrides is not None else (lambda k: None)
    if get("input_size"):
        cfg["input_size"] = (3, int(get("input_size")), int(get("input_size")))
    for key in ("crop_pct", "interpolation", "resize"):
        if get(key) is not None:
            cfg[key] = get(key)
    for key in ("mean", "std"):
        if get(key) is not None:
            cfg[key] = tuple(float(v) for v in get(key))
    side = cfg["input_size"][-1]
    if cfg.get("resize") and (cfg["resize"] < side or cfg["input_size"][-2] != side):
        raise UserError(
            f"data.transform.resize={cfg['resize']} needs a square input_size of at most that "
            f"side, got {tuple(cfg['input_size'][1:])}"
        )
    return cfg


def resize_side(resolved: Dict[str, Any]) -> int:
    """The shorter side an evaluation transform resizes to before its center crop:
    `resize` when set, else timm's floor(input_size / crop_pct)."""
    from timm.data.constants import DEFAULT_CROP_PCT

    if resolved.get("resize"):
        return int(resolved["resize"])
    return math.floor(resolved["input_size"][-1] / (resolved.get("crop_pct") or DEFAULT_CROP_PCT))


class ResizeCenterCrop:
    """PIL image -> `raptor.data.shards.resize_center_crop` of it (a picklable transform)."""

    def __init__(self, resize: int, side: int, interpolation: str) -> None:
        self.resize, self.side, self.interpolation = resize, side, interpolation

    def __call__(self, img: Image.Image) -> Image.Image:
        return resize_center_crop(img, self.resize, self.side, self.interpolation)


def build_transform(resolved: Dict[str, Any], training: bool = False) -> Callable:
    """PIL RGB image -> normalized float (3, H, W). Evaluation with `resize` set: shorter
    side to `resize`, center crop input_size, ToTensor, Normalize (torchvision's Resize +
    CenterCrop arithmetic); otherwise timm's `create_transform` (training=True: timm's
    augmentation)."""
    from timm.data import create_transform
    from torchvision import transforms

    if resolved.get("resize") and not training:
        side = resolved["input_size"][-1]
        interpolation = resolved.get("interpolation") or "bicubic"
        return transforms.Compose(
            [
                ResizeCenterCrop(int(resolved["resize"]), side, interpolation),
                transforms.ToTensor(),
                transforms.Normalize(torch.tensor(resolved["mean"]), torch.tensor(resolved["std"])),
            ]
        )
    keys = ("input_size", "interpolation", "mean", "std") + (
        () if training else ("crop_pct", "crop_mode")
    )
    return create_transform(**{k: resolved[k] for k in keys if k in resolved}, is_training=training)


class DenseTransform:
    """(PIL RGB image, PIL target) -> (normalized float (3, H, W), the target through the same
    geometry): shorter side to `resize_side(resolved)` (the image with its interpolation, the
    target nearest), center crop input_size, no augmentation."""

    def __init__(self, resolved: Dict[str, Any]) -> None:
        self.resize, self.side = resize_side(resolved), int(resolved["input_size"][-1])
        self.interpolation = resolved.get("interpolation") or "bicubic"
        self.mean = torch.tensor(resolved["mean"]).view(-1, 1, 1)
        self.std = torch.tensor(resolved["std"]).view(-1, 1, 1)

    def __call__(self, img: Image.Image, mask: Image.Image) -> Tuple[torch.Tensor, Image.Image]:
        from torchvision.transforms.functional import to_tensor

        img = resize_center_crop(img, self.resize, self.side, self.interpolation)
        mask = resize_center_crop(mask, self.resize, self.side, "nearest")
        return (to_tensor(img) - self.mean) / self.std, mask


def check_stored_crop(shards: ShardSet, resolved: Dict[str, Any], split: str) -> None:
    """UserError when the shards hold crops stored by `raptor shards --crop SIDE` whose side
    is not the transform's resize side: the reader would resample the crop again (an
    upsampled or doubly resampled image, not the original's crop)."""
    want = resize_side(resolved)
    if shards.stored_crop is not None and int(shards.stored_crop) != want:
        raise UserError(
            f"the {split} shards store {shards.stored_crop}px center crops (raptor shards "
            f"--crop {shards.stored_crop}) but data.transform resizes to {want}px before its "
            f"{resolved['input_size'][-1]}px crop: rewrite them with --crop {want}, or read "
            "shards of the full images"
        )


# --------------------------------------------------------------------------- module


class ShardDataModule(L.LightningDataModule):
    """Train/val loaders over webdataset shards (see the module docstring).

    data_cfg: the `data` config section. data_config: timm's resolved data config of the
    teacher (overridden key by key by data_cfg.transform). num_classes: the classes of the
    head the labels feed (a label outside 0..num_classes-1 is a bad sample); None or 0: no
    head, labels unchecked. target: "seg" or "depth" for dense shards: batches carry that
    target (`DenseTransform`, no augmentation); None: images and labels only.
    """

    def __init__(
        self,
        data_cfg: Any,
        data_config: Optional[Dict[str, Any]] = None,
        num_classes: Optional[int] = None,
        target: Optional[str] = None,
        ranks: Optional[Tuple[int, int]] = None,
    ):
        super().__init__()
        self.cfg, self.num_classes, self.target = data_cfg, num_classes, target
        self.ranks = ranks  # (rank, world) to read as instead of the job's: (0, 1) reads all
        self.transform_config = resolve_transform_config(data_config, data_cfg.transform)
        self._shards: Dict[str, ShardSet] = {}
        self._counted: Dict[str, int] = {}
        workers = max(1, int(data_cfg.num_workers))
        self._stats = {
            split: multiprocessing.RawArray("q", 2 * workers) for split in ("train", "val")
        }

    # -- shards and sizes

    def shards(self, split: str) -> ShardSet:
        """The split's shards, from data.{split}_urls or else data.shards_dir."""
        if split not in self._shards:
            spec = str(self.cfg.get(f"{split}_urls") or self.cfg.shards_dir or "")
            if not spec:
                raise UserError(f"no {split} shards: set data.{split}_urls or data.shards_dir")
            shards = resolve_shards(spec, split, bool(self.cfg.allow_pipe))
            if not (split == "train" and self.cfg.transform.train_augment):
                check_stored_crop(shards, self.transform_config, split)
            self._shards[split] = shards
        return self._shards[split]

    def _total(self, split: str) -> int:
        """Samples of the split: data.train_samples (the epoch length) if set, else the
        manifest's count, else data.val_samples (validation), else counted by reading."""
        shards = self.shards(split)
        if split == "train" and self.cfg.train_samples:
            return int(self.cfg.train_samples)
        if shards.total is not None:
            return shards.total
        if split == "val" and self.cfg.val_samples:
            return int(self.cfg.val_samples)
        if split not in self._counted:
            warnings.warn(
                f"no {MANIFEST} lists the {split} shards: counting their samples by reading them "
                f"(set data.{split}_samples to skip this)",
                stacklevel=2,
            )
            self._counted[split] = count_samples(shards.urls)
        return self._counted[split]

    @property
    def batch_size(self) -> int:
        """Training images per batch on each rank (`data.batch_size`)."""
        return int(self.cfg.batch_size)

    @property
    def num_train_batches(self) -> int:
        """Training batches per rank per epoch: samples // (world size x batch size), >= 1."""
        world = self._rank_and_world()[1]
        return max(1, self._total("train") // (world * int(self.cfg.batch_size)))

    def _rank_and_world(self) -> Tuple[int, int]:
        return self.ranks or distributed.rank_and_world(self.trainer)

    def _stream_kwargs(self, split: str, batch_size: int) -> Dict[str, Any]:
        rank, world = self._rank_and_world()
        return dict(
            image_shape=tuple(self.transform_config["input_size"]),
            batch_size=batch_size,
            rank=rank,
            world_size=world,
            num_workers=int(self.cfg.num_workers),
            require_labels=bool(self.cfg.require_labels),
            max_bad_fraction=float(self.cfg.max_bad_fraction),
            stats=self._stats[split],
            num_classes=self.num_classes,
            target=self.dense_target(split),
        )

    def dense_target(self, split: str) -> Optional[DenseTarget]:
        """The split's DenseTarget (from its manifest) when the module reads a target."""
        if self.target is None:
            return None
        where = str(self.cfg.get(f"{split}_urls") or self.cfg.shards_dir)
        return DenseTarget.from_manifest(self.shards(split).dense, self.target, where)

    # -- loaders

    def train_dataloader(self) -> ShardLoader:
        shards = self.shards("train")
        kwargs = self._stream_kwargs("train", int(self.cfg.batch_size))
        readers = kwargs["world_size"] * max(1, kwargs["num_workers"])
        if len(shards.urls) < readers and kwargs["rank"] == 0:
            warnings.warn(
                f"{len(shards.urls)} training shards for {kwargs['world_size']} ranks x "
                f"{max(1, kwargs['num_workers'])} workers = {readers} readers: readers share shards "
                "and each reads the whole shard to keep its share of samples. It works, but for "
                "large runs write more, smaller shards (raptor shards --shard-size).",
                stacklevel=2,
            )
        train_aug = bool(self.cfg.transform.train_augment)
        stream = TrainStream(
            shards,
            self._transform(training=train_aug),
            **kwargs,
            num_batches=self.num_train_batches,
            seed=int(self.cfg.seed),
            shuffle_buffer=int(self.cfg.shuffle_buffer),
        )
        return ShardLoader(
            stream,
            int(self.cfg.num_workers),
            epoch_source=self._trainer_epoch,
            on_batch=self._device_decoder(),
        )

    def val_dataloader(self, split: str = "val") -> ShardLoader:
        """Every sample of `split` once, unaugmented (the probes read the train split so)."""
        shards = self.shards(split)
        kwargs = self._stream_kwargs(split, int(self.cfg.val_batch_size or self.cfg.batch_size))
        plan = plan_validation(
            len(shards.urls),
            shards.counts,
            self._total(split),
            kwargs["world_size"],
            max(1, kwargs["num_workers"]),
        )
        stream = ValStream(shards, self._transform(), **kwargs, plan=plan)
        return ShardLoader(stream, int(self.cfg.num_workers), on_batch=self._device_decoder())

    def _transform(self, training: bool = False) -> Callable:
        """The workers' transform: `build_transform`, `DenseTransform` for dense shards, or
        with data.decode=gpu the encoded JPEG bytes passed on (`raptor.data.device_decode`)."""
        if self.cfg.get("decode", "cpu") == "gpu":
            from raptor.data.device_decode import EncodedJpeg

            if training:
                raise UserError(
                    "data.decode=gpu applies the evaluation transform only: set "
                    "data.decode=cpu for data.transform.train_augment=true"
                )
            if self.target is not None:
                raise UserError(
                    f"data.decode=gpu decodes images only, not {self.target} targets: "
                    "set data.decode=cpu for dense shards"
                )
            return EncodedJpeg()
        if self.target is not None:
            return DenseTransform(self.transform_config)
        return build_transform(self.transform_config, training=training)

    def _device_decoder(self) -> Optional[Callable]:
        """data.decode=gpu: decodes each batch in the main process, on the current device."""
        if self.cfg.get("decode", "cpu") != "gpu":
            return None
        from raptor.data.device_decode import DeviceDecoder

        return DeviceDecoder(self.transform_config, resize_side(self.transform_config))

    def _trainer_epoch(self) -> Optional[int]:
        return self.trainer.current_epoch if self.trainer is not None else None

    def skip_stats(self) -> Dict[str, Dict[str, int]]:
        """{"train"|"val": {"read": n, "skipped": k}}: samples read and skipped on this rank
        since the module was made (all epochs and evaluations, all workers); samples a
        manifest lists but a shard did not hold count in both."""
        return {
            split: {"read": int(sum(a[0::2])), "skipped": int(sum(a[1::2]))}
            for split, a in self._stats.items()
        }
