"""Dense-prediction sources for `raptor shards`: generated digit scenes, ADE20k and NYUv2 folders.

A dense sample carries, beside its image, a segmentation mask and/or a depth map. Each source
returns `(classes, splits, dense)`: `splits[split]` lists items `(key, label, source, image,
targets)` (label -1: no image-level class; `targets` maps "seg"/"depth" to an array or a file,
see `raptor.data.shards.encode_target`), and `dense` is the manifest's description of the
targets: `{"seg": {"classes": [...], "ignore_index": 255}, "depth": {"scale": metres per
depth.png unit, "max": metres}}`.

- `digit_scenes` (generated, offline): `scene_digits` of scikit-learn's 8x8 digits on a black
  `scene_size`-pixel canvas (a multiple of 8) cut into 8x8 cells, each digit as an opaque
  tile (its ink on black) at its native scale on its own random cell (cells are reused when
  there are more digits than cells). Native scale, native grid, black: a backbone trained
  on the 8x8 digits (the demo teacher) decodes digits there and not scaled, off its grid
  or at another canvas size (its position embedding resampled): by hand, a linear probe on
  its final layer beat a random teacher's by 0.21 vs 0.05 mIoU on the default 8-px canvas
  of 2 digits, but only 0.14 vs 0.11 on a 16-px canvas (and no better depth), and a grey
  canvas (tile edges visible) did worse than a random teacher. A digit's depth is tied to its class,
  NEAR + (FAR - NEAR) x class / 9 metres plus uniform noise of +-JITTER, so depth is
  decodable from what the digit is and from nothing else in the image. The depth sets the
  drawing: half the digits are shifted by SHIFT pixels (a patch of the demo teacher) up,
  down, left or right (the tile cut at the canvas edge), and tiles are drawn far to near,
  so a nearer digit hides what it overlaps (on one cell, all but a strip of the other).
  Every visible pixel of a digit's tile is labelled with its class (0..9) and has its
  depth; the rest is class 10 `background` (its own class, not void) at the depth of a
  wall, WALL metres. Train scenes use only the digits of the train split of the digits
  (`val_fraction`, `seed`), val scenes only the others.
- `ade20k:PATH` (ADEChallengeData2016 layout): `images/{training,validation}/NAME.jpg` and
  `annotations/{training,validation}/NAME.png` (the splits train / val). The annotations'
  label 0 ("other objects") is void and labels 1..150 become 0..149 (the reduce-zero-label
  convention of mmsegmentation and DINOv2's ADE20k probe), applied when writing: `seg.png`
  holds 0..149 and 255. Class names from `objectInfo150.csv` (ADE's, last column) when the
  folder has it, else "1".."150".
- `nyuv2:PATH`: `{train,val}/rgb/NAME.{jpg,png}` with `{train,val}/depth/NAME.png`, a 16-bit
  single-channel PNG in millimetres (0: no depth), as the BTS / DINOv2 NYUv2 splits store
  it; copied unchanged (scale 0.001 m per unit, max 10 m).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
from PIL import Image

VOID = 255  # the ignore index of segmentation masks
CELL = 8  # digit scenes: the digits' native side and the canvas grid's cell (px)
NEAR, FAR, JITTER, WALL = 0.8, 1.25, 0.02, 1.5  # digit depths by class, noise; wall (m)
SHIFT = 2  # px a digit may be shifted off its cell (a patch of the demo teacher)
SCENE_DEPTH_SCALE = 1e-3  # metres per depth.png unit (millimetres, as NYUv2)
NYU_DEPTH_SCALE, NYU_MAX_DEPTH = 1e-3, 10.0
ADE_NUM_CLASSES = 150
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

Sources = Tuple[List[str], Dict[str, List[tuple]], Dict[str, Any]]


def compose_scene(
    digits: List[np.ndarray],
    labels: List[int],
    depths: List[float],
    corners: List[tuple],
    size: int,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scene: (image uint8 (S, S), seg uint8 (S, S), depth float64 metres (S, S)) from 8x8
    uint8 digits, their classes, depths and top-left corners, drawn far to near, cut at the
    canvas edge (the rules in the module doc)."""
    image = np.zeros((size, size), dtype=np.uint8)
    seg = np.full((size, size), 10, dtype=np.uint8)
    depth = np.full((size, size), WALL)
    for i in sorted(range(len(digits)), key=lambda i: -depths[i]):
        y, x = corners[i]
        top, left = max(y, 0), max(x, 0)
        win = (slice(top, min(y + CELL, size)), slice(left, min(x + CELL, size)))
        tile = digits[i][top - y : top - y + CELL, left - x : left - x + CELL]
        image[win] = tile[: win[0].stop - top, : win[1].stop - left]
        seg[win], depth[win] = labels[i], depths[i]
    return image, seg, depth


