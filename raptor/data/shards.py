"""Write webdataset shards (`raptor shards`) from scikit-learn's digits or an image folder.

Layout of the output folder::

    train-000000.tar  train-000001.tar ...  val-000000.tar ...  manifest.json

Each tar member is `{key}.{png|jpg}` (the image) and `{key}.cls` (the label as an
ASCII integer); labels index `manifest["classes"]`. Dense sources (`raptor.data.dense`)
store no label but `{key}.seg.png` (a palette PNG of class indices, 255 void) and/or
`{key}.depth.png` (a 16-bit PNG; metres = value x `manifest["dense"]["depth"]["scale"]`,
0 = no depth) beside the image, of the image's size; the manifest's `dense` section
describes them (`raptor.data.dense`). Samples are shuffled with
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
- `digit_scenes`, `ade20k:PATH`, `nyuv2:PATH`: dense sources (`raptor.data.dense`); a
  sample whose target is unreadable or not of its image's size is skipped like an
  unreadable image. `crop` is refused for them.

`crop=SIDE` stores a fixed preprocessing instead of the original image: resize the
shorter side to SIDE (bicubic), center-crop SIDE x SIDE, convert to RGB, JPEG
quality 95. Readers with a center-crop transform then decode small files. SIDE must be
the transform's resize side (`data.transform.resize`, else input_size / crop_pct): the
reader's resize is then the identity and its center crop gives the original image's
crop up to JPEG loss (the reader refuses other sides). For the reference's 256 -> 224
preprocessing store `--crop 256`.

`manifest.json`::

    {"format": "raptor-shards/1", "source": ..., "options": {...},
     "classes": [...],
     "splits": {"train": {"num_samples": N,
                          "shards": [{"name": "train-000000.tar", "num_samples": n,
                                      "sha256": "..."}, ...]}, ...},
     "skipped": {"count": k, "paths": [...]},
     "dense": {"seg": {"classes": [...], "ignore_index": 255},
               "depth": {"scale": 0.001, "max": 10.0}}}       (dense sources only)

`raptor shards verify DIR` reads every shard of DIR's manifest once and checks its
sha256 and sample count (and that the tar ends properly); exit 0 when all are good,
1 naming each bad shard, 2 when the manifest is missing or unreadable.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import re
import tarfile
from multiprocessing import Pool
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from raptor.errors import UserError

MANIFEST = "manifest.json"
FORMAT = "raptor-shards/1"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
JPEG_QUALITY = 95
SCENE_DEFAULTS = {"count": 2000, "size": 8, "digits": 2}  # digit_scenes (raptor.data.dense)

# One sample to encode: (key, label, source, payload[, targets]); payload is uint8 pixels
# (an ndarray) or the image file's Path (picklable, for the encoding pool); `source` names
# it in the skipped list; dense items add {"seg"|"depth": array or Path} (`encode`).
Item = Tuple[Any, ...]
DENSE_PREFIXES = ("ade20k:", "nyuv2:")


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


PIL_FILTERS = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
    "lanczos": Image.LANCZOS,
}


def resize_center_crop(
    img: Image.Image, resize: int, side: int, interpolation: str = "bicubic"
) -> Image.Image:
    """Resize the shorter side to `resize` (the longer one to int(resize * long / short),
    PIL's antialiased `interpolation`), then center-crop side x side with the top-left corner
    at round((size - side) / 2): torchvision's Resize(resize) + CenterCrop(side) on PIL
    images. Needs resize >= side."""
    if resize < side:
        raise ValueError(f"resize ({resize}) must be >= the crop side ({side})")
    w, h = img.size
    short, long = min(w, h), max(w, h)
    new_long = int(resize * long / short)
    w2, h2 = (resize, new_long) if w <= h else (new_long, resize)
    img = img.resize((w2, h2), PIL_FILTERS[interpolation])
    left, top = int(round((w2 - side) / 2.0)), int(round((h2 - side) / 2.0))
    return img.crop((left, top, left + side, top + side))


def center_crop(img: Image.Image, side: int) -> Image.Image:
    """The stored crop of `raptor shards --crop SIDE`: shorter side resized to `side`
    (bicubic), then the central side x side square."""
    return resize_center_crop(img, side, side, "bicubic")


def encode(item: Item, crop: Optional[int]) -> tuple:
    """(key, label, source, ext, data, extra); ext/data are None when the image (or a dense
    target) cannot be read; extra maps member suffixes ("seg.png", "depth.png") to bytes."""
    from raptor.data.dense import read_target

    key, label, source, payload = item[:4]
    targets = item[4] if len(item) > 4 else {}
    try:
        raw = payload.read_bytes() if isinstance(payload, Path) else None
        img = Image.fromarray(payload) if raw is None else Image.open(io.BytesIO(raw))
        img.load()  # full decode: truncated or corrupt files fail here
        extra = {f"{k}.png": read_target(k, t, img.size) for k, t in targets.items()}
        if crop is not None:
            buf = io.BytesIO()
            center_crop(img.convert("RGB"), crop).save(buf, format="JPEG", quality=JPEG_QUALITY)
            return key, label, source, "jpg", buf.getvalue(), extra
        if raw is not None and img.format in ("JPEG", "PNG"):
            return key, label, source, "jpg" if img.format == "JPEG" else "png", raw, extra
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return key, label, source, "png", buf.getvalue(), extra
    except Exception:  # noqa: BLE001 - any unreadable image is skipped and reported
        return key, label, source, None, None, {}


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

    def add(self, key: str, ext: str, data: bytes, label: int, extra: Dict[str, bytes]) -> None:
        """One sample: the image, its label (none when < 0) and `extra` members."""
        if self._tar is None or self._count == self.shard_size:
            self._close()
            name = shard_name(self.split, len(self.shards))
            self._tmp = self.out / (name + ".tmp")
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
            self.shards.append({"name": name, "num_samples": 0, "sha256": ""})
            self._count = 0
        members = [(ext, data)] + ([("cls", str(label).encode("ascii"))] if label >= 0 else [])
        for suffix, payload in members + sorted(extra.items()):
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
    scenes: Optional[Dict[str, int]] = None,
) -> dict:
    """Write the shards of `source` ("digits", "imagefolder:PATH", "digit_scenes",
    "ade20k:PATH", "nyuv2:PATH") into `out`. `scenes`: digit_scenes' {"count", "size",
    "digits"} (default 2000 scenes of 2 digits on 16 px).

    Returns the manifest (also written to out/manifest.json, last, so its presence
    marks a complete folder). `workers` > 1 decodes/encodes images in a process pool.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if crop is not None and crop < 1:
        raise ValueError(f"crop must be a positive side in pixels, got {crop}")
    from raptor.data import dense as dense_sources

    dense = None
    root = Path(source.split(":", 1)[-1]).expanduser()
    if crop is not None and (source == "digit_scenes" or source.startswith(DENSE_PREFIXES)):
        raise ValueError(f"crop is for classification sources; {source} stores masks or depth")
    scenes = {**SCENE_DEFAULTS, **(scenes or {})}
    if source == "digits":
        classes, splits = digits_source(val_fraction, seed)
    elif source.startswith("imagefolder:"):
        classes, splits = imagefolder_source(root, seed)
    elif source == "digit_scenes":
        classes, splits, dense = dense_sources.digit_scenes_source(
            scenes["count"], scenes["size"], scenes["digits"], val_fraction, seed
        )
    elif source.startswith("ade20k:"):
        classes, splits, dense = dense_sources.ade20k_source(root, seed)
    elif source.startswith("nyuv2:"):
        classes, splits, dense = dense_sources.nyuv2_source(root, seed)
    else:
        raise ValueError(
            f"unknown source '{source}'; expected digits, imagefolder:PATH, digit_scenes, "
            "ade20k:PATH or nyuv2:PATH"
        )
    out = Path(out)
    _prepare_out(out, overwrite)

    manifest_splits, skipped = {}, []
    total = sum(len(items) for items in splits.values())
    with tqdm(total=total, desc=f"shards -> {out}", unit="img", disable=not progress) as bar:
        for split, items in splits.items():
            writer = _ShardWriter(out, split, shard_size)
            for key, label, src, ext, data, extra in _encoded(items, crop, workers):
                bar.update(1)
                if data is None:
                    skipped.append(src)
                else:
                    writer.add(key, ext, data, label, extra)
            manifest_splits[split] = writer.finish()

    manifest = {
        "format": FORMAT,
        "source": source,
        "options": {
            "shard_size": shard_size,
            "val_fraction": val_fraction,
            "seed": seed,
            "crop": crop,
            **({"scenes": scenes} if source == "digit_scenes" else {}),
        },
        "classes": classes,
        "splits": manifest_splits,
        "skipped": {"count": len(skipped), "paths": skipped},
        **({"dense": dense} if dense else {}),
    }
    tmp = out / (MANIFEST + ".tmp")  # renamed into place: a reader never sees half of it
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
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
    """The manifest of a local shard folder; UserError naming the file when it is absent,
    unreadable or malformed."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder}: no {MANIFEST}; write shards with `raptor shards` first")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the shard manifest: {exc}") from None
    return parse_manifest(text, str(path))


def parse_manifest(text: str, where: str) -> dict:
    """The manifest in `text` (JSON), checked for what readers use: `splits`, each with
    `shards` [{"name", "num_samples" >= 0, optional "sha256"}]. UserError names `where`."""
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{where}: not valid JSON ({exc}); rewrite it with `raptor shards`"
        ) from None
    splits = manifest.get("splits") if isinstance(manifest, dict) else None
    if not isinstance(splits, dict):
        raise UserError(
            f'{where}: expected a JSON object with "splits" {{split: {{"shards": [...]}}}}'
        )
    for split, info in splits.items():
        shards = info.get("shards") if isinstance(info, dict) else None
        if not isinstance(shards, list):
            raise UserError(f'{where}: split "{split}" has no "shards" list')
        for i, s in enumerate(shards):
            n = s.get("num_samples") if isinstance(s, dict) else None
            if not (
                isinstance(s, dict)
                and isinstance(s.get("name"), str)
                and isinstance(n, int)
                and not isinstance(n, bool)
                and n >= 0
            ):
                raise UserError(
                    f'{where}: split "{split}" shard {i} is {s!r}; expected '
                    '{"name": FILE, "num_samples": N >= 0, "sha256": HEX}'
                )
    return manifest


# --------------------------------------------------------------------------- reading


class _EndTrackingTarInfo(tarfile.TarInfo):
    """Records on the TarFile (`raptor_end`) the header error that ended its iteration:
    tarfile stops silently on an empty, truncated or corrupt header after the first
    member, exactly as on the end-of-archive marker."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as exc:
            tar.raptor_end = exc
            raise


