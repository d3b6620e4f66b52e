"""Write webdataset shards (`raptor shards`) from scikit-learn's digits or an image folder.

Layout of the output folder::

    train-000000.tar  train-000001.tar ...  val-000000.tar ...  manifest.json

Each tar member is `{key}.{png|jpg}` (the image) and `{key}.cls` (the label as an
ASCII integer); labels index `manifest["classes"]`. Samples are shuffled with
`seed` before writing, so a shard never holds a single class. Tars are written
deterministically (fixed mtime/owner), so the same inputs give the same sha256.

Sources:

- `digits`: the 1797 bundled 8x8 images (values 0..16 scaled to 0..255 uint8,
  grayscale PNG), split into train/val with `val_fraction` and `seed`.
- `imagefolder:PATH`: class sub-folders, labels by sorted class name (the union
  over splits). If PATH holds `train/` and `val/` those are the splits, otherwise
  PATH is one split named `train`. JPEG and PNG files are stored as they are,
  other formats re-encoded as PNG; an unreadable image is skipped, counted and
  named in the manifest.

`crop=SIDE` stores a fixed preprocessing instead of the original image: resize the
shorter side to SIDE (bicubic), center-crop SIDE x SIDE, convert to RGB, JPEG
quality 95. Readers with a center-crop transform then decode small files.

`manifest.json`::

    {"format": "raptor-shards/1", "source": ..., "options": {...},
     "classes": [...],
     "splits": {"train": {"num_samples": N,
                          "shards": [{"name": "train-000000.tar", "num_samples": n,
                                      "sha256": "..."}, ...]}, ...},
     "skipped": {"count": k, "paths": [...]}}
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import os
import sys
import tarfile
from multiprocessing import Pool
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
from PIL import Image
from tqdm import tqdm

MANIFEST = "manifest.json"
FORMAT = "raptor-shards/1"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
JPEG_QUALITY = 95

# One sample to encode: (key, label, source, payload); payload is uint8 pixels (an
# ndarray) or the image file's Path (picklable, for the encoding pool); `source` names
# it in the skipped list.
Item = Tuple[str, int, str, Union[np.ndarray, Path]]


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


# --------------------------------------------------------------------------- sources


def _split_indices(n: int, val_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Shuffled train and val index arrays; val gets round(n * val_fraction) items."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return perm[n_val:], perm[:n_val]


def digits_pixels() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 images (1797, 8, 8) in 0..255 and labels (1797,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def digits_source(val_fraction: float, seed: int) -> Tuple[List[str], Dict[str, List[Item]]]:
    """Classes '0'..'9' and the train/val items; keys are `digits_{index:04d}` (sklearn order)."""
    images, labels = digits_pixels()
    train, val = _split_indices(len(images), val_fraction, seed)
    splits = {}
    for split, idx in (("train", train), ("val", val)):
        if len(idx):
            splits[split] = [
                (f"digits_{i:04d}", int(labels[i]), f"digits[{i}]", images[i]) for i in idx
            ]
    return [str(c) for c in range(10)], splits


def imagefolder_source(root: Path, seed: int) -> Tuple[List[str], Dict[str, List[Item]]]:
    """Class folders under `root` (or under root/train and root/val)."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    if (root / "train").is_dir() and (root / "val").is_dir():
        split_dirs = {"train": root / "train", "val": root / "val"}
    else:
        split_dirs = {"train": root}
    class_dirs = {s: sorted(p for p in d.iterdir() if p.is_dir()) for s, d in split_dirs.items()}
    classes = sorted({p.name for dirs in class_dirs.values() for p in dirs})
    if not classes:
        raise ValueError(f"{root}: expected one sub-folder per class, found none")
    label_of = {c: i for i, c in enumerate(classes)}
    rng = np.random.default_rng(seed)
    splits = {}
    for split, dirs in class_dirs.items():
        files = [
            (f, label_of[d.name])
            for d in dirs
            for f in sorted(d.rglob("*"))
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
        ]
        order = rng.permutation(len(files))
        splits[split] = [
            (f"{split}_{n:08d}", files[i][1], str(files[i][0]), files[i][0])
            for n, i in enumerate(order)
        ]
    return classes, splits


