"""Preprocessing against torchvision pipelines written here: the reference's resize 256 ->
center crop 224 (load time and stored crops), and timm's default path unchanged."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from raptor.config import load_config
from raptor.data.shards import write_shards
from raptor.data.stream import ShardDataModule, build_transform, resolve_transform_config
from raptor.errors import UserError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
REFERENCE = [
    "data.transform.resize=256",
    "data.transform.input_size=224",
    "data.transform.interpolation=bicubic",
    f"data.transform.mean=[{','.join(map(str, MEAN))}]",
    f"data.transform.std=[{','.join(map(str, STD))}]",
    "data.num_workers=0",
]
# (width, height, format): non-square, both orientations, odd offsets, one smaller than 224
SIZES = [(301, 257, "JPEG"), (260, 397, "PNG"), (513, 341, "JPEG"), (180, 123, "PNG")]


def torchvision_reference(img: Image.Image) -> torch.Tensor:
    """The reference's eval preprocessing, written with torchvision's v2 transforms."""
    return v2.Compose(
        [
            v2.Resize(256, interpolation=InterpolationMode.BICUBIC),
            v2.CenterCrop(224),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )(img)


def jpeg95(img: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """One class folder per image (label = index in SIZES); smooth gradients plus noise."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    images = []
    for i, (w, h, fmt) in enumerate(SIZES):
        y, x = np.mgrid[0:h, 0:w]
        arr = np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], -1).astype(np.int64)
        arr = np.clip(arr + rng.integers(-40, 40, arr.shape), 0, 255).astype(np.uint8)
        folder = root / f"c{i}"
        folder.mkdir()
        path = folder / f"img.{'jpg' if fmt == 'JPEG' else 'png'}"
        Image.fromarray(arr).save(path, format=fmt, quality=90)
        images.append(Image.open(path).convert("RGB"))
    return root, images


def val_images(shards_dir, overrides) -> dict:
    """{label: image tensor} of the shards' 'train' split, read by the project's val loader."""
    cfg = load_config(None, REFERENCE + [f"data.val_urls={shards_dir}"] + overrides).data
    dm = ShardDataModule(cfg)
    dm.shards("val")
    batches = list(dm.val_dataloader())
    valid = torch.cat([b["valid"] for b in batches])
    images = torch.cat([b["image"] for b in batches])[valid]
    labels = torch.cat([b["label"] for b in batches])[valid]
    return dict(zip(labels.tolist(), images))


def _as_val(root, out, crop=None):
    """Shards of the image folder with the one split renamed 'val' in the manifest."""
    import json

    manifest = write_shards(f"imagefolder:{root}", out, crop=crop, progress=False)
    manifest["splits"]["val"] = manifest["splits"].pop("train")
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_load_time_resize_256_crop_224_matches_torchvision(image_folder, tmp_path):
    root, images = image_folder
    got = val_images(_as_val(root, tmp_path / "full"), [])
    assert sorted(got) == list(range(len(SIZES)))
    for label, img in enumerate(images):
        want = torchvision_reference(img)
        assert got[label].shape == want.shape == (3, 224, 224)
        torch.testing.assert_close(got[label], want, rtol=0, atol=1e-6)


def test_stored_crops_match_torchvision_up_to_their_jpeg(image_folder, tmp_path):
    """`raptor shards --crop 256` stores the shorter side resized to 256 and its central
    square; read with the reference transform they give torchvision's 224 crop of the
    original, JPEG-encoded as the shards store it."""
    root, images = image_folder
    got = val_images(_as_val(root, tmp_path / "crops", crop=256), [])
    for label, img in enumerate(images):
        square = v2.CenterCrop(256)(v2.Resize(256, interpolation=InterpolationMode.BICUBIC)(img))
        want = torchvision_reference(jpeg95(square))
        torch.testing.assert_close(got[label], want, rtol=0, atol=1e-6)
    # a crop side that is not the transform's resize side is refused, naming both
    _as_val(root, tmp_path / "c224", crop=224)
    with pytest.raises(UserError, match="store 224px center crops .* resizes to 256px"):
        val_images(tmp_path / "c224", [])


def test_default_path_is_timms_transform_bit_for_bit(digits_shards):
    """resize unset: timm's create_transform with the same keys, as before (the demo's
    digits config)."""
    from timm.data import create_transform

    cfg = load_config("configs/demo.yaml", []).data.transform
    assert cfg.resize is None
    resolved = resolve_transform_config(None, cfg)
    ours = build_transform(resolved)
    timms = create_transform(
        input_size=(3, 8, 8),
        interpolation="bilinear",
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        crop_pct=1.0,
        crop_mode="center",
    )
    rng = np.random.default_rng(1)
    for shape in [(8, 8, 3), (11, 8, 3), (8, 13, 3)]:
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        assert torch.equal(ours(img), timms(img))


def test_resize_smaller_than_the_crop_is_refused():
    cfg = load_config(None, ["data.transform.resize=200", "data.transform.input_size=224"])
    with pytest.raises(UserError, match="resize=200 needs a square input_size of at most"):
        resolve_transform_config(None, cfg.data.transform)
