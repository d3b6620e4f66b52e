"""Distillation losses against direct float64 computations."""

from __future__ import annotations

import pytest
import torch

from raptor.model.raptor import Raptor, RecurrentBlock
from raptor.train import losses

GROUPS = {"cls": slice(0, 1), "reg": slice(1, 3), "patch": slice(3, None)}
WEIGHTS = {"cls": 0.45, "reg": 0.10, "patch": 0.45}


def _block(dim=8, seed=0):
    """A float64 block whose depth conditioning and branches matter (not near identity)."""
    torch.manual_seed(seed)
    return RecurrentBlock(dim, 2, layerscale_init=0.5, depth_init_std=0.2).double()


def test_group_weighted_mse_matches_per_group_means():
    torch.manual_seed(0)
    p, t = (
        torch.randn(3, 4, 7, 5, dtype=torch.float64),
        torch.randn(3, 4, 7, 5, dtype=torch.float64),
    )
    got = losses.group_weighted_mse(p, t, GROUPS, WEIGHTS)
    assert got.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            e = (p[i, j] - t[i, j]) ** 2
            want = 0.45 * e[0].mean() + 0.10 * e[1:3].mean() + 0.45 * e[3:].mean()
            assert got[i, j].item() == pytest.approx(want.item(), rel=1e-12)
    # no registers: the reg weight drops out, nothing renormalised
    no_reg = {"cls": slice(0, 1), "patch": slice(1, None)}
    fn = losses.make_loss("weighted", no_reg, WEIGHTS)
    e = (p - t) ** 2
    want = 0.45 * e[..., :1, :].mean() + 0.45 * e[..., 1:, :].mean()
    assert fn(p, t).mean().item() == pytest.approx(want.item(), rel=1e-12)
    assert losses.make_loss("mse", GROUPS, WEIGHTS)(p, t).mean().item() == pytest.approx(
        e.mean().item(), rel=1e-12
    )
    with pytest.raises(ValueError, match="'weighted_final' or 'mse'"):
        losses.make_loss("cosine", GROUPS, WEIGHTS)


def test_weighted_final_is_weighted_only_for_the_last_phase():
    """The reference's stage 1: plain MSE for blocks 1..k-1, group-weighted for block k."""
    torch.manual_seed(0)
    p, t = torch.randn(3, 7, 5, dtype=torch.float64), torch.randn(3, 7, 5, dtype=torch.float64)
    final = losses.make_loss("weighted_final", GROUPS, WEIGHTS, final_phase=True)
    inner = losses.make_loss("weighted_final", GROUPS, WEIGHTS, final_phase=False)
    weighted = losses.make_loss("weighted", GROUPS, WEIGHTS)
    assert torch.equal(final(p, t), weighted(p, t))
    assert torch.equal(inner(p, t), ((p - t) ** 2).mean(dim=(-2, -1)))


def test_teacher_forcing_loss_equals_loop_over_layers():
    block = _block()
    torch.manual_seed(1)
    traj = torch.randn(3, 5, 7, 8, dtype=torch.float64)  # a_{f-1} .. a_{f+3}, f = 4
    fn = losses.make_loss("weighted", GROUPS, WEIGHTS)
    got = losses.teacher_forcing_loss(block, traj[:, :-1], traj[:, 1:], 4, fn)
    want = sum(fn(block(traj[:, i], 4 + i), traj[:, i + 1]).mean() for i in range(4)) / 4
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    # the layer index matters (so the batched call must pass the right one per row)
    wrong = sum(fn(block(traj[:, i], 1), traj[:, i + 1]).mean() for i in range(4)) / 4
    assert abs(wrong.item() - want.item()) > 1e-6
    # noise: the same draws as adding them by hand, in the (B*n) row order
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    got = losses.teacher_forcing_loss(block, traj[:, :-1], traj[:, 1:], 4, fn, 0.3, g1)
    x = traj[:, :-1].flatten(0, 1)
    x = x + 0.3 * torch.randn(x.shape, generator=g2, dtype=x.dtype)
    layers = torch.arange(4, 8).repeat(3)
    want = fn(block(x, layers), traj[:, 1:].flatten(0, 1)).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-10)


