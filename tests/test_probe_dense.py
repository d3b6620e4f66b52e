"""Dense probes: metrics against direct computations, heads that learn a linearly encoded
mask, the SILog loss, example plots, and the teacher at another image size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raptor.config import ConfigError, load_config
from raptor.eval.probe.dense import DepthTask, SegTask, plot_examples

GROUPS = {"cls": slice(0, 1), "patch": slice(1, None)}


def _one_hot_logits(pred: np.ndarray, classes: int) -> torch.Tensor:
    return F.one_hot(torch.from_numpy(pred).long(), classes).permute(0, 3, 1, 2).float()


def test_seg_metrics_equal_a_direct_count_ignoring_void():
    rng = np.random.default_rng(0)
    classes = 5
    batches = []
    for _ in range(2):
        target = rng.integers(0, classes - 1, (3, 6, 6))  # class 4 never in the target
        target[rng.random(target.shape) < 0.2] = 255
        pred = np.where(rng.random(target.shape) < 0.6, target % 255, rng.integers(0, 5, (3, 6, 6)))
        batches.append((pred, target))
    metrics = SegTask(classes).metrics()
    for pred, target in batches:
        metrics.update(_one_hot_logits(pred, classes), torch.from_numpy(target))
    got = metrics.compute()
    pred = np.concatenate([p for p, _ in batches]).ravel()
    target = np.concatenate([t for _, t in batches]).ravel()
    keep = target != 255
    pred, target = pred[keep], target[keep]
    ious = []
    for c in range(classes):
        union = np.sum((pred == c) | (target == c))
        if union:
            ious.append(np.sum((pred == c) & (target == c)) / union)
    assert got["miou"] == pytest.approx(np.mean(ious), abs=1e-6)
    assert got["pixel_acc"] == pytest.approx(np.mean(pred == target), abs=1e-6)


def test_depth_metrics_equal_a_direct_per_image_computation_over_valid_pixels():
    rng = np.random.default_rng(1)
    target = rng.uniform(0.5, 5.0, (4, 5, 7))
    target[rng.random(target.shape) < 0.3] = 0.0
    target[3] = 0.0  # an image without depth does not count
    pred = target * rng.uniform(0.7, 1.4, target.shape) + 0.05
    metrics = DepthTask().metrics()
    metrics.update(torch.from_numpy(pred[:2, None]).float(), torch.from_numpy(target[:2]).float())
    metrics.update(torch.from_numpy(pred[2:, None]).float(), torch.from_numpy(target[2:]).float())
    got = metrics.compute()
    rows = []
    for p, t in zip(pred[:3].astype(np.float32), target[:3].astype(np.float32)):
        v = t > 0
        p, t = p[v].astype(np.float64), t[v].astype(np.float64)
        rows.append(
            [
                np.sqrt(np.mean((p - t) ** 2)),
                np.mean(np.abs(p - t) / t),
                np.mean(np.maximum(p / t, t / p) < 1.25),
            ]
        )
    want = np.mean(rows, axis=0)
    assert [got["rmse"], got["abs_rel"], got["delta1"]] == pytest.approx(want.tolist(), abs=1e-6)


def test_silog_loss_is_the_scale_invariant_log_error_on_valid_pixels():
    task = DepthTask(silog_lambda=0.85)
    target = torch.tensor([[[1.0, 2.0], [0.0, 4.0]]])
    pred = torch.tensor([[[[2.0, 2.0], [9.0, 1.0]]]])
    g = torch.log(torch.tensor([2.0, 2.0, 1.0])) - torch.log(torch.tensor([1.0, 2.0, 4.0]))
    want = 10 * torch.sqrt((g**2).mean() - 0.85 * g.mean() ** 2)
    assert task.loss(pred, target) == pytest.approx(float(want), rel=1e-6)
    with pytest.raises(ConfigError, match="depth_min"):
        DepthTask(depth_min=2.0, depth_max=1.0)


def _train(task, x, y, grid, steps=150, lr=0.05):
    """The minimal probe loop (full batch AdamW) the runner will replace; scored on rows 64+."""
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest (conftest restores it)
    head = task.head(x.shape[-1], grid)
    opt = torch.optim.AdamW(head.parameters(), lr=lr)
    for _ in range(steps):
        loss = task.loss(head(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    metrics = task.metrics()
    with torch.no_grad():
        metrics.update(head(x[64:]), y[64:])
    return metrics.compute()


def _patch_masks(n, classes, grid, patch, gen):
    """Per-patch classes (n, h, w) and their masks at `patch` px per patch."""
    cells = torch.randint(0, classes, (n,) + grid, generator=gen)
    return cells, cells.repeat_interleave(patch, 1).repeat_interleave(patch, 2)


def test_seg_probe_reaches_miou_one_on_linearly_encoded_masks_and_chance_on_random_features():
    gen = torch.Generator().manual_seed(0)
    classes, grid, dim = 4, (4, 4), 16
    cells, masks = _patch_masks(96, classes, grid, 2, gen)
    codes = torch.randn(classes, dim, generator=gen)
    encoded = codes[cells].flatten(1, 2) + 0.1 * torch.randn(96, 16, dim, generator=gen)
    tokens = torch.cat([torch.randn(96, 1, dim, generator=gen), encoded], dim=1)
    task = SegTask(classes, batchnorm=True)
    good = _train(task, task.select(tokens, GROUPS), masks, grid)
    assert good["miou"] > 0.99 and good["pixel_acc"] > 0.99
    noise = torch.randn(96, 16, dim, generator=gen)
    bad = _train(task, noise, masks, grid)
    assert bad["miou"] < 0.35  # chance: about 1 / (2 x 4 - 1) per class


def test_depth_probe_decodes_linearly_encoded_depth_and_not_random_features():
    gen = torch.Generator().manual_seed(1)
    grid, dim = (4, 4), 8
    levels = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # depth at the patch grid's resolution: upsampling would blend neighbouring patches
    cells, _ = _patch_masks(96, 4, grid, 1, gen)
    depth = levels[cells]
    codes = torch.randn(4, dim, generator=gen)
    encoded = codes[cells].flatten(1, 2)
    tokens = torch.cat([torch.zeros(96, 1, dim), encoded], dim=1)
    task = DepthTask(bins=16, depth_min=0.5, depth_max=5.0)
    assert task.select(tokens, GROUPS).shape == (96, 16, 2 * dim)  # [patch ; cls]
    good = _train(task, task.select(tokens, GROUPS), depth, grid)
    bad = _train(task, torch.randn(96, 16, 2 * dim, generator=gen), depth, grid)
    assert good["rmse"] < 0.05 and good["delta1"] > 0.99
    assert bad["rmse"] > 0.8  # the depths' spread (std 1.1)


def test_example_plots_show_image_truth_and_prediction(tmp_path):
    images = torch.rand(2, 3, 8, 8)
    seg = SegTask(3)
    path = plot_examples(
        seg, images, torch.randint(0, 3, (2, 8, 8)), torch.randn(2, 3, 4, 4), tmp_path / "s.png"
    )
    depth = DepthTask(bins=0, depth_max=4.0)
    plot_examples(
        depth, images, torch.rand(2, 8, 8) * 3, torch.rand(2, 1, 4, 4), tmp_path / "d.png"
    )
    assert path.stat().st_size > 1000 and (tmp_path / "d.png").stat().st_size > 1000


def test_teacher_runs_at_another_image_size_like_timms_dynamic_size_model(tiny_teacher):
    import timm

    from raptor.model.teacher import Teacher

    cfg = load_config(None, [f"teacher.weights={tiny_teacher}"])
    teacher = Teacher.from_config(cfg.teacher)
    arch = dict(teacher.arch["kwargs"])
    reference = timm.create_model(teacher.arch["name"], **arch, dynamic_img_size=True).eval()
    reference.load_state_dict(teacher.vit.state_dict())
    plain = timm.create_model(teacher.arch["name"], **arch).eval()
    plain.load_state_dict(teacher.vit.state_dict())
    torch.manual_seed(0)
    native, big = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 24, 32)
    with torch.no_grad():
        assert torch.equal(
            teacher.final_norm(teacher.trajectory(native)[:, -1]), plain.forward_features(native)
        )
        tokens = teacher.final_norm(teacher.trajectory(big)[:, -1])
        assert tokens.shape[1] == 3 + 6 * 8
        assert torch.allclose(tokens, reference.forward_features(big), atol=1e-5)
    with pytest.raises(ConfigError, match="multiple of 4"):
        teacher.embed(torch.randn(1, 3, 18, 16))