# --------------------------------------------------------------------------- encoding


def center_crop(img: Image.Image, side: int) -> Image.Image:
    """Resize the shorter side to `side` (bicubic), then center-crop side x side."""
    w, h = img.size
    scale = side / min(w, h)
    w2, h2 = max(side, round(w * scale)), max(side, round(h * scale))
    img = img.resize((w2, h2), Image.BICUBIC)
    left, top = (w2 - side) // 2, (h2 - side) // 2
    return img.crop((left, top, left + side, top + side))


def encode(item: Item, crop: Optional[int]) -> Tuple[str, int, str, Optional[str], Optional[bytes]]:
    """(key, label, source, ext, data); ext/data are None when the image cannot be read."""
    key, label, source, payload = item
    try:
        raw = payload.read_bytes() if isinstance(payload, Path) else None
        img = Image.fromarray(payload) if raw is None else Image.open(io.BytesIO(raw))
        img.load()  # full decode: truncated or corrupt files fail here
        if crop is not None:
            buf = io.BytesIO()
            center_crop(img.convert("RGB"), crop).save(buf, format="JPEG", quality=JPEG_QUALITY)
            return key, label, source, "jpg", buf.getvalue()
        if raw is not None and img.format in ("JPEG", "PNG"):
            return key, label, source, "jpg" if img.format == "JPEG" else "png", raw
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return key, label, source, "png", buf.getvalue()
    except Exception:  # noqa: BLE001 - any unreadable image is skipped and reported
        return key, label, source, None, None


def _encode_star(args):
    return encode(*args)


# --------------------------------------------------------------------------- writing


