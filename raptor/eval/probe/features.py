"""The probes' feature cache: one model's features of one layer and split on disk, written
while the images stream and read back chunk by chunk, so memory holds one chunk however
large the split (ImageNet's [cls ; mean(patch)] of a ViT-B layer is about 4 GB in float16).

A cache is a folder of `chunk-NNNNN.safetensors` files, each holding `x` (rows, ...) in
float16 and `y` (rows, ...) the targets in their own dtype, and `cache.json` (written last:
the cache is complete) with its `key`, row count and chunk list. `FeatureCache.open(folder,
key)` returns the cache when it is complete and made with the same key (model weights,
layer, data, task: `cache_key`), else None; `write` replaces whatever the folder held.
`peak_rows` counts the most feature rows one FeatureCache held in memory at once.
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
        """Stream (features, targets) batches into `folder` (emptied first) in chunks of
        `chunk_rows` rows (default: CHUNK_BYTES of float16 features); returns the cache."""
        from safetensors.torch import save_file

        folder = Path(folder)
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        cache = cls(folder, {})
        chunks: List[Dict[str, Any]] = []
        xs: List[Tensor] = []
        ys: List[Tensor] = []
        held = 0
        shape: Optional[Tuple[int, ...]] = None

        def flush(upto: Optional[int]) -> None:
            nonlocal xs, ys, held
            x, y = torch.cat(xs), torch.cat(ys)
            n = x.shape[0] if upto is None else upto
            name = f"chunk-{len(chunks):05d}.safetensors"
            save_file({"x": x[:n].contiguous(), "y": y[:n].contiguous()}, str(folder / name))
            chunks.append({"file": name, "rows": n})
            xs, ys = ([x[n:]], [y[n:]]) if n < x.shape[0] else ([], [])
            held = x.shape[0] - n

        for x, y in batches:
            if shape is None:
                shape = tuple(x.shape[1:])
                if chunk_rows is None:
                    per_row = max(1, x[0].numel() * torch.finfo(FEATURE_DTYPE).bits // 8)
                    chunk_rows = max(1, CHUNK_BYTES // per_row)
            xs.append(x.detach().to("cpu", FEATURE_DTYPE))
            ys.append(y.detach().cpu())
            held += x.shape[0]
            cache.peak_rows = max(cache.peak_rows, held)
            while held >= chunk_rows:
                flush(chunk_rows)
        if held:
            flush(None)
        cache.meta = {
            "key": key,
            "rows": sum(c["rows"] for c in chunks),
            "feature_shape": list(shape or ()),
            "chunks": chunks,
        }
        (folder / CACHE_FILE).write_text(json.dumps(cache.meta, indent=1))
        return cache

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
