"""`raptor probe` (issue 14): the classification probe, its streamed feature cache, errors."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from raptor.cli import main as cli_main
from raptor.eval.probe.features import FeatureCache
from raptor.eval.probe.tasks import TASKS, ClsTask
from tests.conftest import fit_overrides, make_vit


def probe_args(teacher, shards, tmp_path, **extra) -> list:
    """`raptor probe` overrides for the tiny teacher on the digits, outputs in tmp_path."""
    base = {
        "probe.models": "[teacher]",
        "probe.epochs": 0,
        "probe.cache_dir": str(tmp_path / "cache"),
        "run_dir": str(tmp_path / "out"),
        "logging.progress_bar": "false",
        "trainer.num_threads": 1,
    }
    base.update(extra)
    return fit_overrides(teacher, shards, **base)


def config(tmp_path) -> str:
    """A config file for the command line (the overrides give the rest)."""
    path = tmp_path / "probe.yaml"
    path.write_text("name: probe_test\n")
    return str(path)


def fitted_teacher(pool, cfg, path):
    """A random tiny ViT whose timm head (on the cls token or the patch mean, as `pool`;
    no fc_norm)
    is fitted by least squares to the validation labels (a head that decides something),
    saved to `path`; returns the file and the ViT's own top-1 there (its forward, float32)."""
    from raptor.data.stream import ShardDataModule
    from raptor.model.teacher import Teacher

    vit = make_vit(
        img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, reg_tokens=2,
        num_classes=10, global_pool=pool, fc_norm=False,
    ).eval()  # fmt: skip
    dm = ShardDataModule(cfg.data, Teacher(vit).data_config, 10)
    batches = [(b["image"][b["valid"]], b["label"][b["valid"]]) for b in dm.val_dataloader()]
    images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    with torch.no_grad():
        pooled = vit.forward_head(vit.forward_features(images), pre_logits=True)
        a = torch.cat([pooled, torch.ones(len(pooled), 1)], dim=1).double()
        sol = torch.linalg.lstsq(a, torch.nn.functional.one_hot(labels, 10).double()).solution
        vit.head.weight.copy_(sol[:-1].T)
        vit.head.bias.copy_(sol[-1])
        top1 = (vit(images).argmax(-1) == labels).double().mean().item()
    return Teacher(vit).save(path), top1


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_head_init_reproduces_the_teachers_top1(pool, digits_shards, tmp_path):
    """The probe's epoch 0 is the teacher's own classifier (cls-token or patch-mean pooled
    timm head) mapped onto [cls ; mean(patch)]: the same top-1 as the teacher's forward
    (features kept in float32: this head, fitted to a random ViT's nearly collinear
    features, has weights large enough for float16 rounding to change its decisions)."""
    from raptor.config import load_config
    from raptor.eval.probe.run import run_probe

    overrides = probe_args(tmp_path / "t", digits_shards, tmp_path)
    cfg = load_config(None, overrides + ["probe.feature_dtype=float32"])
    weights, top1 = fitted_teacher(pool, cfg, tmp_path / "teacher.safetensors")
    cfg.teacher.weights = str(weights)
    out = run_probe(cfg, tmp_path / "out")
    (teacher,) = out["models"]
    assert out["init"] == "teacher head" and teacher["val_rows"] == 359
    assert teacher["at_init"] == top1 > 0.5


def _cache(tmp_path, name, x, y, chunk_rows=256):
    return FeatureCache.write(tmp_path / name, "k", ((x[i : i + 50], y[i : i + 50]) for i in
                              range(0, len(x), 50)), chunk_rows)  # fmt: skip


def test_linear_features_reach_100_and_random_features_chance(tmp_path):
    """A head trained on features that hold the label linearly is exact; on features
    independent of the label it scores about chance (1/10)."""
    from raptor.eval.probe.run import HeadTraining, train_head

    torch.set_num_threads(1)  # tiny matrices: threads only contend (restored by conftest)
    g = torch.Generator().manual_seed(0)
    task = ClsTask(10)
    scores = {}
    for kind in ("linear", "random"):
        caches = {}
        for split, n in (("train", 1000), ("val", 1000)):
            y = torch.randint(0, 10, (n,), generator=g)
            x = torch.randn(n, 32, generator=g)
            if kind == "linear":
                x[:, :10] += 10 * torch.nn.functional.one_hot(y, 10)
            caches[split] = _cache(tmp_path, f"{kind}-{split}", x, y)
        torch.manual_seed(0)
        training = HeadTraining(epochs=5, batch_size=64, lr=1e-2)
        curve = train_head(
            task, task.head(32), caches["train"], caches["val"], training, 0, torch.device("cpu")
        )
        scores[kind] = max(c["top1"] for c in curve)
    assert scores["linear"] == 1.0
    assert 0.05 < scores["random"] < 0.16