def test_autoregressive_loss_equals_explicit_rollout_with_full_backprop():
    torch.manual_seed(2)
    raptor = Raptor(6, [2, 4], 8, 2, layerscale_init=0.5, depth_init_std=0.2).double()
    traj = torch.randn(2, 7, 5, 8, dtype=torch.float64)
    fn = losses.make_loss("weighted", {"cls": slice(0, 1), "patch": slice(1, None)}, WEIGHTS)
    # phase 2 (layers 3-4) of the Raptor, with block 2 alone
    block = raptor.blocks[1]
    got, preds = losses.autoregressive_loss(block, traj[:, 2], traj[:, 3:5], 3, fn)
    ref = raptor.rollout(traj[:, 2], 2, 4)
    assert torch.allclose(preds, ref, rtol=0, atol=1e-12)
    want = (fn(ref[:, 0], traj[:, 3]).mean() + fn(ref[:, 1], traj[:, 4]).mean()) / 2
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    # gradients flow through the whole rollout: equal to autograd of the explicit loop,
    # and different from a rollout truncated after its first step
    params = list(block.parameters())
    g_got = torch.autograd.grad(got, params)
    g_want = torch.autograd.grad(want, params)
    x1 = block(traj[:, 2], 3)
    trunc = (fn(x1, traj[:, 3]).mean() + fn(block(x1.detach(), 4), traj[:, 4]).mean()) / 2
    g_trunc = torch.autograd.grad(trunc, params)
    for a, b in zip(g_got, g_want):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)
    assert max((a - b).abs().max().item() for a, b in zip(g_got, g_trunc)) > 1e-8
    # stage 2 form: the whole Raptor from a_0 over all layers
    loss, preds = losses.autoregressive_loss(raptor.step, traj[:, 0], traj[:, 1:], 1, fn)
    assert torch.allclose(preds, raptor(traj[:, 0]), rtol=0, atol=1e-12)
    want = sum(fn(preds[:, i], traj[:, i + 1]).mean() for i in range(6)) / 6
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)


@pytest.mark.parametrize(
    "overrides, stage, expect",
    [
        # defaults: the reference's stage 1 (--mse for inner blocks, --weighted for the block
        # ending at layer L) and stage 2 (weighted on every block)
        ([], 1, ["mse", "mse", "weighted"]),
        ([], 2, ["weighted", "weighted", "weighted"]),
        (["train.stage1.loss=weighted"], 1, ["weighted", "weighted", "weighted"]),
        (["train.stage1.loss=mse"], 1, ["mse", "mse", "mse"]),
        (["train.stage2.loss=mse"], 2, ["mse", "mse", "mse"]),
    ],
)
def test_block_losses_default_to_the_reference_and_an_override_wins(overrides, stage, expect):
    """Each block's loss function from the config, compared on one prediction with the plain
    MSE and with the stage's group-weighted MSE computed directly."""
    from raptor.config import load_config
    from raptor.eval.validation import block_losses

    cfg = load_config(None, overrides)
    stage_cfg = cfg.train[f"stage{stage}"]
    raptor = Raptor(12, [7, 10], dim=8, num_heads=2)
    fns = block_losses(stage_cfg, stage, GROUPS, raptor)
    torch.manual_seed(0)
    p, t = torch.randn(3, 7, 5, dtype=torch.float64), torch.randn(3, 7, 5, dtype=torch.float64)
    e = (p - t) ** 2
    w = (stage_cfg.w_cls, stage_cfg.w_reg, stage_cfg.w_patch)
    want = {
        "mse": e.mean(dim=(-2, -1)),
        "weighted": w[0] * e[:, :1].mean(dim=(-2, -1))
        + w[1] * e[:, 1:3].mean(dim=(-2, -1))
        + w[2] * e[:, 3:].mean(dim=(-2, -1)),
    }
    assert not torch.allclose(want["mse"], want["weighted"])
    assert len(fns) == 3
    for fn, kind in zip(fns, expect):
        torch.testing.assert_close(fn(p, t), want[kind], rtol=1e-12, atol=0)
