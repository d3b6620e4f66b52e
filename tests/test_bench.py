"""Benchmarks: the analytic FLOP counter against torch's FlopCounterMode, and the
three `raptor bench` commands at tiny sizes on CPU (output format, finite numbers)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_vit
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from raptor import cli
from raptor.bench import flops
from raptor.bench.gpu import TINY_CONFIG


def counted(fn) -> int:
    """FLOPs torch counts for fn(), with the math SDPA backend (CPU's fused kernel
    is not registered with FlopCounterMode, the math path's bmm's are)."""
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("mlp,depth", [("swiglu", True), ("gelu", False)])
def test_recurrent_block_flops_match_flop_counter(mlp, depth):
    from raptor.model.raptor import RecurrentBlock

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

    from raptor.model.raptor import Raptor

    vit = make_vit(
        name="vit_small_patch16_224",
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


def by_hand_block(T: int, D: int, H: int, gated: bool, depth_hidden: int = 0) -> int:
    """Forward FLOPs of one pre-norm block, written out: qkv 6TD^2, QK^T and AV 4T^2D,
    proj 2TD^2, MLP (6 if gated else 4)TDH, depth MLP 1 -> h -> 3D once per image."""
    return (
        8 * T * D * D
        + 4 * T * T * D
        + (6 if gated else 4) * T * D * H
        + 2 * depth_hidden
        + 6 * depth_hidden * D
    )


@pytest.mark.parametrize("blocks,tf", [(None, True), ([0], False), ([1], True)])
def test_stage1_flops_match_flop_counter(blocks, tf):
    """A real stage-1 step: the teacher's trajectory up to the last trained layer, then
    per trained block the AR rollout (+ the TF pass), forward and backward."""

    from raptor.model.raptor import Raptor
    from raptor.model.teacher import Teacher
    from raptor.train import losses

    vit = make_vit(
        name="vit_small_patch16_224",
        img_size=16,
        patch_size=8,
        embed_dim=24,
        depth=4,
        num_heads=2,
        reg_tokens=1,
        num_classes=0,
    )
    teacher = Teacher(vit)
    raptor = Raptor(4, [1], 24, 2, mlp="swiglu", mlp_ratio=2.0, depth_conditioning=False)
    images = torch.randn(3, 3, 16, 16)
    trained = [0, 1] if blocks is None else blocks

    def step():
        upto = max(raptor.phases[j][1] for j in trained)
        traj = teacher.trajectory(images, upto=upto)
        loss = 0.0
        for j in trained:
            first, last = raptor.phases[j]
            block, targets = raptor.blocks[j], traj[:, first : last + 1]
            loss = (
                loss
                + losses.autoregressive_loss(block, traj[:, first - 1], targets, first, losses.mse)[
                    0
                ]
            )
            if tf:
                loss = loss + losses.teacher_forcing_loss(
                    block, traj[:, first - 1 : last], targets, first, losses.mse
                )
        loss.backward()

    want = flops.stage1_flops(
        flops.vit_shape(vit), flops.block_shape(raptor.blocks[0]), raptor.phases, blocks, tf
    )
    assert counted(step) == 3 * want.total
    # by hand: T = 1 + 1 + 4, phases 1 and 2-4; the teacher stops at the last trained layer
    T, upto = 6, 4 if blocks != [0] else 1
    layers = sum((1, 3)[j] for j in trained) * (2 if tf else 1)
    teacher_fwd = 2 * 4 * 64 * 3 * 24 + upto * by_hand_block(T, 24, 96, gated=False)
    assert want.total == teacher_fwd + 3 * layers * by_hand_block(T, 24, 48, gated=True)


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
    # stage 1, k = 3, phases 1-7, 8-10, 11-12: joint run shares one teacher forward;
    # 12 layers x (TF + AR) = 24 block applications, fwd+bwd = 3 x fwd
    phases = [(1, 7), (8, 10), (11, 12)]
    joint = flops.stage1_flops(teacher, swiglu, phases)
    block_fwd = 8 * T * D * D + 4 * T * T * D + 6 * T * D * H + 2 * 16 + 6 * 16 * D
    assert joint.applications == 24 and joint.teacher == by_hand
    assert joint.surrogate == 3 * 24 * block_fwd
    # k separate runs: each its own teacher forward, up to layers 7, 10 and 12
    patch, teacher_block = 2 * 256 * 588 * D, (by_hand - 2 * 256 * 588 * D) // 12
    separate = sum(patch + e * teacher_block for e in (7, 10, 12)) + 3 * 24 * block_fwd
    ratio = flops.stage1_separate_ratio(teacher, swiglu, phases)
    assert ratio == pytest.approx(separate / (by_hand + 3 * 24 * block_fwd), rel=1e-12)


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


def test_largest_fitting_batch_search():
    from raptor.bench.train import largest_fitting

    for limit in (8, 63, 64, 100, 1000, 1024):
        tried = []

        def fits(b, limit=limit, tried=tried):
            tried.append(b)
            return b <= limit

        found = largest_fitting(fits, 8)
        # brute force: the largest multiple of 8 (or 8 itself) not above the limit
        assert found == max(b for b in range(8, limit + 1) if b % 8 == 0)
        assert len(tried) < 25
        for cap in (8, 50, 100, 600):  # a bounded search never tries past its cap
            tried.clear()
            found = largest_fitting(fits, 8, limit=cap)
            assert found == max(b for b in range(8, min(limit, cap) + 1) if b % 8 == 0)
            assert max(tried) <= cap and len(tried) < 25
    assert largest_fitting(lambda b: False, 64) == 0


def test_checkpointed_block_gives_the_same_gradients():
    from raptor.model.raptor import RecurrentBlock

    torch.manual_seed(0)
    block = RecurrentBlock(16, num_heads=2, layerscale_init=0.5)
    x = torch.randn(2, 5, 16)
    grads = []
    for on in (False, True):
        block.zero_grad()
        block.checkpoint_activations = on
        block(x, 3).square().sum().backward()
        grads.append([p.grad.clone() for p in block.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------- commands


def finite_numbers(obj) -> list:
    """Every number in a JSON value (bools excluded); asserts they are finite."""
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in finite_numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in finite_numbers(v)]
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        assert math.isfinite(obj), obj
        return [obj]
    return []


def run_cli(argv, capsys):
    assert cli.main(argv) == 0
    return capsys.readouterr().out


def test_bench_train_stage1_and_stage2(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_CONFIG)  # the GPU suite's dry-run model
    out1 = tmp_path / "s1.json"
    common = [
        "--steps",
        "3",
        "--warmup",
        "1",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--dmd-repeats",
        "2",
    ]
    text = run_cli(
        [
            "bench",
            "train",
            str(config),
            "--stage",
            "1",
            "--skip-baseline",
            "--json",
            str(out1),
            *common,
        ],
        capsys,
    )
    for line in (
        "images_per_s",
        "step_time_median_s",
        "peak_memory_mib",
        "gflop_per_image_teacher_fwd",
        "gflop_per_image_surrogate_fwd_bwd",
        "achieved_tflop_per_s",
        "fraction_of_peak",
        "measured_ratio_separate_over_joint",
        "moments_pass_s",
    ):
        assert line in text
    r1 = json.loads(out1.read_text())
    finite_numbers(r1)
    res = r1["result"]
    assert res["step_time_q1_s"] <= res["step_time_median_s"] <= res["step_time_q3_s"]
    assert res["steps_with_teacher_forcing"] == 1.0  # r = 1 - step/25 > 0 in these steps
    # FLOPs by hand: T = 1 + 1 + 4 = 6 tokens, patches of 4 x 4 x 3 pixels, phases (1-3), (4);
    # TF + AR -> 8 surrogate applications, fwd+bwd = 3 x fwd; the teacher runs all 4 layers
    T, D = 6, 32
    student = by_hand_block(T, D, 64, gated=True, depth_hidden=16)
    teacher_block, patch = by_hand_block(T, D, 64, gated=False), 2 * 4 * 48 * D
    assert res["surrogate_block_applications"] == 8
    joint = patch + 4 * teacher_block + 3 * 8 * student
    assert res["gflop_per_image_total"] == pytest.approx(joint / 1e9, rel=1e-12)
    assert res["achieved_tflop_per_s"] == pytest.approx(joint * res["images_per_s"] / 1e12)
    assert res["fraction_of_peak"] is None  # no peak known for a CPU
    sep = r1["stage1_separate"]
    assert len(sep["per_image_s_separate"]) == 2
    # block 1 alone: teacher to layer 3, 3 x 2 x 3 applications; block 2: all 4, 3 x 2 x 1
    separate = (patch + 3 * teacher_block + 18 * student) + (
        patch + 4 * teacher_block + 6 * student
    )
    assert sep["analytic_ratio_separate_over_joint"] == pytest.approx(separate / joint, rel=1e-12)
    assert sep["measured_ratio_separate_over_joint"] == pytest.approx(
        sum(sep["per_image_s_separate"]) / sep["per_image_s_joint"]
    )
    dmd = r1["dmd_pass"]
    assert dmd["ratio"] == pytest.approx(dmd["moments_pass_s"] / dmd["teacher_forward_s"])
    # moments: 5 Grams + 4 cross moments of (T x D), 2 T D^2 each, over the teacher's forward
    moments = 9 * 2 * T * D * D
    assert dmd["gflop_per_image_moments"] == pytest.approx(moments / 1e9, rel=1e-12)
    assert dmd["analytic_flop_ratio_moments_over_forward"] == pytest.approx(
        moments / (patch + 4 * teacher_block), rel=1e-12
    )

    out2 = tmp_path / "s2.json"
    text = run_cli(
        [
            "bench",
            "train",
            str(config),
            "stage=2",
            "--baseline-rounds",
            "2",
            "--activation-checkpointing",
            "--skip-dmd-pass",
            "--peak-tflops",
            "1.0",
            "--json",
            str(out2),
            *common,
        ],
        capsys,
    )
    r2 = json.loads(out2.read_text())
    finite_numbers(r2)
    assert r2["params"]["stage"] == 2 and r2["params"]["activation_checkpointing"] is True
    stage2 = patch + 4 * teacher_block + 3 * 4 * student  # AR over all 4 layers
    assert r2["result"]["gflop_per_image_total"] == pytest.approx(stage2 / 1e9, rel=1e-12)
    achieved = r2["result"]["achieved_tflop_per_s"]
    assert r2["result"]["fraction_of_peak"] == pytest.approx(achieved / 1.0)
    assert "stage1_separate" not in r2 and "dmd_pass" not in r2
    # the reference-style baseline: interleaved rounds, every figure with its ratio
    assert "reference-style baseline" in text and "images_per_s_ratio" in text
    base = r2["baseline"]
    assert r2["params"]["rounds"] == 2 and len(base["speedup_per_round"]) == 2
    for name in ("images_per_s", "step_time_median_s", "achieved_tflop_per_s", "peak_memory_mib"):
        this, ref = base[f"{name}_this"], base[f"{name}_baseline"]
        assert base[f"{name}_ratio"] == pytest.approx(this / ref)
    assert base["images_per_s_this"] == r2["result"]["images_per_s"]
    assert base["achieved_tflop_per_s_baseline"] == pytest.approx(
        stage2 * base["images_per_s_baseline"] / 1e12
    )
    assert min(base["speedup_per_round"]) <= base["images_per_s_ratio"]
    assert base["images_per_s_ratio"] <= max(base["speedup_per_round"]) or math.isclose(
        base["images_per_s_ratio"], max(base["speedup_per_round"])
    )


class OpCounter(TorchDispatchMode):
    """Counts the aten operators run inside it (forward and backward) by kind."""

    def __init__(self):
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))

    def count(self, word: str) -> int:
        return sum(word in op and "backward" not in op for op in self.ops)


def test_reference_style_baseline_computes_the_same_step_the_reference_way():
    from raptor.bench.train import ReferenceAttention, reference_style
    from raptor.model.raptor import Raptor
    from raptor.model.teacher import Teacher

    vit = make_vit(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=4, reg_tokens=1)
    teacher = Teacher(vit.eval())
    torch.manual_seed(1)
    raptor = Raptor(4, [2], 32, 4, mlp="swiglu", mlp_ratio=2.0)
    ref_teacher, ref_raptor = reference_style(teacher, raptor)
    assert all(isinstance(b.attn, ReferenceAttention) for b in ref_raptor.blocks)
    assert ref_teacher.precision == "fp32" and teacher.precision == "bf16"
    images = torch.randn(3, 3, 16, 16)
    with OpCounter() as ours:
        traj = teacher.trajectory(images)
        out = raptor(traj[:, 0])
    with OpCounter() as ref:
        ref_traj = ref_teacher.trajectory(images)
        ref_out = ref_raptor(ref_traj[:, 0])
    # our path: fused attention kernels (4 teacher + 4 surrogate applications), no softmax;
    # the reference's: 8 explicit softmaxes, no fused kernel
    assert ours.count("scaled_dot_product") == 8 and ours.count("softmax") == 0
    assert ref.count("scaled_dot_product") == 0 and ref.count("softmax") == 8
    # the same function: same attention, trajectory and rollout, and the same gradients
    x = torch.randn(3, 7, 32)
    for block, ref_block in zip(raptor.blocks, ref_raptor.blocks):
        torch.testing.assert_close(ref_block.attn(x), block.attn(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref_traj, traj, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref_out, out, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    ref_out.square().sum().backward()
    for block, ref_block in zip(raptor.blocks, ref_raptor.blocks):
        torch.testing.assert_close(
            ref_block.attn.mha.in_proj_weight.grad, block.attn.qkv.weight.grad, rtol=1e-4, atol=1e-6
        )
        torch.testing.assert_close(ref_block.mlp.fc1.weight.grad, block.mlp.fc1.weight.grad)


def test_bench_data_full_images_vs_crops(tmp_path, capsys):
    out = tmp_path / "data.json"
    text = run_cli(
        [
            "bench",
            "data",
            "--images",
            "24",
            "--image-size",
            "64x48",
            "--classes",
            "2",
            "--input-size",
            "32",
            "--batch-size",
            "4",
            "--workers",
            "0",
            "1",
            "--threads",
            "1",
            "--json",
            str(out),
        ],
        capsys,
    )
    assert "images_per_s_per_worker" in text
    result = json.loads(out.read_text())
    finite_numbers(result)
    rows = result["loaders"]
    assert [(r["shards"], r["workers"]) for r in rows] == [
        ("full images", 0),
        ("full images", 1),
        ("center crops 32px", 0),
        ("center crops 32px", 1),
    ]
    for r in rows:  # steady rate: the 6 batches after the first max(W, 1), inside the epoch
        skip = max(1, r["workers"])
        assert r["images_per_s"] * r["epoch_s"] >= (6 - skip) * 4
        assert r["images_per_s_per_worker"] == pytest.approx(r["images_per_s"] / skip)
    assert rows[2]["kib_per_image"] < rows[0]["kib_per_image"]  # 32x32 crops vs 64x48 images


def test_bench_growth_predicts_from_flop_counts(tmp_path, capsys):
    out = tmp_path / "growth.json"
    argv = ["bench", "growth", "--vary", "dim", "--values", "32", "64", "--tokens", "5"]
    argv += ["--layers", "2", "--batch-size", "2", "--repeats", "1", "--device", "cpu"]
    text = run_cli([*argv, "--threads", "1", "--json", str(out)], capsys)
    assert "measured_over_predicted" in text
    rows = json.loads(out.read_text())["rows"]
    assert [(r["computation"], r["dim"]) for r in rows] == [
        (c, d) for c in ("dmd_moments", "stage2_step", "teacher_fwd") for d in (32, 64)
    ]
    T, L = 5, 2
    for D in (32, 64):  # by hand: 2x2 patches of 16 x 16 x 3 pixels, GELU teacher, SwiGLU surrogate
        teacher = 2 * 4 * 768 * D + L * by_hand_block(T, D, 4 * D, gated=False)
        surrogate = 3 * L * by_hand_block(T, D, 4 * D, gated=True, depth_hidden=16)
        moments = (2 * L + 1) * 2 * T * D * D
        got = {r["computation"]: r["gflop_per_image"] for r in rows if r["dim"] == D}
        assert got["teacher_fwd"] == pytest.approx(teacher / 1e9, rel=1e-12)
        assert got["stage2_step"] == pytest.approx((teacher + surrogate) / 1e9, rel=1e-12)
        assert got["dmd_moments"] == pytest.approx(moments / 1e9, rel=1e-12)
    for name in ("dmd_moments", "stage2_step", "teacher_fwd"):
        small, large = (r for r in rows if r["computation"] == name)
        assert large["measured_over_predicted"] == pytest.approx(1.0)  # the reference size
        ratio = small["gflop_per_image"] / large["gflop_per_image"]
        assert small["predicted_ms_per_image"] == pytest.approx(
            large["measured_ms_per_image"] * ratio
        )
