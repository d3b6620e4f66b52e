"""`raptor shards`: round trips read back with webdataset itself, manifest, crop, refusal."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from sklearn.datasets import load_digits
from test_data import cut_tar

from raptor.cli import main as cli_main
from raptor.data.shards import MANIFEST, write_shards


def read_split(folder, manifest, split):
    """{key: (image bytes ext, bytes, label)} of a split, read by webdataset."""
    urls = [str(folder / s["name"]) for s in manifest["splits"][split]["shards"]]
    out = {}
    for sample in wds.WebDataset(urls, shardshuffle=False):
        ext = "png" if "png" in sample else "jpg"
        assert sample["__key__"] not in out
        out[sample["__key__"]] = (ext, sample[ext], int(sample["cls"].decode("ascii")))
    return out


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_digits_round_trip(digits_shards):
    manifest = json.loads((digits_shards / MANIFEST).read_text())
    splits = manifest["splits"]
    assert splits["train"]["num_samples"] + splits["val"]["num_samples"] == 1797
    assert splits["val"]["num_samples"] == 359  # round(0.2 * 1797)
    assert [s["num_samples"] for s in splits["train"]["shards"]] == [256] * 5 + [158]
    assert manifest["classes"] == [str(i) for i in range(10)] and manifest["skipped"]["count"] == 0
    for info in splits.values():
        for shard in info["shards"]:
            data = (digits_shards / shard["name"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]

    digits = load_digits()
    expected = np.round(digits.images / 16.0 * 255.0).astype(np.uint8)
    train, val = (
        read_split(digits_shards, manifest, "train"),
        read_split(digits_shards, manifest, "val"),
    )
    assert len(train) == 1438 and len(val) == 359 and not set(train) & set(val)
    for key, (ext, data, label) in {**train, **val}.items():
        i = int(key.split("_")[1])
        assert ext == "png" and label == digits.target[i]
        np.testing.assert_array_equal(pixels(data), expected[i])


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_imagefolder_round_trip_and_skips(tmp_path):
    rng = np.random.default_rng(0)
    root, written = tmp_path / "images", {}
    for split, n in (("train", 4), ("val", 2)):
        for cls in ("dog", "cat"):
            (root / split / cls).mkdir(parents=True)
            for j in range(n):
                arr = rng.integers(0, 256, (5 + j, 7, 3), dtype=np.uint8)
                path = root / split / cls / f"img{j}.png"
                path.write_bytes(_png(arr))
                written[path.read_bytes()] = (split, cls, arr)
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(jpeg, format="JPEG")
    (root / "train" / "dog" / "photo.jpg").write_bytes(jpeg.getvalue())
    broken = root / "train" / "cat" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a jpeg")

    manifest = write_shards(
        f"imagefolder:{root}", tmp_path / "out", shard_size=3, workers=2, progress=False
    )
    assert manifest["classes"] == ["cat", "dog"]
    assert manifest["skipped"] == {"count": 1, "paths": [str(broken)]}
    assert {s: v["num_samples"] for s, v in manifest["splits"].items()} == {"train": 9, "val": 4}
    assert [s["num_samples"] for s in manifest["splits"]["train"]["shards"]] == [3, 3, 3]
    seen = 0
    for split in ("train", "val"):
        for ext, data, label in read_split(tmp_path / "out", manifest, split).values():
            if ext == "jpg":  # JPEG files are stored byte for byte
                assert data == jpeg.getvalue() and label == 1
                continue
            want_split, cls, arr = written[data]  # PNG files too: bytes identify the source
            assert want_split == split and label == manifest["classes"].index(cls)
            np.testing.assert_array_equal(pixels(data), arr)
            seen += 1
    assert seen == len(written)


def test_crop_stores_center_crop_jpeg(tmp_path):
    root = tmp_path / "images" / "stripes"
    root.mkdir(parents=True)
    wide = np.zeros((20, 40, 3), np.uint8)  # left half red, right half blue
    wide[:, :20, 0], wide[:, 20:, 2] = 255, 255
    (root / "wide.png").write_bytes(_png(wide))
    tall = np.full((50, 17, 3), 128, np.uint8)
    (root / "tall.png").write_bytes(_png(tall))

    manifest = write_shards(
        f"imagefolder:{tmp_path / 'images'}", tmp_path / "out", crop=16, progress=False
    )
    assert list(manifest["splits"]) == ["train"]
    samples = read_split(tmp_path / "out", manifest, "train")
    assert len(samples) == 2
    for ext, data, _ in samples.values():
        img = Image.open(io.BytesIO(data))
        assert ext == "jpg" and img.format == "JPEG" and img.size == (16, 16) and img.mode == "RGB"
        arr = np.asarray(img).astype(int)
        if arr[..., 2].max() > 200:  # the wide one: resized to 32x16, columns 8..23 kept
            assert arr[8, 2, 0] > 200 and arr[8, 2, 2] < 60  # red left of centre
            assert arr[8, 13, 2] > 200 and arr[8, 13, 0] < 60  # blue right of centre
        else:
            assert np.abs(arr - 128).max() <= 3


def test_cli_writes_digits_and_refuses_non_empty_out(tmp_path, capsys):
    out = tmp_path / "shards"
    assert (
        cli_main(["shards", "--source", "digits", "--out", str(out), "--shard-size", "1000"]) == 0
    )
    manifest = json.loads((out / MANIFEST).read_text())
    assert sum(v["num_samples"] for v in manifest["splits"].values()) == 1797
    capsys.readouterr()

    mine = out / "notes.txt"
    mine.write_text("keep me")
    before = (out / "train-000000.tar").stat().st_mtime_ns
    assert cli_main(["shards", "--source", "digits", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err and str(out) in err
    assert (out / "train-000000.tar").stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_shards("digits", out, progress=False)

    manifest = write_shards("digits", out, shard_size=2000, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        MANIFEST,
        "notes.txt",
        "train-000000.tar",
        "val-000000.tar",
    ]
    assert mine.read_text() == "keep me" and manifest["splits"]["train"]["num_samples"] == 1438


def test_bad_source_is_named():
    with pytest.raises(ValueError, match="expected digits, imagefolder:PATH, digit_scenes"):
        write_shards("mnist", "/nonexistent")


def test_verify_names_truncated_and_altered_shards(digits_shards, tmp_path, capsys):
    folder = tmp_path / "set"
    shutil.copytree(digits_shards, folder)
    assert cli_main(["shards", "verify", str(folder), "--no-progress"]) == 0
    assert "all 8 shards match" in capsys.readouterr().out

    header = cut_tar(folder / "train-000002.tar", 2 * 100, inside=False)  # 100 samples left
    body = cut_tar(folder / "val-000001.tar", 2 * 30, inside=True)  # in the 31st image
    flipped = folder / "train-000004.tar"
    with tarfile.open(flipped) as tar:
        at = tar.getmembers()[20].offset_data + 30  # a byte inside an image
    data = bytearray(flipped.read_bytes())
    data[at] ^= 0x01
    flipped.write_bytes(bytes(data))
    assert (header, body) == (100, 30)

    assert cli_main(["shards", "verify", str(folder), "--no-progress"]) == 1
    lines = capsys.readouterr().out.splitlines()
    bad = {line.split()[1]: line for line in lines if line.startswith("BAD ")}
    assert sorted(bad) == [
        str(folder / n) for n in ("train-000002.tar", "train-000004.tar", "val-000001.tar")
    ]
    assert (
        f"expected 256 samples (manifest), read {header}" in bad[str(folder / "train-000002.tar")]
    )
    assert "end-of-archive marker" in bad[str(folder / "train-000002.tar")]
    assert f"expected 103 samples (manifest), read {body}" in bad[str(folder / "val-000001.tar")]
    assert "cut inside member" in bad[str(folder / "val-000001.tar")]
    altered = bad[str(folder / "train-000004.tar")]
    assert "sha256" in altered and "expected" not in altered  # every sample is still there
    assert lines[-1].startswith("3 of 8 shards are bad")


def test_verify_without_a_readable_manifest_exits_2(tmp_path, capsys):
    assert cli_main(["shards", "verify", str(tmp_path), "--no-progress"]) == 2
    assert f"{tmp_path}: no {MANIFEST}" in capsys.readouterr().err
    (tmp_path / MANIFEST).write_text("{not json")
    assert cli_main(["shards", "verify", str(tmp_path), "--no-progress"]) == 2
    assert f"{tmp_path / MANIFEST}: not valid JSON" in capsys.readouterr().err


def test_ranks_of_a_launched_job_write_the_shards_once(digits_shards, tmp_path):
    """torchrun / srun start every rank before any process group exists, and each rank runs
    `ensure_shards`: rank 1, started first, must wait for rank 0 rather than write the same
    folder itself; both then read shards equal to one process's (the same sha256s)."""
    import subprocess
    import sys

    out = tmp_path / "shards"
    code = (
        "import sys; from raptor.config import load_config; "
        "from raptor.data.shards import ensure_shards; "
        "cfg = load_config(None, ['data.source=digits', 'data.shard_size=256', "
        f"'data.shards_dir={out}']); "
        "print(ensure_shards(cfg, 'unused').data.shards_dir)"
    )

    def rank(r: int) -> subprocess.Popen:
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": "2"}
        return subprocess.Popen(
            [sys.executable, "-c", code], env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip

    waiting = rank(1)
    assert "rank 1: waiting for rank 0" in waiting.stderr.readline()
    assert not out.exists() or not any(out.iterdir())  # rank 1 wrote nothing
    writing = rank(0)
    for proc in (writing, waiting):
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        assert stdout.strip() == str(out)
    ours = json.loads((out / MANIFEST).read_text())["splits"]
    assert ours == json.loads((digits_shards / MANIFEST).read_text())["splits"]