_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, skipped


def _end_problem(tar: tarfile.TarFile) -> Optional[str]:
    """Why a tar whose iteration ended is incomplete, or None if it ended on its marker."""
    end = getattr(tar, "raptor_end", None)
    if isinstance(end, tarfile.EOFHeaderError):
        return None
    if isinstance(end, tarfile.EmptyHeaderError):
        return f"the tar stops at byte {tar.offset} without its end-of-archive marker (cut there)"
    if isinstance(end, tarfile.TruncatedHeaderError):
        return f"the tar is cut inside the member header at byte {tar.offset}"
    return f"bad member header at byte {tar.offset} ({end})"


class TarSamples:
    """The samples of one tar stream, read once in order: iterate for dicts {"__key__",
    "__url__", ext: bytes} (members grouped by key as webdataset does). Afterwards
    `count` is how many samples it yielded and `error` why the tar broke off early
    (truncated or corrupt: the samples before the break were yielded), None when it
    ended on its end-of-archive marker. Costs nothing per sample beyond reading."""

    def __init__(self, stream, url: str):
        self.stream, self.url = stream, url
        self.count, self.error = 0, None

    def __iter__(self):
        from webdataset.tariterators import group_by_keys

        try:
            for sample in group_by_keys(self._files()):
                self.count += 1
                yield sample
        except ValueError as exc:  # duplicate member names: the shard is not a webdataset
            self.error = str(exc)

    def _files(self):
        try:
            tar = tarfile.open(fileobj=self.stream, mode="r|*", tarinfo=_EndTrackingTarInfo)
            for info in tar:
                if info.isreg() and not _META.match(info.name):
                    try:
                        data = tar.extractfile(info).read()
                    except tarfile.ReadError as exc:
                        raise tarfile.ReadError(
                            f"the tar is cut inside member {info.name} ({exc})"
                        ) from None
                    yield {"fname": info.name, "data": data, "__url__": self.url}
                tar.members = []  # stream mode: keep no member list
            self.error = _end_problem(tar)
        except (tarfile.TarError, OSError, EOFError) as exc:  # zlib.error is a TarError here
            self.error = f"unreadable tar: {exc}"


