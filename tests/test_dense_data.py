"""Dense shards: generated digit scenes, ADE20k / NYUv2 folders, streamed targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from raptor.config import load_config
from raptor.data import dense
from raptor.data.shards import read_manifest, verify_shards, write_shards
from raptor.data.stream import ShardDataModule


def _val_targets(folder, kind, side, **transform):
    """Every (image, target) row of the val split, streamed in order."""
    keys = {"input_size": side, "crop_pct": 1.0, "interpolation": "bilinear"}
    keys.update(transform)
    overrides = [f"data.transform.{k}={v}" for k, v in keys.items()]
    overrides += [
        "data.transform.mean=[0,0,0]",
        "data.transform.std=[1,1,1]",
        f"data.shards_dir={folder}",
        "data.num_workers=0",
        "data.batch_size=4",
    ]
    dm = ShardDataModule(load_config(None, overrides).data, target=kind)
    images, targets = [], []
    for batch in dm.val_dataloader():
        images.append(batch["image"][batch["valid"]])
        targets.append(batch["target"][batch["valid"]])
    return torch.cat(images), torch.cat(targets), dm


def test_a_scene_draws_native_tiles_far_to_near_cut_at_the_canvas_edge():
    rng = np.random.default_rng(0)
    digits = [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(3)]
    labels, depths = [3, 7, 5], [1.0, 0.8, 1.2]
    corners = [(0, 0), (2, 6), (-2, 10)]  # 7 nearest, overlaps 3; 5 sticks out of the canvas
    image, seg, depth = dense.compose_scene(digits, labels, depths, corners, 16)
    for y in range(16):  # per pixel: the nearest tile covering it, else the black wall
        for x in range(16):
            covering = [
                i for i, (cy, cx) in enumerate(corners) if 0 <= y - cy < 8 and 0 <= x - cx < 8
            ]
            if not covering:
                assert (image[y, x], seg[y, x], depth[y, x]) == (0, 10, dense.WALL)
                continue
            i = min(covering, key=lambda i: depths[i])
            want = (digits[i][y - corners[i][0], x - corners[i][1]], labels[i], depths[i])
            assert (image[y, x], seg[y, x], depth[y, x]) == want


def test_digit_scenes_tie_depth_to_the_class_and_hide_the_farther_digit():
    _, splits, manifest = dense.digit_scenes_source(40, 8, 2, 0.25, 0)
    assert manifest["depth"]["max"] == dense.WALL and len(splits["val"]) == 10
    strips = 0
    for *_, targets in splits["train"] + splits["val"]:
        seg, metres = targets["seg"], targets["depth"] * dense.SCENE_DEPTH_SCALE
        for c in np.unique(seg[seg < 10]):
            centre = dense.NEAR + (dense.FAR - dense.NEAR) * c / 9
            assert np.abs(metres[seg == c] - centre).max() <= dense.JITTER + 1e-3
        shown = [c for c in np.unique(seg) if c < 10]
        # one 8-px cell: the nearer digit covers at least 6 of the 8 columns or rows
        near = min(shown, key=lambda c: metres[seg == c].min())
        assert (seg == near).sum() >= 6 * 8
        strips += len(shown) == 2
    assert strips > 0  # some scenes show a strip of the farther digit beside the nearer one


def test_digit_scenes_shards_stream_the_generated_masks_and_depths(tmp_path):
    out = tmp_path / "scenes"
    scenes = {"count": 20, "size": 16, "digits": 2}
    manifest = write_shards(
        "digit_scenes", out, shard_size=3, seed=1, scenes=scenes, progress=False
    )
    assert {s: i["num_samples"] for s, i in manifest["splits"].items()} == {"train": 16, "val": 4}
    assert read_manifest(out)["dense"]["seg"]["classes"][10] == "background"
    assert all(problem is None for _, _, problem in verify_shards(out, progress=False))
    _, splits, _ = dense.digit_scenes_source(20, 16, 2, 0.2, 1)
    val = splits["val"]
    _, seg, _ = _val_targets(out, "seg", 16)
    images, depth, _ = _val_targets(out, "depth", 16)
    assert torch.equal(seg, torch.tensor(np.stack([item[4]["seg"] for item in val])).long())
    want = np.stack([item[4]["depth"] for item in val]).astype(np.float32) * np.float32(1e-3)
    assert torch.allclose(depth, torch.from_numpy(want))
    assert torch.allclose(images[:, 0] * 255, torch.tensor(np.stack([i[3] for i in val])).float())


def _ade_folder(root, rng):
    """Fake ADEChallengeData2016: 3 training + 2 validation 16x16 JPEGs, label PNGs with
    0 (void), 1..150 and 160 (past the classes); one training pair of mismatched sizes."""
    annotations = {}
    for split, n in (("training", 3), ("validation", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / "images" / split / f"ADE_{i}.jpg")
            ann = rng.choice(np.array([0, 1, 2, 150, 160], dtype=np.uint8), size=(16, 16))
            Image.fromarray(ann).save(root / "annotations" / split / f"ADE_{i}.png")
            annotations[(split, i)] = ann
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(
        root / "annotations" / "training" / "ADE_0.png"
    )
    return annotations


def test_ade20k_folder_reduces_zero_label_and_masks_are_resized_nearest(tmp_path):
    root = tmp_path / "ade"
    annotations = _ade_folder(root, np.random.default_rng(0))
    manifest = write_shards(f"ade20k:{root}", tmp_path / "shards", shard_size=2, progress=False)
    assert manifest["splits"]["train"]["num_samples"] == 2  # the mismatched pair is skipped
    assert manifest["skipped"]["paths"] == [str(root / "images" / "training" / "ADE_0.jpg")]
    assert len(manifest["dense"]["seg"]["classes"]) == 150
    _, seg, _ = _val_targets(tmp_path / "shards", "seg", 8)  # 16 px -> 8 px
    want = []
    for i in range(2):
        reduced = annotations[("validation", i)].astype(np.int64) - 1
        reduced[(reduced < 0) | (reduced >= 150)] = 255
        small = Image.fromarray(reduced.astype(np.uint8)).resize((8, 8), Image.NEAREST)
        want.append(torch.from_numpy(np.asarray(small).astype(np.int64)))
    got = sorted(seg, key=lambda t: t.flatten().tolist())
    want = sorted(want, key=lambda t: t.flatten().tolist())
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_nyuv2_folder_streams_depth_in_metres_with_zero_as_no_depth(tmp_path):
    root = tmp_path / "nyu"
    rng = np.random.default_rng(0)
    depths = {}
    for split in ("train", "val"):
        (root / split / "rgb").mkdir(parents=True)
        (root / split / "depth").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).save(
                root / split / "rgb" / f"{i:05d}.png"
            )
            mm = rng.integers(0, 10000, (6, 8)).astype(np.uint16)
            mm[0, :] = 0
            Image.fromarray(mm).save(root / split / "depth" / f"{i:05d}.png")
            depths[(split, i)] = mm
    # an 8-bit depth map is not a depth PNG: the sample is skipped
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(root / "train" / "depth" / "00001.png")
    manifest = write_shards(f"nyuv2:{root}", tmp_path / "shards", progress=False)
    assert manifest["splits"]["train"]["num_samples"] == 1 and manifest["skipped"]["count"] == 1
    # input 6 px: shorter side 6 -> identity resize, then the central 6x6 (columns 1..6)
    _, got, dm = _val_targets(tmp_path / "shards", "depth", 6)
    want = [torch.from_numpy(depths[("val", i)][:, 1:7].astype(np.float32) * 1e-3) for i in (0, 1)]
    got = sorted(got, key=lambda t: t.flatten().tolist())
    want = sorted(want, key=lambda t: t.flatten().tolist())
    assert all(torch.allclose(g, w) for g, w in zip(got, want))
    assert (got[0][0] == 0).all()
    with pytest.raises(Exception, match="carry no seg targets"):
        ShardDataModule(dm.cfg, target="seg").val_dataloader()


def test_dense_sources_refuse_stored_crops_and_unknown_folders(tmp_path):
    with pytest.raises(ValueError, match="crop is for classification"):
        write_shards("digit_scenes", tmp_path / "a", crop=8, progress=False)
    with pytest.raises(FileNotFoundError, match="ADEChallengeData2016"):
        write_shards(f"ade20k:{tmp_path}", tmp_path / "b", progress=False)


def test_raptor_shards_writes_digit_scenes_from_the_command_line(tmp_path, capsys):
    from raptor.cli import main

    out = tmp_path / "s"
    args = ["shards", "--source", "digit_scenes", "--out", str(out), "--scenes", "10"]
    assert main(args + ["--scene-size", "16", "--scene-digits", "1"]) == 0
    assert "dense targets: seg.png, depth.png" in capsys.readouterr().out
    assert read_manifest(out)["options"]["scenes"] == {"count": 10, "size": 16, "digits": 1}
    assert (
        main(
            [
                "shards",
                "--source",
                "digit_scenes",
                "--out",
                str(tmp_path / "t"),
                "--scene-size",
                "9",
            ]
        )
        == 2
    )
