"""ShardDataModule: splitting, transforms, bad samples, resume, and a real 2-rank DDP run."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import warnings
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from raptor.config import load_config
from raptor.data.shards import _split_indices, digits_pixels
from raptor.data.stream import (
    BadDataError,
    BadSampleWarning,
    ShardDataModule,
    plan_validation,
    split_shards,
    val_batches_per_rank,
    worker_batch_plan,
)
from raptor.errors import UserError

SMALL = ["data.transform.input_size=8", "data.transform.crop_pct=1.0", "data.shuffle_buffer=64"]


def data_cfg(*overrides):
    return load_config(None, SMALL + list(overrides)).data


# --------------------------------------------------------------------------- helpers


def read_tar(path: Path) -> list:
    """Samples of a tar as dicts {"__key__": key, ext: bytes}, in order."""
    samples = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(m).read()
    return list(samples.values())


def write_set(folder: Path, splits: dict, manifest: bool = True) -> Path:
    """Write {split: [shard samples, ...]} as {split}-NNNNNN.tar (+ manifest.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    info = {}
    for split, shards in splits.items():
        entries = []
        for j, samples in enumerate(shards):
            name = f"{split}-{j:06d}.tar"
            with tarfile.open(folder / name, "w") as tar:
                for s in samples:
                    for ext, data in s.items():
                        if ext != "__key__":
                            ti = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                            ti.size = len(data)
                            tar.addfile(ti, io.BytesIO(data))
            entries.append({"name": name, "num_samples": len(samples)})
        info[split] = {"num_samples": sum(e["num_samples"] for e in entries), "shards": entries}
    if manifest:
        (folder / "manifest.json").write_text(json.dumps({"splits": info, "classes": []}))
    return folder


def encoded(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def labelled(start: int, n: int) -> list:
    """n random 8x8 PNG samples whose labels start, start+1, ... identify them."""
    rng = np.random.default_rng(start)
    return [
        {
            "__key__": f"s{start + i:05d}",
            "png": encoded(rng.integers(0, 256, (8, 8), dtype=np.uint8), "PNG"),
            "cls": str(start + i).encode(),
        }
        for i in range(n)
    ]


def cut_tar(path: Path, member: int, inside: bool) -> int:
    """Truncate the tar at `path` at the header of its member `member`, or half-way through
    that member's data (`inside`); returns the samples still whole or begun before the cut
    (distinct keys of the members whose data is complete), counted on the intact tar."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    m = members[member]
    at = m.offset_data + m.size // 2 if inside else m.offset
    assert inside or at % 512 == 0  # a header cut lands on a 512-byte block boundary
    whole = {x.name.split(".")[0] for x in members if x.offset_data + x.size <= at}
    path.write_bytes(path.read_bytes()[:at])
    return len(whole)


def damaged_copy(digits_shards: Path, folder: Path, name: str, inside: bool) -> int:
    """A copy of the digits shards with shard `name` cut before its 41st sample (at the
    header, or inside the image's data); returns the samples still readable from it."""
    shutil.copytree(digits_shards, folder)
    return cut_tar(folder / name, 2 * 40, inside)


def fingerprints(batches) -> list:
    return [
        (tuple(b["label"].tolist()), round(float(b["image"].double().sum()), 3)) for b in batches
    ]


# --------------------------------------------------------------------------- splitting


@pytest.mark.parametrize("num_shards,num_parts", [(7, 3), (3, 3), (2, 5), (3, 8), (1, 4)])
def test_split_shards_reads_every_sample_once(num_shards, num_parts):
    sizes = [5 + 3 * i for i in range(num_shards)]
    read = Counter()
    for part in split_shards(num_shards, num_parts):
        assert part, "every reader gets something to read"
        for sl in part:
            read.update((sl.index, i) for i in range(sizes[sl.index]) if i % sl.stride == sl.offset)
    assert read == Counter((s, i) for s in range(num_shards) for i in range(sizes[s]))


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_worker_batch_plan_continues_round_robin(workers):
    total = 10
    for start in range(total + 1):
        queues = []
        for w in range(workers):  # batch i of an uninterrupted epoch comes from role i % W
            role, skip, count = worker_batch_plan(w, workers, start, total)
            queues.append(list(range(role, total, workers))[skip : skip + count])
        order = []
        while any(queues):  # what a DataLoader yields: round-robin over live workers
            order += [q.pop(0) for q in queues if q]
        assert order == list(range(start, total))


@pytest.mark.parametrize("counts", [[13, 2, 30, 5], [40], None])
def test_plan_validation_covers_each_sample_once(counts):
    total = 50 if counts is None else sum(counts)
    plan = plan_validation(
        4 if counts is None else len(counts), counts, total, num_ranks=3, num_workers=2
    )
    n = Counter()
    for rank_parts in plan:
        for p in rank_parts:
            sizes = counts or [total]  # no manifest: one stream of `total` samples
            stream = [(s, i) for s in (p.shards if counts else [0]) for i in range(sizes[s])]
            kept = stream[p.offset :: p.stride]
            assert len(kept) == p.num_samples
            n.update(kept)
    assert sum(n.values()) == total and set(n.values()) == {1}
    assert len(val_batches_per_rank(plan, 4)) == 3


# --------------------------------------------------------------------------- transforms, labels


def test_val_stream_pixels_labels_and_overrides(digits_shards):
    cfg = data_cfg(
        f"data.shards_dir={digits_shards}",
        "data.batch_size=64",
        "data.num_workers=2",
        "data.transform.mean=[0.5,0.25,0.0]",
        "data.transform.std=[0.5,0.5,0.25]",
    )
    timm_cfg = {
        "input_size": (3, 224, 224),
        "interpolation": "bilinear",
        "mean": (0.1, 0.1, 0.1),
        "std": (0.2, 0.2, 0.2),
        "crop_pct": 0.9,
        "crop_mode": "center",
    }
    dm = ShardDataModule(cfg, timm_cfg)
    assert (
        dm.transform_config["input_size"] == (3, 8, 8)
        and dm.transform_config["interpolation"] == "bilinear"
    )
    batches = list(dm.val_dataloader())
    assert len(batches) == len(dm.val_dataloader()) == 6  # a worker per shard: 256 -> 4, 103 -> 2
    valid = torch.cat([b["valid"] for b in batches])
    images = torch.cat([b["image"] for b in batches])[valid]
    labels = torch.cat([b["label"] for b in batches])[valid]
    assert len(labels) == 359

    images_u8, targets = digits_pixels()
    _, val_idx = _split_indices(1797, 0.2, 0)
    assert Counter(labels.tolist()) == Counter(targets[val_idx].tolist())
    # every image is (pixel / 255 - mean) / std of exactly one val digit, in each channel
    mean, std = torch.tensor([0.5, 0.25, 0.0]), torch.tensor([0.5, 0.5, 0.25])
    raw = (images.double() * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)) * 255.0
    assert torch.allclose(raw, raw.round(), atol=1e-3) and torch.allclose(
        raw[:, 0], raw[:, 2], atol=1e-3
    )
    got = sorted(
        raw[:, 1].round().to(torch.uint8).numpy().tobytes()[i * 64 : (i + 1) * 64]
        for i in range(359)
    )
    want = sorted(images_u8[i].tobytes() for i in val_idx)
    assert got == want


def test_train_loader_resumes_at_the_next_batch(digits_shards):
    cfg = data_cfg(
        f"data.shards_dir={digits_shards}",
        "data.batch_size=64",
        "data.num_workers=2",
        "data.transform.train_augment=true",
    )
    dm = ShardDataModule(cfg)
    loader = dm.train_dataloader()
    assert len(loader) == dm.num_train_batches == 1438 // 64
    epoch0, epoch1 = fingerprints(loader), fingerprints(loader)  # no trainer: epoch advances
    assert len(epoch0) == len(epoch1) == 22 and epoch0 != epoch1
    for n in (0, 5, 21):
        resumed = ShardDataModule(cfg).train_dataloader()
        resumed.load_state_dict({**loader.state_dict(), "epoch": 0, "batches": n})
        assert fingerprints(resumed) == epoch0[n:]


def test_pipe_urls_need_opt_in(digits_shards):
    url = f"pipe:cat {digits_shards}/val-{{000000..000001}}.tar"
    with pytest.raises(ValueError, match="data.allow_pipe=true"):
        ShardDataModule(data_cfg(f"data.val_urls={url}")).val_dataloader()
    dm = ShardDataModule(
        data_cfg(f"data.val_urls={url}", "data.allow_pipe=true", "data.num_workers=0")
    )
    with pytest.warns(UserWarning, match="counting their samples"):
        batches = list(dm.val_dataloader())
    assert sum(int(b["valid"].sum()) for b in batches) == 359


# --------------------------------------------------------------------------- bad samples


def corrupted_val(digits_shards: Path, folder: Path) -> int:
    """Val shards of the digits with a truncated JPEG and a label-less sample injected."""
    shards = [read_tar(digits_shards / f"val-00000{j}.tar") for j in range(2)]
    jpg = encoded(np.asarray(Image.open(io.BytesIO(shards[0][0]["png"]))), "JPEG")
    shards[0].insert(10, {"__key__": "truncated", "jpg": jpg[: len(jpg) // 2], "cls": b"3"})
    shards[1].insert(50, {"__key__": "unlabelled", "png": shards[1][0]["png"]})
    write_set(folder, {"val": shards})
    return sum(len(s) for s in shards)


class Recorder(L.LightningModule):
    """Tiny classifier that records what its steps see."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(192, 10)
        self.train_seen, self.val_labels, self.val_batches = [], [], 0

    def training_step(self, batch, i):
        self.train_seen += fingerprints([batch])
        return torch.nn.functional.cross_entropy(
            self.lin(batch["image"].flatten(1)), batch["label"].clamp(min=0) % 10
        )

    def validation_step(self, batch, i):
        self.val_batches += 1
        self.val_labels += batch["label"][batch["valid"]].tolist()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def trainer(tmp_path, **kw):
    kw = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "use_distributed_sampler": False,
        "default_root_dir": str(tmp_path),
        **kw,
    }
    return L.Trainer(**kw)


def test_corrupt_samples_are_skipped_and_counted(digits_shards, tmp_path):
    n_val = corrupted_val(digits_shards, tmp_path / "bad")
    cfg = data_cfg(
        f"data.train_urls={digits_shards}",
        f"data.val_urls={tmp_path / 'bad'}",
        "data.batch_size=64",
        "data.num_workers=0",
        "data.require_labels=true",
        "data.train_samples=256",
    )
    dm, model = ShardDataModule(cfg), Recorder()
    with pytest.warns(BadSampleWarning) as caught:
        trainer(tmp_path).fit(model, dm)
    messages = " ".join(str(w.message) for w in caught)
    assert "truncated" in messages and "unlabelled" in messages and "missing label" in messages
    assert dm.skip_stats()["val"] == {"read": n_val, "skipped": 2}
    assert dm.skip_stats()["train"]["skipped"] == 0
    assert len(model.val_labels) == n_val - 2 == 359 and len(model.train_seen) == 256 // 64


def test_too_many_bad_samples_stop_naming_the_shard(digits_shards, tmp_path):
    samples = read_tar(digits_shards / "val-000001.tar")[:60]
    for s in samples[::3]:  # 20 of 60 truncated
        s["png"] = s["png"][:20]
    write_set(
        tmp_path / "worse", {"val": [read_tar(digits_shards / "val-000001.tar")[60:], samples]}
    )
    cfg = data_cfg(
        f"data.val_urls={tmp_path / 'worse'}", "data.num_workers=1", "data.max_bad_fraction=0.05"
    )
    with pytest.raises(BadDataError, match=r"stopped in shard \S*val-000001\.tar"):
        list(ShardDataModule(cfg).val_dataloader())


def test_missing_labels_are_named_in_the_stop(digits_shards, tmp_path):
    samples = read_tar(digits_shards / "val-000001.tar")[:60]
    for sample in samples[::3]:  # 20 of 60 without .cls
        del sample["cls"]
    write_set(tmp_path / "nolabels", {"val": [samples]})
    cfg = data_cfg(
        f"data.val_urls={tmp_path / 'nolabels'}", "data.num_workers=0", "data.require_labels=true"
    )
    with pytest.warns(BadSampleWarning, match="missing label: no .cls member"):
        # the limit applies from the 50th sample read: samples 0, 3, ..., 48 are bad by then
        bad = len(range(0, 50, 3))
        with pytest.raises(
            BadDataError, match=rf"{bad} of 50 .* bad \(missing label: {bad};"
        ) as caught:
            list(ShardDataModule(cfg).val_dataloader())
    assert "unreadable" not in str(caught.value)


def test_label_outside_the_head_is_a_bad_sample(digits_shards, tmp_path):
    shards = [read_tar(digits_shards / f"val-00000{j}.tar") for j in range(2)]
    shards[1][7]["cls"] = b"99"
    write_set(tmp_path / "labels", {"val": shards})
    cfg = data_cfg(f"data.val_urls={tmp_path / 'labels'}", "data.num_workers=0")
    key = shards[1][7]["__key__"]

    def labels(num_classes):
        dm = ShardDataModule(cfg, num_classes=num_classes)
        batches = list(dm.val_dataloader())
        got = torch.cat([b["label"][b["valid"]] for b in batches]).tolist()
        return got, dm.skip_stats()["val"], sum(int(b["missing"]) for b in batches)

    got, stats, missing = labels(None)  # no head: the label passes through
    assert 99 in got and len(got) == 359 and stats["skipped"] == missing == 0
    with pytest.warns(BadSampleWarning) as caught:
        got, stats, missing = labels(10)
    (message,) = [str(w.message) for w in caught if "label out of range" in str(w.message)]
    assert f"skipped sample {key} of {tmp_path / 'labels' / 'val-000001.tar'}" in message
    assert "99 is not a class of the 10-way head" in message
    assert max(got) <= 9 and len(got) == 358 and stats == {"read": 359, "skipped": 1}
    assert missing == 1  # validation knows it scored one sample fewer than the set holds


# --------------------------------------------------------------------------- truncated shards


@pytest.mark.parametrize("inside", [False, True], ids=["header-cut", "body-cut"])
def test_truncated_val_shard_is_reported_and_counted(digits_shards, tmp_path, inside):
    read = damaged_copy(digits_shards, tmp_path / "cut", "val-000001.tar", inside)
    assert read == 40
    lost = 103 - read
    cfg = data_cfg(
        f"data.shards_dir={tmp_path / 'cut'}", "data.num_workers=0", "data.max_bad_fraction=1"
    )
    dm = ShardDataModule(cfg)
    with pytest.warns(BadSampleWarning) as caught:
        batches = list(dm.val_dataloader())
    (message,) = [str(w.message) for w in caught if "expected" in str(w.message)]
    shard = tmp_path / "cut" / "val-000001.tar"
    assert f"shard {shard}: expected 103 samples (manifest), read {read}" in message
    assert ("cut inside member" if inside else "without its end-of-archive marker") in message
    assert f"{lost} samples counted as bad" in message
    assert sum(int(b["valid"].sum()) for b in batches) == 359 - lost
    assert sum(int(b["missing"]) for b in batches) == lost
    assert dm.skip_stats()["val"] == {"read": 359, "skipped": lost}

    strict = data_cfg(f"data.shards_dir={tmp_path / 'cut'}", "data.num_workers=1")
    with pytest.raises(BadDataError, match=rf"missing from its shard: {lost};.*val-000001\.tar"):
        list(ShardDataModule(strict).val_dataloader())


@pytest.mark.parametrize("inside", [False, True], ids=["header-cut", "body-cut"])
def test_truncated_train_shard_is_reported_and_counted(digits_shards, tmp_path, inside):
    read = damaged_copy(digits_shards, tmp_path / "cut", "train-000000.tar", inside)
    assert read == 40
    lost = 256 - read
    url = tmp_path / "cut" / "train-000000.tar"  # one shard; its count from the manifest
    common = [f"data.train_urls={url}", "data.batch_size=32", "data.shuffle_buffer=0"]
    # 64 samples: the shard's 40, its end (the shortfall counted once), 24 of a second pass
    cfg = data_cfg(
        *common, "data.train_samples=64", "data.num_workers=0", "data.max_bad_fraction=1"
    )
    dm = ShardDataModule(cfg)
    with pytest.warns(BadSampleWarning) as caught:
        batches = list(dm.train_dataloader())
    (message,) = [str(w.message) for w in caught if "expected" in str(w.message)]
    assert f"shard {url}: expected 256 samples (manifest), read {read}" in message
    assert len(batches) == 2 and all(bool(b["valid"].all()) for b in batches)
    assert dm.skip_stats()["train"] == {"read": 64 + lost, "skipped": lost}

    strict = data_cfg(*common, "data.train_samples=64", "data.num_workers=1")
    with pytest.raises(BadDataError, match=rf"missing from its shard: {lost};.*stopped in shard"):
        list(ShardDataModule(strict).train_dataloader())


def test_manifest_overstating_a_count_is_reported(digits_shards, tmp_path):
    shutil.copytree(digits_shards, tmp_path / "over")
    path = tmp_path / "over" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["splits"]["val"]["shards"][1]["num_samples"] = 110  # holds 103
    path.write_text(json.dumps(manifest))
    cfg = data_cfg(
        f"data.shards_dir={tmp_path / 'over'}", "data.num_workers=0", "data.max_bad_fraction=1"
    )
    dm = ShardDataModule(cfg)
    with pytest.warns(
        BadSampleWarning, match=r"val-000001\.tar: expected 110 samples \(manifest\), read 103"
    ):
        batches = list(dm.val_dataloader())
    assert sum(int(b["valid"].sum()) for b in batches) == 359
    assert sum(int(b["missing"]) for b in batches) == 7


def test_incomplete_validation_is_flagged_where_top1_is_reported(
    digits_shards, tmp_path, tiny_teacher
):
    """A validation set with samples missing: the Distiller's validation (what `raptor fit`
    and `raptor evaluate` report) and the teacher's val top-1 say it is incomplete."""
    from conftest import fit_config
    from test_teacher_train import TINY

    from raptor.eval.fidelity import run_validation
    from raptor.model.partition import Partition
    from raptor.model.raptor import Raptor
    from raptor.model.teacher import Teacher, default_data_config
    from raptor.train.teacher import TeacherTraining

    read = damaged_copy(digits_shards, tmp_path / "cut", "val-000001.tar", inside=False)
    cfg = fit_config(tiny_teacher, tmp_path / "cut")
    cfg.data.max_bad_fraction = 1.0
    teacher = Teacher.from_config(cfg.teacher)
    raptor = Raptor.from_config(cfg.model, teacher, Partition.from_config(cfg, teacher.num_layers))
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(TINY.format(shards=tmp_path / "cut"))
    tcfg = load_config(str(tiny), ["data.max_bad_fraction=1.0"])
    vit = TeacherTraining(tcfg)
    for folder, missing in ((digits_shards, 0), (tmp_path / "cut", 103 - read)):
        cfg.data.shards_dir = tcfg.data.shards_dir = str(folder)
        dm = ShardDataModule(cfg.data, teacher.data_config, teacher.num_classes)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = run_validation(cfg, teacher, raptor, tmp_path / "run", datamodule=dm)
            tdm = ShardDataModule(tcfg.data, default_data_config(vit.vit), 10)
            tres = trainer(tmp_path).validate(vit, tdm, verbose=False)[0]
        flagged = [w for w in caught if "validation incomplete" in str(w.message)]
        assert res["images"] == 359 - missing and res["missing"] == missing
        assert res["complete"] is (missing == 0) and res["metrics"]["val/complete"] == (
            missing == 0
        )
        assert tres["val/complete"] == (missing == 0)
        assert len(flagged) == (2 if missing else 0)


def test_bad_manifest_and_missing_shard_are_user_errors(digits_shards, tmp_path):
    shutil.copytree(digits_shards, tmp_path / "set")
    (tmp_path / "set" / "val-000001.tar").unlink()
    cfg = data_cfg(f"data.shards_dir={tmp_path / 'set'}", "data.num_workers=0")
    with pytest.raises(UserError, match=r"1 of 2 shards not found: \S*val-000001\.tar"):
        ShardDataModule(cfg).val_dataloader()
    (tmp_path / "set" / "manifest.json").write_text('{"splits": {"val": ')
    with pytest.raises(UserError, match=r"\S*set/manifest\.json: not valid JSON"):
        ShardDataModule(cfg).val_dataloader()
    pattern = f"data.val_urls={tmp_path / 'set'}/val-{{000000..000001}}.tar"  # same manifest
    with pytest.raises(UserError, match=r"\S*set/manifest\.json: not valid JSON"):
        ShardDataModule(data_cfg(pattern)).val_dataloader()


# --------------------------------------------------------------------------- resume in a Trainer


def test_trainer_resume_mid_epoch_replays_the_same_batches(digits_shards, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    cfg = data_cfg(f"data.shards_dir={digits_shards}", "data.batch_size=128", "data.num_workers=2")
    ckpts = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1, filename="{step}"
    )
    full = Recorder()
    trainer(
        tmp_path, max_epochs=2, limit_val_batches=0, callbacks=[ckpts], enable_checkpointing=True
    ).fit(full, ShardDataModule(cfg))
    per_epoch = 1438 // 128
    assert (
        len(full.train_seen) == 2 * per_epoch
        and full.train_seen[:per_epoch] != full.train_seen[per_epoch:]
    )

    saved = torch.load(tmp_path / "ckpt" / "step=12.ckpt", weights_only=True)["loops"]["fit_loop"]
    assert [
        {k: s[k] for k in ("epoch", "batches")} for s in saved["state_dict"]["combined_loader"]
    ] == [{"epoch": 1, "batches": 1}]
    for step in (4, 12):  # 11 batches per epoch: batch 4 of epoch 0, batch 1 of epoch 1
        resumed = Recorder()
        trainer(tmp_path, max_epochs=2, limit_val_batches=0).fit(
            resumed, ShardDataModule(cfg), ckpt_path=str(tmp_path / "ckpt" / f"step={step}.ckpt")
        )
        assert resumed.train_seen == full.train_seen[step:]


# --------------------------------------------------------------------------- 2-rank DDP


DDP_SCRIPT = textwrap.dedent("""
    import json, sys
    from datetime import timedelta
    import lightning as L, torch
    from lightning.pytorch.strategies import DDPStrategy
    sys.path.insert(0, sys.argv[2])
    from test_data import Recorder, data_cfg
    from raptor.data.stream import ShardDataModule

    root = sys.argv[1]
    cfg = data_cfg(f"data.shards_dir={root}/set", "data.batch_size=4", "data.num_workers=2")
    model, dm = Recorder(), ShardDataModule(cfg)
    trainer = L.Trainer(accelerator="cpu", devices=2, max_epochs=2, logger=False, enable_checkpointing=False,
                        strategy=DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60)),
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        use_distributed_sampler=False)
    trainer.fit(model, dm)
    fit = {"train": model.train_seen, "val": model.val_labels, "val_batches": model.val_batches,
           "num_train_batches": dm.num_train_batches}
    other = Recorder()  # validation without a manifest: every 4th sample per reader
    cfg2 = data_cfg(f"data.val_urls={root}/plain/val-{{000000..000003}}.tar", "data.batch_size=4",
                    "data.num_workers=2")
    trainer.validate(other, ShardDataModule(cfg2), verbose=False)
    fit.update(plain=other.val_labels, plain_batches=other.val_batches)
    with open(f"{root}/rank{trainer.global_rank}.json", "w") as fh:
        json.dump(fit, fh)
""")


def test_ddp_two_ranks_uneven_shards(tmp_path):
    train = [labelled(0, 23), labelled(23, 7), labelled(30, 41)]  # 3 shards < 2 ranks x 2 workers
    val = [labelled(1000, 13), labelled(1013, 2), labelled(1015, 30), labelled(1045, 5)]
    write_set(tmp_path / "set", {"train": train, "val": val})
    write_set(tmp_path / "plain", {"val": val}, manifest=False)
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), str(Path(__file__).parent)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"DDP run hung:\n{proc.communicate()[0][-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    per_rank = 71 // (2 * 4)  # 8 batches of 4: 64 of the 71 samples per epoch
    for r in ranks:
        assert r["num_train_batches"] == per_rank and len(r["train"]) == 2 * per_rank  # two epochs
    # every epoch: each of the 4 readers (2 ranks x 2 workers) reads its own slice of the shards
    # (the shard read by two readers: every 2nd sample each), so the ranks read disjoint
    # samples and, between them, every shard; a reader repeats its slice to fill its quota
    shards = [set(range(0, 23)), set(range(23, 30)), set(range(30, 71))]
    for epoch in range(2):
        seen = [
            {
                label
                for labels, _ in r["train"][epoch * per_rank : (epoch + 1) * per_rank]
                for label in labels
            }
            for r in ranks
        ]
        assert not seen[0] & seen[1], (epoch, sorted(seen[0] & seen[1]))
        assert all(shard & (seen[0] | seen[1]) for shard in shards), epoch
        assert seen[0] | seen[1] <= set(range(71))
    # validation ran after each epoch: every val sample exactly once per evaluation
    assert ranks[0]["val_batches"] == ranks[1]["val_batches"]
    assert sorted(ranks[0]["val"] + ranks[1]["val"]) == sorted(list(range(1000, 1050)) * 2)
    assert ranks[0]["plain_batches"] == ranks[1]["plain_batches"]
    assert sorted(ranks[0]["plain"] + ranks[1]["plain"]) == list(range(1000, 1050))
    assert "3 training shards for 2 ranks x 2 workers" in out