@pytest.mark.parametrize(
    "task, epochs, batch_size, lr",
    [("cls", 15, 512, 1e-3), ("seg", 10, 32, 1e-3), ("depth", 25, 128, 1e-4)],
)
def test_heads_train_as_the_papers_table_6_unless_set(task, epochs, batch_size, lr):
    """Appendix B.3, Table 6 (ImageNet-1k, ADE20k, NYUv2): per-task epochs, batch and
    peak lr; AdamW with weight decay 1e-2, 100 warmup iterations, clip 1.0 for all.
    Values the config sets win."""
    from raptor.config import load_config
    from raptor.eval.probe.run import HeadTraining

    cfg = load_config(None, [f"probe.task={task}"])
    assert HeadTraining.from_config(cfg.probe) == HeadTraining(
        epochs, batch_size, lr, weight_decay=1e-2, warmup_steps=100, grad_clip=1.0
    )
    cfg = load_config(None, [f"probe.task={task}", "probe.epochs=2", "probe.batch_size=8",
                             "probe.lr=0.5", "probe.grad_clip=null", "probe.warmup_steps=0"])  # fmt: skip
    assert HeadTraining.from_config(cfg.probe) == HeadTraining(2, 8, 0.5, 1e-2, 0, None)


def reference_head(head, train, t, seed, clip):
    """The head `train_head` should give, in float64 from the same start and batches: lr
    set by hand each step (linear warmup (s+1)/w, then half a cosine to 0 at the last
    step), the gradient scaled to norm `clip` when above it; returns (weights, the largest
    gradient norm seen)."""
    import math

    head = copy.deepcopy(head).double()
    opt = torch.optim.AdamW(head.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    rng, step, largest = random.Random(seed), 0, 0.0
    total = t.epochs * math.ceil(train.rows / t.batch_size)
    for _ in range(t.epochs):
        for x, y in train.batches(t.batch_size, shuffle=rng):
            if step < t.warmup_steps:
                factor = (step + 1) / t.warmup_steps
            else:
                progress = (step - t.warmup_steps) / (total - t.warmup_steps)
                factor = 0.5 * (1 + math.cos(math.pi * progress))
            opt.param_groups[0]["lr"] = t.lr * factor
            loss = torch.nn.functional.cross_entropy(head(x.double()), y)
            opt.zero_grad()
            loss.backward()
            norm = math.sqrt(sum(float((p.grad**2).sum()) for p in head.parameters()))
            largest = max(largest, norm)
            if clip is not None and norm > clip:
                for p in head.parameters():
                    p.grad *= clip / (norm + 1e-6)
            opt.step()
            step += 1
    return head.state_dict(), largest


def test_train_head_warms_up_decays_and_clips_as_a_float64_reference(tmp_path):
    """Two epochs of 4 batches (64, 64, 64, 8 rows) with 3 warmup steps and the gradient
    norm clipped at 0.5, against `reference_head`; the gradients are far above 0.5, so a
    head trained without clipping (or without the schedule) ends elsewhere."""
    from raptor.eval.probe.run import HeadTraining, train_head

    g = torch.Generator().manual_seed(0)
    caches = {}
    for split, n in (("train", 200), ("val", 50)):
        y = torch.randint(0, 10, (n,), generator=g)
        x = 5 * torch.randn(n, 16, generator=g)
        caches[split] = _cache(tmp_path, split, x, y)
    task = ClsTask(10)
    torch.manual_seed(1)
    start = task.head(16)
    t = HeadTraining(epochs=2, batch_size=64, lr=0.05, weight_decay=1e-2, warmup_steps=3,
                     grad_clip=0.5)  # fmt: skip
    head = copy.deepcopy(start)
    train_head(task, head, caches["train"], caches["val"], t, 7, torch.device("cpu"))
    want, largest = reference_head(start, caches["train"], t, seed=7, clip=0.5)
    assert largest > 4 * 0.5  # the clip is active
    for key, value in head.state_dict().items():
        torch.testing.assert_close(value.double(), want[key], rtol=1e-5, atol=1e-6)
    unclipped, _ = reference_head(start, caches["train"], t, seed=7, clip=None)
    assert (unclipped["weight"] - want["weight"]).abs().max() > 1e-2


def test_features_stream_to_and_from_disk_in_bounded_chunks(tmp_path):
    """Writing holds at most a chunk (+ one batch) of rows before they reach the disk;
    reading holds one chunk at a time; the rows come back in order, as float16."""
    from safetensors import safe_open

    n, batch, chunk = 1000, 30, 100
    x = torch.randn(n, 8)
    y = torch.arange(n)
    folder = tmp_path / "c"
    held = []

    def on_disk() -> int:
        rows = 0
        for f in folder.glob("chunk-*.safetensors"):
            with safe_open(str(f), "pt") as fh:
                rows += fh.get_slice("x").get_shape()[0]
        return rows

    def batches():
        for i in range(0, n, batch):
            held.append(i - on_disk())  # rows produced so far and not yet on disk
            yield x[i : i + batch], y[i : i + batch]

    cache = FeatureCache.write(folder, "key", batches(), chunk_rows=chunk)
    assert max(held) <= chunk and cache.peak_rows < chunk + batch
    assert cache.rows == n and len(cache.meta["chunks"]) == n // chunk
    reader = FeatureCache.open(folder, "key")
    got = list(reader.chunks())
    assert max(c[0].shape[0] for c in got) == chunk and reader.peak_rows == chunk
    assert torch.equal(torch.cat([c[0] for c in got]), x.half().float())
    assert torch.equal(torch.cat([c[1] for c in got]), y)
    shuffled = torch.cat([b[1] for b in reader.batches(64, shuffle=random.Random(0))])
    assert sorted(shuffled.tolist()) == y.tolist() and not torch.equal(shuffled, y)
    assert FeatureCache.open(folder, "another key") is None


def test_a_rerun_reuses_the_cache_and_a_new_layer_builds_its_own(
    tiny_teacher, digits_shards, tmp_path, capsys
):
    args = probe_args(
        tiny_teacher, digits_shards, tmp_path, **{"probe.models": "[teacher,identity]"}
    )
    assert cli_main(["probe", config(tmp_path), *args]) == 0
    result = tmp_path / "out" / "probe.json"
    first = json.loads(result.read_text())
    files = sorted((tmp_path / "cache").rglob("chunk-*"))
    stamps = [f.stat().st_mtime_ns for f in files]
    assert [m["features_reused"] for m in first["models"]] == [False, False]
    assert cli_main(["probe", config(tmp_path), *args]) == 0
    again = json.loads(result.read_text())
    assert [m["features_reused"] for m in again["models"]] == [True, True]
    assert [f.stat().st_mtime_ns for f in sorted((tmp_path / "cache").rglob("chunk-*"))] == stamps
    assert again["models"][0]["at_init"] == first["models"][0]["at_init"]
    capsys.readouterr()
    assert cli_main(["probe", config(tmp_path), *args, "probe.layer=2", "probe.epochs=1"]) == 0
    layered = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert layered["layer"] == 2 and not layered["models"][0]["features_reused"]
    # Table 6's defaults but one epoch: 3 steps of 512 of the 1438 rows, all in the warmup
    assert layered["training"] == {"epochs": 1, "batch_size": 512, "lr": 1e-3,
                                   "weight_decay": 1e-2, "warmup_steps": 100, "grad_clip": 1.0}  # fmt: skip
    err = capsys.readouterr().err
    assert "probe.warmup_steps=100 covers all 3 training steps of each head" in err
    table = (tmp_path / "out" / "probe.md").read_text()
    assert "| teacher |" in table and "| identity |" in table
    assert "Heads: 1 epoch in batches of 512, AdamW at lr 0.001 (100 warmup steps, then " in table
    assert (tmp_path / "out" / "probe_curve.png").is_file()
    capsys.readouterr()


@pytest.mark.parametrize(
    "override, message",
    [
        ("task=nope", "probe.task"),
        ("probe.models=[{bad}]", "is not a Raptor run folder"),
        ("probe.layer=9", "probe.layer=9 is out of range: the teacher has layers 0..4"),
    ],
)
def test_wrong_input_is_one_line(override, message, tiny_teacher, digits_shards, tmp_path, capsys):
    bad = tmp_path / "not_a_run"
    bad.mkdir()
    args = probe_args(tiny_teacher, digits_shards, tmp_path)
    assert cli_main(["probe", config(tmp_path), *args, override.format(bad=bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_config_names_every_task():
    from raptor.config import PROBE_TASKS

    assert set(PROBE_TASKS) == set(TASKS)


def test_the_pipeline_probes_after_every_raptor_and_the_summary_shows_it(tmp_path):
    """pipeline.probes adds a probe/TASK step consuming every Raptor's last stage, in
    probe/TASK; the summary gains its table."""
    from raptor.config import load_config
    from raptor.eval.probe.run import probe_table
    from raptor.eval.summary import write_summary
    from raptor.pipeline import pipeline_steps

    cfg = load_config("configs/demo.yaml", ["pipeline.probes=[]", f"run_dir={tmp_path}"])
    assert not [s for s in pipeline_steps(cfg, tmp_path) if s.name.startswith("probe")]
    cfg.pipeline.probes = ["cls"]
    steps = pipeline_steps(cfg, tmp_path)
    (probe,) = [s for s in steps if s.name.startswith("probe")]
    assert probe.name == "probe/cls" and probe.folder == tmp_path / "probe" / "cls"
    assert {"k2/stage2", "k3/stage2", "teacher", "shards"} <= set(probe.after)
    assert probe.values["probe.epochs"] == 5 and "probe.task" not in probe.values
    cfg.pipeline.probes = ["cls", "seg", "depth"]
    dense = [s for s in pipeline_steps(cfg, tmp_path) if s.name in ("probe/seg", "probe/depth")]
    assert [(s.name, s.folder.name) for s in dense] == [
        ("probe/seg", "seg"),
        ("probe/depth", "depth"),
    ]
    assert (
        dense[0].values["data.scene_count"] == cfg.data.scene_count
        and "probe.dense.depth_bins" in dense[1].values
    )
    curve = [{"epoch": 0, "top1": 0.5}, {"epoch": 1, "top1": 0.75}]
    model = {"at_init": 0.5, "best": 0.75, "best_epoch": 1, "curve": curve}
    result = {"task": "cls", "layer": 8, "num_layers": 8, "primary": "top1", "epochs": 1}
    result["models"] = [
        {"name": "teacher", "kind": "teacher", **model, "ratio": 1.0},
        {"name": "k2", "kind": "raptor", **model, "best": 0.6, "ratio": 0.8},
    ]
    table = probe_table(result)
    assert "| teacher | 50.0% | 75.0% | 1 | 1.000 |" in table
    assert "| k2 | 50.0% | 60.0% | 1 | 0.800 |" in table
    write_summary(
        cfg, tmp_path, {"probe/cls": {"result": result, "wall_s": 1.0, "folder": str(tmp_path)}}
    )
    assert table in (tmp_path / "summary.md").read_text()


def _miou_and_accuracy(pred, target, classes):
    """Brute force: mean IoU over the classes in the prediction or the target (void 255
    left out) and the fraction of non-void pixels right."""
    keep = target != 255
    pred, target = pred[keep], target[keep]
    ious = [
        ((pred == c) & (target == c)).sum() / ((pred == c) | (target == c)).sum()
        for c in range(classes)
        if ((pred == c) | (target == c)).any()
    ]
    return sum(ious) / len(ious), (pred == target).double().mean()


def _depth_errors(pred, target):
    """Brute force: RMSE, abs-rel, delta<1.25 per image over depth > 0, then the mean."""
    rows = []
    for p, t in zip(pred.double(), target.double()):
        p, t = p[t > 0], t[t > 0]
        ratio = torch.maximum(p / t, t / p)
        rows.append(
            [
                ((p - t) ** 2).mean().sqrt(),
                ((p - t).abs() / t).mean(),
                (ratio < 1.25).double().mean(),
            ]
        )
    return torch.tensor(rows).mean(dim=0).tolist()


@pytest.mark.parametrize("task", ["seg", "depth"])
def test_dense_probes_on_generated_scenes_report_the_heads_metrics(
    task, tiny_teacher, digits_shards, tmp_path, monkeypatch, capsys
):
    """`raptor probe task=seg|depth` on the digits writes digit_scenes once into
    runs/NAME/scenes, reads them at their 16 px (the tiny teacher's 4 px patches: a 4x4
    grid) and reports, per model, metrics equal to a brute-force recomputation from the
    saved final head on the cached validation features; the ratio follows probe.json's
    definition; the teacher gets an example plot."""
    from safetensors.torch import load_file

    from raptor.config import load_config
    from raptor.eval.probe.dense import upsample

    monkeypatch.chdir(tmp_path)  # runs/NAME under tmp_path
    torch.set_num_threads(1)
    args = probe_args(
        tiny_teacher, digits_shards, tmp_path, **{"probe.task": task,
            "probe.models": "[teacher,identity]", "probe.epochs": 1, "probe.batch_size": 16,
            "probe.feature_dtype": "float32", "data.scene_count": 40, "data.shard_size": 20,
            "data.scene_size": 16,
        },
    )  # fmt: skip
    assert cli_main(["probe", config(tmp_path), *args]) == 0
    assert "writing 40 digit_scenes" in capsys.readouterr().err
    scenes = tmp_path / "runs" / "probe_test" / "scenes"
    assert json.loads((scenes / "manifest.json").read_text())["source"] == "digit_scenes"
    out_dir = tmp_path / "out"
    out = json.loads((out_dir / "probe.json").read_text())
    assert out["task"] == task and out["init"] == "fresh"
    cfg = load_config(None, args)
    heads = cfg.probe.dense
    if task == "depth":  # unset depth_max: the bins span the scenes' depths (their manifest)
        heads.depth_max = json.loads((scenes / "manifest.json").read_text())["dense"]["depth"][
            "max"
        ]
    probe = TASKS[task](11, heads)
    ref = out["models"][0]["best"]
    for model in out["models"]:
        folder = tmp_path / "cache" / task / model["name"] / "L4-val"
        cache = FeatureCache.open(folder, json.loads((folder / "cache.json").read_text())["key"])
        x, y = (torch.cat(t) for t in zip(*cache.chunks()))
        assert x.shape[1] == 16 and y.shape[1:] == (16, 16) and model["val_rows"] == 8
        assert y.dtype == (torch.uint8 if task == "seg" else torch.float32)
        head = probe.head(x.shape[-1], (4, 4))
        head.load_state_dict(load_file(str(out_dir / "heads" / f"{model['name']}.safetensors")))
        if task == "depth":  # the runner's bins ended at the manifest's maximum depth
            assert float(head.centres.max()) == pytest.approx(heads.depth_max)
        with torch.no_grad():
            outs = upsample(head.eval()(x), (16, 16))
        last = model["curve"][-1]
        if task == "seg":
            got = [last["miou"], last["pixel_acc"]]
            want = _miou_and_accuracy(outs.argmax(dim=1), y.long(), 11)
        else:
            got = [last["rmse"], last["abs_rel"], last["delta1"]]
            want = _depth_errors(outs[:, 0], y)
        assert got == pytest.approx([float(w) for w in want], abs=1e-6)
        assert model["at_best"] == model["curve"][model["best_epoch"]]
        ratio = model["best"] / ref if task == "seg" else ref / model["best"]
        assert model["ratio"] == pytest.approx(ratio)
    assert out["ratio"] == ("best / teacher's best" if task == "seg" else "teacher's best / best")
    assert (out_dir / "examples-teacher.png").is_file()
    assert not (out_dir / "examples-identity.png").exists()
    if task == "depth":  # other scene settings: the scenes are written again
        assert cli_main(["probe", config(tmp_path), *args, "data.scene_count=50"]) == 0
        assert (
            json.loads((scenes / "manifest.json").read_text())["options"]["scenes"]["count"] == 50
        )
        assert json.loads((out_dir / "probe.json").read_text())["models"][0]["val_rows"] == 10


def test_a_dense_probe_on_shards_without_its_targets_is_one_line(
    tiny_teacher, digits_shards, tmp_path, capsys
):
    args = probe_args(tiny_teacher, digits_shards, tmp_path, **{"probe.data": str(digits_shards)})
    assert cli_main(["probe", config(tmp_path), *args, "task=seg"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"probe.data={digits_shards} holds no seg targets" in err
    assert "\n" not in err and "raptor shards" in err
    assert cli_main(["probe", config(tmp_path), *args, f"probe.data={tmp_path / 'no'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"probe.data={tmp_path / 'no'} is not a folder" in err and "\n" not in err
