"""Benchmarks: the analytic FLOP counter against torch's FlopCounterMode, and the
three `raptor bench` commands at tiny sizes on CPU (output format, finite numbers)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from raptor import flops


def counted(fn) -> int:
    """FLOPs torch counts for fn(), with the math SDPA backend (CPU's fused kernel
    is not registered with FlopCounterMode, the math path's bmm's are)."""
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("mlp,depth", [("swiglu", True), ("gelu", False)])
def test_recurrent_block_flops_match_flop_counter(mlp, depth):
    from raptor.surrogate import RecurrentBlock

    torch.manual_seed(0)
    B, T, D = 3, 11, 32
    block = RecurrentBlock(D, num_heads=4, mlp=mlp, mlp_ratio=3.0, depth_conditioning=depth)
    shape = flops.block_shape(block)
    assert shape == flops.BlockShape(D, 96, mlp, 16 if depth else 0)
    assert flops.block_params(shape) == sum(p.numel() for p in block.parameters())
    x = torch.randn(B, T, D)
    fwd = flops.block_forward_flops(shape, T)
    with torch.no_grad():
        assert counted(lambda: block(x, 5)) == B * fwd

    def train_step():
        block(x, 5).square().sum().backward()

    # fwd+bwd = 3 x fwd, except that the depth MLP's first layer needs no input
    # gradient (t is data): 2*B*depth_hidden FLOPs fewer than the convention says.
    missing = 2 * B * shape.depth_hidden
    assert counted(train_step) == 3 * B * fwd - missing


def test_teacher_and_stage2_flops_match_flop_counter():
    import timm

    from raptor.surrogate import Raptor

    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_small_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=48,
        depth=4,
        num_heads=3,
        reg_tokens=2,
        num_classes=0,
        init_values=1e-5,
    ).eval()
    shape = flops.vit_shape(vit)
    assert (shape.tokens, shape.depth, shape.block.mlp, shape.block.mlp_hidden) == (
        19,
        4,
        "gelu",
        192,
    )
    assert flops.block_params(shape.block) == sum(p.numel() for p in vit.blocks[0].parameters())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert counted(lambda: vit.forward_features(images)) == 2 * flops.teacher_forward_flops(
            shape
        )

    raptor = Raptor(4, [1], 48, 3, mlp="swiglu", mlp_ratio=4.0, depth_conditioning=False)
    bshape = flops.block_shape(raptor.blocks[0])
    a0 = torch.randn(2, shape.tokens, 48)
    step = flops.stage2_flops(shape, bshape)
    assert step.applications == 4
    assert counted(lambda: raptor(a0).square().sum().backward()) == 2 * step.surrogate


def test_dinov2_vitb14_reg_figures_of_the_issue():
    """Issue 7's arithmetic: DINOv2 ViT-B/14-reg at 224 px, T = 1 + 4 + 256 = 261."""
    block = flops.BlockShape(768, 3072, "gelu")
    teacher = flops.ViTShape(256, 14 * 14, 3, 5, 12, block)
    # by hand: 12 x (8 T D^2 + 4 T^2 D + 4 T D H) + 2 P (3 p^2) D
    T, D, H = 261, 768, 3072
    by_hand = 12 * (8 * T * D * D + 4 * T * T * D + 4 * T * D * H) + 2 * 256 * 588 * D
    assert flops.teacher_forward_flops(teacher) == by_hand
    assert round(by_hand / 1e9, 1) == 47.1
    swiglu = flops.BlockShape(768, 3072, "swiglu", depth_hidden=16)
    s2 = flops.stage2_flops(teacher, swiglu)
    assert round(s2.surrogate / 1e9) == 185  # 3 x 12 x (8 T D^2 + 4 T^2 D + 6 T D H)
    # stage 1, k = 3, phases 1-7, 8-10, 11-12: joint run shares one teacher forward
    phases = [(1, 7), (8, 10), (11, 12)]
    joint = flops.stage1_flops(teacher, swiglu, phases)
    assert joint.applications == 24 and joint.teacher == s2.teacher
    ratio = flops.stage1_separate_ratio(teacher, swiglu, phases)
    separate_teacher = sum(flops.teacher_forward_flops(teacher, e) for e in (7, 10, 12))
    assert ratio == pytest.approx((separate_teacher + joint.surrogate) / joint.total)
    assert ratio > 1


def test_peak_table_lookup():
    assert flops.find_peak("NVIDIA H100 80GB HBM3").label == "H100 SXM"
    assert flops.find_peak("NVIDIA H100 PCIe").label == "H100 PCIe"
    assert flops.find_peak("NVIDIA A100-SXM4-80GB").label == "A100"
    assert flops.find_peak("NVIDIA A10").label == "A10"
    assert flops.find_peak("NVIDIA L40S").label == "L40S"
    assert flops.find_peak("NVIDIA L4").label == "L4"
    assert flops.find_peak("cpu") is None
    assert flops.peak_flops("NVIDIA H200", "bf16") == pytest.approx(989.4e12)
    assert flops.peak_flops("cpu", "fp32") is None
    assert flops.peak_flops("cpu", "fp32", override_tflops=2.5) == 2.5e12
    with pytest.raises(ValueError, match="dtype"):
        flops.peak_flops("NVIDIA H100", "int8")