class _ShardWriter:
    """Writes `{split}-NNNNNN.tar` files of at most `shard_size` samples, recording
    each shard's name, sample count and sha256."""

    def __init__(self, out: Path, split: str, shard_size: int):
        self.out, self.split, self.shard_size = out, split, shard_size
        self.shards: List[dict] = []
        self._tar: Optional[tarfile.TarFile] = None
        self._count = 0

    def add(self, key: str, ext: str, data: bytes, label: int) -> None:
        if self._tar is None or self._count == self.shard_size:
            self._close()
            name = shard_name(self.split, len(self.shards))
            self._tmp = self.out / (name + ".tmp")
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
            self.shards.append({"name": name, "num_samples": 0, "sha256": ""})
            self._count = 0
        for suffix, payload in ((ext, data), ("cls", str(label).encode("ascii"))):
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode = len(payload), 0, 0o644
            info.uname = info.gname = "raptor"
            self._tar.addfile(info, io.BytesIO(payload))
        self._count += 1
        self.shards[-1]["num_samples"] = self._count

    def _close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        final = self.out / self.shards[-1]["name"]
        os.replace(self._tmp, final)
        self.shards[-1]["sha256"] = sha256_file(final)
        self._tar = None

    def finish(self) -> dict:
        self._close()
        return {"num_samples": sum(s["num_samples"] for s in self.shards), "shards": self.shards}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Create `out`; refuse a non-empty folder unless `overwrite`, which removes only
    earlier shards (`*.tar`, `*.tar.tmp`) and the manifest, never other files."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"--out {out} is not empty; choose an empty folder or pass --overwrite "
                "(which replaces its shards and manifest.json)"
            )
        for p in out.iterdir():
            if p.is_file() and (p.name == MANIFEST or p.name.endswith((".tar", ".tar.tmp"))):
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def write_shards(
    source: str,
    out: str | Path,
    shard_size: int = 1000,
    val_fraction: float = 0.2,
    seed: int = 0,
    crop: Optional[int] = None,
    overwrite: bool = False,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Write the shards of `source` ("digits" or "imagefolder:PATH") into `out`.

    Returns the manifest (also written to out/manifest.json, last, so its presence
    marks a complete folder). `workers` > 1 decodes/encodes images in a process pool.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if crop is not None and crop < 1:
        raise ValueError(f"crop must be a positive side in pixels, got {crop}")
    if source == "digits":
        classes, splits = digits_source(val_fraction, seed)
    elif source.startswith("imagefolder:"):
        classes, splits = imagefolder_source(Path(source.split(":", 1)[1]).expanduser(), seed)
    else:
        raise ValueError(f"unknown source '{source}'; expected 'digits' or 'imagefolder:PATH'")
    out = Path(out)
    _prepare_out(out, overwrite)

    manifest_splits, skipped = {}, []
    total = sum(len(items) for items in splits.values())
    with tqdm(total=total, desc=f"shards -> {out}", unit="img", disable=not progress) as bar:
        for split, items in splits.items():
            writer = _ShardWriter(out, split, shard_size)
            for key, label, src, ext, data in _encoded(items, crop, workers):
                bar.update(1)
                if data is None:
                    skipped.append(src)
                else:
                    writer.add(key, ext, data, label)
            manifest_splits[split] = writer.finish()

    manifest = {
        "format": FORMAT,
        "source": source,
        "options": {
            "shard_size": shard_size,
            "val_fraction": val_fraction,
            "seed": seed,
            "crop": crop,
        },
        "classes": classes,
        "splits": manifest_splits,
        "skipped": {"count": len(skipped), "paths": skipped},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def _encoded(items: List[Item], crop: Optional[int], workers: int) -> Iterable[tuple]:
    if workers <= 1:
        yield from (encode(item, crop) for item in items)
        return
    pool = Pool(workers)
    try:
        yield from pool.imap(_encode_star, ((item, crop) for item in items), chunksize=64)
    finally:
        pool.terminate()


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a local shard folder (FileNotFoundError naming it if absent)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {MANIFEST}; write shards with `raptor shards` first")
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, help="digits | imagefolder:PATH")
    parser.add_argument(
        "--out", required=True, help="output folder (must be empty unless --overwrite)"
    )
    parser.add_argument(
        "--shard-size", type=int, default=1000, help="samples per shard (default 1000)"
    )
    parser.add_argument(
        "--val-fraction", type=float, default=0.2, help="digits: validation fraction"
    )
    parser.add_argument("--seed", type=int, default=0, help="split and shuffle seed")
    parser.add_argument(
        "--crop",
        type=int,
        default=None,
        metavar="SIDE",
        help="store resize(shorter side=SIDE, bicubic) + center crop SIDE x SIDE as JPEG q95",
    )
    parser.add_argument("--workers", type=int, default=1, help="encoding processes")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace shards in a non-empty --out"
    )


def main(args: argparse.Namespace) -> int:
    try:
        manifest = write_shards(
            args.source,
            args.out,
            shard_size=args.shard_size,
            val_fraction=args.val_fraction,
            seed=args.seed,
            crop=args.crop,
            overwrite=args.overwrite,
            workers=args.workers,
        )
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"raptor shards: {exc}", file=sys.stderr)
        return 2
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['num_samples']} samples in {len(info['shards'])} shards")
    print(f"classes: {len(manifest['classes'])}; manifest: {Path(args.out) / MANIFEST}")
    skipped = manifest["skipped"]
    if skipped["count"]:
        print(f"skipped {skipped['count']} unreadable images:", file=sys.stderr)
        for path in skipped["paths"]:
            print(f"  {path}", file=sys.stderr)
    return 0


def ensure_shards(cfg: Any, default_dir: str | Path) -> Any:
    """For data.source digits or imagefolder:PATH, write the shards into data.shards_dir
    (default `default_dir`) unless a complete folder (manifest.json) is there; returns a
    copy of cfg that reads them (data.source=shards). cfg is a RaptorConfig."""
    source = cfg.data.source
    if source == "shards":
        return cfg
    out = Path(cfg.data.shards_dir or default_dir)
    if not (out / MANIFEST).is_file():
        d = cfg.data
        write_shards(
            source,
            out,
            shard_size=d.shard_size,
            val_fraction=d.val_fraction,
            seed=d.split_seed,
            crop=d.store_crop,
        )
    cfg = copy.deepcopy(cfg)
    cfg.data.source, cfg.data.shards_dir = "shards", str(out)
    return cfg
