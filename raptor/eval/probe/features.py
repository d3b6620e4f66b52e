"""The probes' feature cache: one model's features of one layer and split on disk, written
while the images stream and read back chunk by chunk, so memory holds one chunk however
large the split (ImageNet's [cls ; mean(patch)] of a ViT-B layer is about 4 GB in float16).

A cache is a folder of `chunk-NNNNN.safetensors` files, each holding `x` (rows, ...) in
float16 (or float32) and `y` (rows, ...) the targets in their own dtype, and `cache.json` (written last:
the cache is complete) with its `key`, row count and chunk list. `FeatureCache.open(folder,
key)` returns the cache when it is complete and made with the same key (model weights,
layer, data, task: `cache_key`), else None; `CacheWriter` (or `FeatureCache.write`)
replaces whatever the folder held.
`peak_rows` counts the most feature rows one FeatureCache held in memory at once.
With several ranks each writes the rows it read into `part-RANK/` (a cache of its own)
and `join_parts` then writes the folder's cache.json over all of them, in rank order.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

CACHE_FILE = "cache.json"
FORMAT = 1  # bump when the layout changes: old caches are rebuilt
FEATURE_DTYPE = torch.float16
CHUNK_BYTES = 64 << 20  # feature bytes per chunk (default chunk_rows)


def cache_key(parts: Dict[str, Any]) -> str:
    """A hash of the JSON-able `parts` the features depend on (and the cache format)."""
    text = json.dumps({"format": FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def tensors_digest(tensors: Dict[str, Tensor]) -> str:
    """sha256 of named tensors' names, dtypes, shapes and bytes (a model's weights)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class FeatureCache:
    """One split's cached features (see the module docstring)."""

    def __init__(self, folder: str | Path, meta: Dict[str, Any]):
        self.folder = Path(folder)
        self.meta = meta
        self.peak_rows = 0

    @property
    def rows(self) -> int:
        return int(self.meta["rows"])

    @property
    def feature_shape(self) -> Tuple[int, ...]:
        return tuple(self.meta["feature_shape"])

    @classmethod
    def open(cls, folder: str | Path, key: str) -> Optional[FeatureCache]:
        """The complete cache in `folder` made with `key`, or None."""
        path = Path(folder) / CACHE_FILE
        if not path.is_file():
            return None
        meta = json.loads(path.read_text())
        return cls(folder, meta) if meta.get("key") == key else None

    @classmethod
    def write(
        cls,
        folder: str | Path,
        key: str,
        batches: Iterable[Tuple[Tensor, Tensor]],
        chunk_rows: Optional[int] = None,
    ) -> FeatureCache:
        """Stream (features, targets) batches into `folder`; returns the cache."""
        writer = CacheWriter(folder, key, chunk_rows)
        for x, y in batches:
            writer.add(x, y)
        return writer.close()

    def chunks(self, shuffle: Optional[random.Random] = None) -> Iterator[Tuple[Tensor, Tensor]]:
        """(features float32, targets) one chunk at a time; with `shuffle`, chunks in a
        random order and the rows of each shuffled."""
        from safetensors.torch import load_file

        order = list(self.meta["chunks"])
        if shuffle is not None:
            shuffle.shuffle(order)
        for chunk in order:
            data = load_file(str(self.folder / chunk["file"]))
            x, y = data["x"].float(), data["y"]
            self.peak_rows = max(self.peak_rows, x.shape[0])
            if shuffle is not None:
                perm = torch.randperm(
                    x.shape[0], generator=torch.Generator().manual_seed(shuffle.randrange(2**31))
                )
                x, y = x[perm], y[perm]
            yield x, y

    def batches(
        self, batch_size: int, shuffle: Optional[random.Random] = None
    ) -> Iterator[Tuple[Tensor, Tensor]]:
        """(features, targets) batches of at most `batch_size` rows, chunk by chunk."""
        for x, y in self.chunks(shuffle):
            for i in range(0, x.shape[0], batch_size):
                yield x[i : i + batch_size], y[i : i + batch_size]