def count_problem(expected: int, read: int, error: Optional[str]) -> Optional[str]:
    """What differs between a shard as read and its manifest entry (None: nothing)."""
    parts = [f"expected {expected} samples (manifest), read {read}"] if read != expected else []
    return "; ".join(parts + ([error] if error else [])) or None


class _HashingReader:
    """A binary file that feeds what is read through sha256."""

    def __init__(self, fh, bar=None):
        self.fh, self.bar, self.sha = fh, bar, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.sha.update(data)
        if self.bar is not None:
            self.bar.update(len(data))
        return data


def check_shard(path: Path, expected: int, sha256: Optional[str], bar=None) -> Optional[str]:
    """What is wrong with one shard file (None: its samples, tar end and sha256 match the
    manifest). Reads the file once: sha256 and the tar walk share the bytes."""
    if not path.is_file():
        return "missing"
    try:
        with open(path, "rb") as fh:
            reader = _HashingReader(fh, bar)
            tar = TarSamples(reader, str(path))
            read = sum(1 for _ in tar)
            while reader.read(1 << 20):  # the rest (end marker, padding) for the checksum
                pass
    except OSError as exc:
        return f"unreadable: {exc}"
    problems = [count_problem(expected, read, tar.error)]
    digest = reader.sha.hexdigest()
    if sha256 and digest != sha256:
        problems.append(f"sha256 {digest} differs from the manifest's {sha256}")
    return "; ".join(p for p in problems if p) or None