def class_depth(label: int, rng: np.random.Generator) -> float:
    """A digit's depth in metres: its class's, NEAR..FAR, plus uniform noise of +-JITTER."""
    return NEAR + (FAR - NEAR) * label / 9 + rng.uniform(-JITTER, JITTER)


def scene_corners(cells: List[int], size: int, rng: np.random.Generator) -> List[tuple]:
    """Top-left corners of digits in grid `cells` (row-major), half of them shifted by SHIFT
    pixels in one of the 4 directions (the tile is cut at the canvas edge)."""
    per_row, corners = size // CELL, []
    for cell in cells:
        y, x = CELL * (cell // per_row), CELL * (cell % per_row)
        if rng.random() < 0.5:
            dy, dx = ((-SHIFT, 0), (SHIFT, 0), (0, -SHIFT), (0, SHIFT))[rng.integers(4)]
            y, x = y + dy, x + dx
        corners.append((y, x))
    return corners


def digit_scenes_source(
    num_scenes: int, size: int, per_scene: int, val_fraction: float, seed: int
) -> Sources:
    """The generated scenes (module doc): round(num_scenes x val_fraction) val scenes."""
    from raptor.data.shards import _split_indices, digits_pixels

    if size < CELL or size % CELL:
        raise ValueError(f"scene size must be a multiple of {CELL} pixels, got {size}")
    cells = (size // CELL) ** 2
    if num_scenes < 1 or per_scene < 1:
        raise ValueError(f"need >= 1 scene of >= 1 digit, got {num_scenes} of {per_scene}")
    images, labels = digits_pixels()
    train_idx, val_idx = _split_indices(len(images), val_fraction, seed)
    n_val = int(round(num_scenes * val_fraction))
    rng = np.random.default_rng(seed + 1)
    splits: Dict[str, List[tuple]] = {}
    for split, pool, count in (
        ("train", train_idx, num_scenes - n_val),
        ("val", val_idx, n_val),
    ):
        items = []
        for n in range(count):
            pick = rng.choice(pool, size=per_scene)
            classes = [int(labels[i]) for i in pick]
            depths = [class_depth(c, rng) for c in classes]
            order = np.resize(rng.permutation(cells), per_scene)  # cells reused past `cells` digits
            corners = scene_corners(order.tolist(), size, rng)
            image, seg, depth = compose_scene(
                [images[i] for i in pick], classes, depths, corners, size
            )
            depth_units = np.round(depth / SCENE_DEPTH_SCALE).astype(np.uint16)
            key = f"scene_{split}_{n:06d}"
            items.append(
                (key, -1, f"digit_scenes[{split}][{n}]", image, {"seg": seg, "depth": depth_units})
            )
        if items:
            splits[split] = items
    dense = {
        "seg": {"classes": [str(c) for c in range(10)] + ["background"], "ignore_index": VOID},
        "depth": {"scale": SCENE_DEPTH_SCALE, "max": WALL},
    }
    return [], splits, dense


def _pairs(images: Path, targets: Path, target_suffix: str) -> List[Tuple[Path, Path]]:
    """(image, target) files with the same stem; ValueError naming an image without one."""
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    pairs, missing = [], []
    for f in files:
        t = targets / (f.stem + target_suffix)
        (pairs.append((f, t)) if t.is_file() else missing.append(f.name))
    if missing:
        raise ValueError(
            f"{images}: {len(missing)} images have no {targets / ('NAME' + target_suffix)} "
            f"(first: {missing[0]})"
        )
    return pairs


def _folder_splits(
    pairs: Dict[str, List[Tuple[Path, Path]]], kind: str, seed: int
) -> Dict[str, List[tuple]]:
    """Shuffled items (`seed`) of each split, the target file under `kind`."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, found in pairs.items():
        order = rng.permutation(len(found))
        splits[split] = [
            (f"{split}_{n:08d}", -1, str(found[i][0]), found[i][0], {kind: found[i][1]})
            for n, i in enumerate(order)
        ]
    return splits


def ade20k_source(root: Path, seed: int) -> Sources:
    """ADEChallengeData2016-style folders (module doc)."""
    split_dirs = {"train": "training", "val": "validation"}
    pairs = {
        split: _pairs(root / "images" / d, root / "annotations" / d, ".png")
        for split, d in split_dirs.items()
        if (root / "images" / d).is_dir()
    }
    if not pairs:
        raise FileNotFoundError(
            f"{root}: expected images/training and/or images/validation with annotations/ beside "
            "(the ADEChallengeData2016 layout)"
        )
    names = [str(c) for c in range(1, ADE_NUM_CLASSES + 1)]
    info = root / "objectInfo150.csv"
    if info.is_file():
        with open(info, newline="") as fh:
            rows = list(csv.reader(fh))[1:]
        names = [row[-1].split(";")[0] for row in rows][:ADE_NUM_CLASSES]
    dense = {"seg": {"classes": names, "ignore_index": VOID, "reduce_zero_label": True}}
    return [], _folder_splits(pairs, "seg", seed), dense


def nyuv2_source(root: Path, seed: int) -> Sources:
    """{train,val}/rgb + {train,val}/depth folders (module doc)."""
    pairs = {
        split: _pairs(root / split / "rgb", root / split / "depth", ".png")
        for split in ("train", "val")
        if (root / split / "rgb").is_dir()
    }
    if not pairs:
        raise FileNotFoundError(
            f"{root}: expected train/rgb and/or val/rgb with depth/ beside (16-bit PNG depth in mm)"
        )
    dense = {"depth": {"scale": NYU_DEPTH_SCALE, "max": NYU_MAX_DEPTH}}
    return [], _folder_splits(pairs, "depth", seed), dense


def read_target(kind: str, payload: Any, size: Tuple[int, int]) -> bytes:
    """A target as the PNG bytes stored beside the image (`{key}.{kind}.png`).

    seg: an array (uint8 labels, VOID = 255) stored as a palette PNG; a file is an ADE20k
    annotation, reduced (0 -> 255, v -> v - 1, labels past the classes -> 255). depth: a uint16
    array or a 16-bit PNG file, stored unchanged. ValueError when the target is not of that
    kind or its size differs from the image's (width, height) `size`."""
    import io

    if isinstance(payload, Path):
        with Image.open(payload) as img:
            img.load()
            arr = np.asarray(img)
            mode = img.mode
        if kind == "seg":
            if arr.ndim != 2 or arr.dtype != np.uint8:
                raise ValueError(f"{payload}: expected a single-channel 8-bit label PNG ({mode})")
            arr = arr.astype(np.int64) - 1
            arr = np.where((arr < 0) | (arr >= ADE_NUM_CLASSES), VOID, arr).astype(np.uint8)
        elif arr.ndim != 2 or mode not in ("I;16", "I;16B", "I"):
            raise ValueError(f"{payload}: expected a 16-bit single-channel depth PNG, got {mode}")
        payload = arr.astype(np.uint16) if kind == "depth" else arr
    if tuple(payload.shape[::-1]) != tuple(size):
        raise ValueError(f"{kind} target is {payload.shape[::-1]}, the image is {tuple(size)}")
    if kind == "seg":
        img = Image.fromarray(payload.astype(np.uint8), mode="P")
        img.putpalette(_palette())
    else:
        img = Image.fromarray(payload.astype(np.uint16))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _palette() -> List[int]:
    """256 RGB colours for viewing masks (a fixed pseudo-random palette, void black)."""
    rng = np.random.default_rng(0)
    pal = rng.integers(0, 256, size=(256, 3))
    pal[VOID] = 0
    return pal.astype(int).ravel().tolist()