class CacheWriter:
    """Writes a FeatureCache batch by batch: `add(features, targets)`, then `close()`.
    `folder` is emptied first; features are stored as `dtype` (float16; float32 to keep
    them exact); rows go to disk in chunks of `chunk_rows` (default: CHUNK_BYTES of
    features) as soon as that many are held."""

    def __init__(
        self,
        folder: str | Path,
        key: str,
        chunk_rows: Optional[int] = None,
        dtype: torch.dtype = FEATURE_DTYPE,
    ):
        self.folder, self.key, self.chunk_rows, self.dtype = Path(folder), key, chunk_rows, dtype
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        self.cache = FeatureCache(self.folder, {})
        self.chunks: List[Dict[str, Any]] = []
        self.xs: List[Tensor] = []
        self.ys: List[Tensor] = []
        self.held = 0
        self.shape: Optional[Tuple[int, ...]] = None

    def add(self, x: Tensor, y: Tensor) -> None:
        if self.shape is None:
            self.shape = tuple(x.shape[1:])
            if self.chunk_rows is None:
                per_row = max(1, x[0].numel() * torch.finfo(self.dtype).bits // 8)
                self.chunk_rows = max(1, CHUNK_BYTES // per_row)
        self.xs.append(x.detach().to("cpu", self.dtype))
        self.ys.append(y.detach().cpu())
        self.held += x.shape[0]
        self.cache.peak_rows = max(self.cache.peak_rows, self.held)
        while self.held >= self.chunk_rows:
            self._flush(self.chunk_rows)

    def _flush(self, rows: int) -> None:
        from safetensors.torch import save_file

        x, y = torch.cat(self.xs), torch.cat(self.ys)
        name = f"chunk-{len(self.chunks):05d}.safetensors"
        save_file({"x": x[:rows].contiguous(), "y": y[:rows].contiguous()}, str(self.folder / name))
        self.chunks.append({"file": name, "rows": rows})
        self.xs, self.ys = ([x[rows:]], [y[rows:]]) if rows < x.shape[0] else ([], [])
        self.held = x.shape[0] - rows

    def close(self) -> FeatureCache:
        """Write the last chunk and cache.json (the cache is complete); returns it."""
        if self.held:
            self._flush(self.held)
        self.cache.meta = {
            "key": self.key,
            "rows": sum(c["rows"] for c in self.chunks),
            "feature_shape": list(self.shape or ()),
            "chunks": self.chunks,
        }
        (self.folder / CACHE_FILE).write_text(json.dumps(self.cache.meta, indent=1))
        return self.cache


def part_folder(folder: str | Path, rank: int) -> Path:
    """Where rank `rank` writes its part of the cache in `folder`."""
    return Path(folder) / f"part-{rank}"


def join_parts(folder: str | Path, key: str, world: int) -> FeatureCache:
    """The cache in `folder` over the complete parts of ranks 0..world-1 (each written
    with `key`): its cache.json lists their chunks by relative path, in rank order."""
    parts = [FeatureCache.open(part_folder(folder, r), key) for r in range(world)]
    missing = [r for r, part in enumerate(parts) if part is None]
    if missing:
        raise RuntimeError(f"{folder}: ranks {missing} left no complete part of the cache")
    shapes = {tuple(p.feature_shape) for p in parts if p.rows}
    meta = {
        "key": key,
        "rows": sum(p.rows for p in parts),
        "feature_shape": list(next(iter(shapes), ())),
        "chunks": [
            {**c, "file": f"{part_folder('', r)}/{c['file']}"}
            for r, p in enumerate(parts)
            for c in p.meta["chunks"]
        ],
    }
    (Path(folder) / CACHE_FILE).write_text(json.dumps(meta, indent=1))
    return FeatureCache(folder, meta)