def verify_shards(
    folder: str | Path, progress: Optional[bool] = None
) -> List[Tuple[str, str, Optional[str]]]:
    """(split, shard name, problem or None) for every shard listed in folder's manifest.
    `progress`: a byte progress bar (None: only on a terminal)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    listed = [(split, s) for split, info in manifest["splits"].items() for s in info["shards"]]
    size = sum(
        (folder / s["name"]).stat().st_size for _, s in listed if (folder / s["name"]).is_file()
    )
    results = []
    with tqdm(
        total=size,
        desc=f"verify {folder}",
        unit="B",
        unit_scale=True,
        disable=None if progress is None else not progress,
    ) as bar:
        for split, s in listed:
            problem = check_shard(folder / s["name"], s["num_samples"], s.get("sha256"), bar)
            results.append((split, s["name"], problem))
    return results


def ensure_shards(cfg: Any, default_dir: str | Path, overwrite: bool = False) -> Any:
    """For data.source other than `shards` (digits, imagefolder:PATH, digit_scenes,
    ade20k:PATH, nyuv2:PATH), write the shards into data.shards_dir
    (default `default_dir`) unless a complete folder (manifest.json) is there; returns a
    copy of cfg that reads them (data.source=shards). cfg is a RaptorConfig. `overwrite`:
    an incomplete folder may hold other files (its earlier shards are replaced).

    In a job of several ranks started by torchrun or srun (every rank runs this before
    any process group exists) rank 0 writes and the others wait for its manifest."""
    from raptor import distributed

    source = cfg.data.source
    if source == "shards":
        return cfg
    out = Path(cfg.data.shards_dir or default_dir)
    rank = distributed.global_rank()
    if not (out / MANIFEST).is_file() and rank != 0:
        _wait_for(out / MANIFEST, f"rank {rank}: waiting for rank 0")
    elif not (out / MANIFEST).is_file():
        d = cfg.data
        write_shards(
            source,
            out,
            shard_size=d.shard_size,
            val_fraction=d.val_fraction,
            seed=d.split_seed,
            crop=d.store_crop,
            overwrite=overwrite,
            scenes={"count": d.scene_count, "size": d.scene_size, "digits": d.scene_digits},
        )
    cfg = copy.deepcopy(cfg)
    cfg.data.source, cfg.data.shards_dir = "shards", str(out)
    return cfg


def _wait_for(path: Path, who: str, poll_s: float = 1.0) -> None:
    """Block until `path` exists, saying once on stderr what is awaited (no timeout: a
    launcher stops the waiting ranks when rank 0 fails)."""
    import sys
    import time

    print(f"{who} to write {path}", file=sys.stderr, flush=True)
    while not path.is_file():
        time.sleep(poll_s)
