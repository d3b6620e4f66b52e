"""Analytic FLOP and byte counts from model shapes, and device peaks to compare against.

Conventions
-----------
- A multiply-add is 2 FLOPs. Only matrix products are counted (linear layers,
  the patch-embedding convolution, the two attention products QK^T and AV);
  norms, activations, softmax, residual adds and the loss are left out. This is
  what `torch.utils.flop_counter.FlopCounterMode` counts, and the tests check the
  two agree.
- Attention over T tokens of width D costs 4 T^2 D whatever the number of heads.
- Training cost of a block application = 3 x its forward (forward + backward,
  the backward being one product for the input gradient and one for the weight
  gradient). These are *model* FLOPs, the MFU convention: the recomputation done
  by flash attention's backward or by activation checkpointing is not counted,
  so a run with checkpointing does more arithmetic than it is credited with.
- All counts are per image.

Stage costs (per image, per optimizer step):
- teacher: patch embedding + the teacher blocks that the step needs (no head);
- stage 2: the surrogate rolls a_0 through all L layers, fwd+bwd:
  3 x L block applications;
- stage 1: for every trained block with phase (first, last) of n = last-first+1
  layers, the autoregressive rollout (n applications) and, while the
  teacher-forcing weight r > 0, the teacher-forcing pass (another n): so
  3 x n x (2 if r > 0 else 1); the teacher runs up to the last layer of the
  last trained phase.
- DMD moments: every Gram X_l^T X_l (l = 0..L) and every cross moment
  X_l^T X_{l+1} (plus requested endpoint pairs) is one (d x T)(T x d) product,
  2 T d^2, accumulated in float64.

Byte counts: parameters (per block, teacher), one image's trajectory
(L+1) x T x D, and the d x d moment matrices that DMD keeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from torch import nn

# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class BlockShape:
    """One pre-norm transformer block: width `dim`, MLP hidden width per branch
    `mlp_hidden`, `mlp` gelu (fc1: D->H) or swiglu (fc1: D->2H), and the depth
    conditioning MLP (1 -> depth_hidden -> 3D; 0 = none)."""

    dim: int
    mlp_hidden: int
    mlp: str = "gelu"
    depth_hidden: int = 0
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"BlockShape.mlp must be 'gelu' or 'swiglu', got '{self.mlp}'")


@dataclass(frozen=True)
class ViTShape:
    """A ViT: patch embedding of `num_patches` patches of patch_size^2 x in_chans
    pixels, `num_prefix` prefix tokens (cls + registers), `depth` blocks."""

    num_patches: int
    patch_size: int
    in_chans: int
    num_prefix: int
    depth: int
    block: BlockShape

    @property
    def tokens(self) -> int:
        return self.num_patches + self.num_prefix


def block_shape(block: nn.Module) -> BlockShape:
    """The shape of a built block: a timm ViT `Block` or a Raptor `RecurrentBlock`.

    Reads the MLP's fc1/fc2 (swiglu when fc1 is twice as wide as fc2's input, the
    packed gate+value layout of both timm's SwiGLUPacked and Raptor's Mlp) and
    the depth conditioning layers when present."""
    fc1, fc2 = block.mlp.fc1, block.mlp.fc2
    hidden = int(fc2.in_features)
    swiglu = int(fc1.out_features) == 2 * hidden
    depth_in = (
        getattr(block, "depth_in", None) if getattr(block, "depth_conditioning", False) else None
    )
    return BlockShape(
        dim=int(fc1.in_features),
        mlp_hidden=hidden,
        mlp="swiglu" if swiglu else "gelu",
        depth_hidden=int(depth_in.out_features) if depth_in is not None else 0,
        qkv_bias=block.attn.qkv.bias is not None,
    )


def vit_shape(vit: nn.Module) -> ViTShape:
    """The shape of a timm VisionTransformer (at its built image size)."""
    pe = vit.patch_embed
    return ViTShape(
        num_patches=int(pe.num_patches),
        patch_size=int(pe.patch_size[0]) * int(pe.patch_size[1]),
        in_chans=int(pe.proj.in_channels),
        num_prefix=int(vit.num_prefix_tokens),
        depth=len(vit.blocks),
        block=block_shape(vit.blocks[0]),
    )


# --------------------------------------------------------------------------- FLOPs


def block_flop_terms(shape: BlockShape, tokens: int) -> Dict[str, int]:
    """Forward FLOPs of one block on one image of `tokens` tokens, by term."""
    T, D, H = tokens, shape.dim, shape.mlp_hidden
    fc1_out = 2 * H if shape.mlp == "swiglu" else H
    return {
        "qkv": 2 * T * D * 3 * D,
        "attention": 4 * T * T * D,  # QK^T and AV, all heads together
        "proj": 2 * T * D * D,
        "mlp": 2 * T * D * fc1_out + 2 * T * H * D,
        "depth": 2 * shape.depth_hidden + 2 * shape.depth_hidden * 3 * D,  # once per image
    }


def block_forward_flops(shape: BlockShape, tokens: int) -> int:
    """Forward FLOPs of one block application on one image."""
    return sum(block_flop_terms(shape, tokens).values())


def patch_embed_flops(vit: ViTShape) -> int:
    """The patch-embedding convolution: one (patch_size x in_chans) -> D product per patch."""
    return 2 * vit.num_patches * vit.patch_size * vit.in_chans * vit.block.dim


def teacher_forward_flops(vit: ViTShape, upto: Optional[int] = None) -> int:
    """Patch embedding + blocks 1..upto (default all) on one image (no head)."""
    upto = vit.depth if upto is None else int(upto)
    return patch_embed_flops(vit) + upto * block_forward_flops(vit.block, vit.tokens)


@dataclass(frozen=True)
class StepFlops:
    """FLOPs per image of one training step: the teacher's forward and the
    surrogate's forward + backward (3 x forward), and their sum."""

    teacher: int
    surrogate: int
    applications: int  # surrogate block applications per image (forward)

    @property
    def total(self) -> int:
        return self.teacher + self.surrogate


def stage2_flops(
    teacher: ViTShape, block: BlockShape, num_layers: Optional[int] = None
) -> StepFlops:
    """Stage 2: teacher forward over all L layers + the surrogate's L-step rollout, fwd+bwd."""
    L = teacher.depth if num_layers is None else int(num_layers)
    return StepFlops(
        teacher=teacher_forward_flops(teacher, L),
        surrogate=3 * L * block_forward_flops(block, teacher.tokens),
        applications=L,
    )


def stage1_flops(
    teacher: ViTShape,
    block: BlockShape,
    phases: Sequence[Tuple[int, int]],
    blocks: Optional[Iterable[int]] = None,
    teacher_forcing: bool = True,
) -> StepFlops:
    """Stage 1 for the trained blocks (0-based indices into `phases`, default all):
    the teacher runs up to the last trained layer once; each trained phase of n
    layers costs n (AR) + n (TF, when teacher_forcing) block applications, fwd+bwd."""
    chosen = sorted(set(range(len(phases)) if blocks is None else blocks))
    if not chosen or chosen[0] < 0 or chosen[-1] >= len(phases):
        raise ValueError(f"blocks {chosen} must be a non-empty subset of 0..{len(phases) - 1}")
    n = sum(phases[j][1] - phases[j][0] + 1 for j in chosen)
    apps = n * (2 if teacher_forcing else 1)
    return StepFlops(
        teacher=teacher_forward_flops(teacher, max(phases[j][1] for j in chosen)),
        surrogate=3 * apps * block_forward_flops(block, teacher.tokens),
        applications=apps,
    )


def stage1_separate_ratio(
    teacher: ViTShape,
    block: BlockShape,
    phases: Sequence[Tuple[int, int]],
    teacher_forcing: bool = True,
) -> float:
    """Per-image cost of k single-block stage-1 runs over one run with all k blocks
    (> 1: the joint run is cheaper, it shares one teacher forward)."""
    joint = stage1_flops(teacher, block, phases, None, teacher_forcing).total
    separate = sum(
        stage1_flops(teacher, block, phases, [j], teacher_forcing).total for j in range(len(phases))
    )
    return separate / joint


def dmd_moments_flops(num_layers: int, tokens: int, dim: int, endpoint_pairs: int = 0) -> int:
    """One image through the DMD moments: L+1 Grams, L consecutive cross moments
    and `endpoint_pairs` more, each 2 T d^2 (float64)."""
    products = (num_layers + 1) + num_layers + endpoint_pairs
    return products * 2 * tokens * dim * dim


# --------------------------------------------------------------------------- bytes


def block_params(shape: BlockShape) -> int:
    """Parameters of one block (linear weights and biases, norms, LayerScales, depth MLP)."""
    D, H = shape.dim, shape.mlp_hidden
    fc1_out = 2 * H if shape.mlp == "swiglu" else H
    n = D * 3 * D + (3 * D if shape.qkv_bias else 0) + D * D + D  # qkv, proj
    n += D * fc1_out + fc1_out + H * D + D  # mlp
    n += 2 * 2 * D + 2 * D  # two LayerNorms, two LayerScales
    if shape.depth_hidden:
        n += 2 * shape.depth_hidden + shape.depth_hidden * 3 * D + 3 * D
    return n


def trajectory_bytes(num_layers: int, tokens: int, dim: int, itemsize: int = 4) -> int:
    """One image's hidden states a_0..a_L: what precomputing activations stores per image."""
    return (num_layers + 1) * tokens * dim * itemsize


def dmd_moment_bytes(num_layers: int, dim: int, endpoint_pairs: int = 0, itemsize: int = 8) -> int:
    """The d x d float64 matrices DMD keeps: L+1 Grams + L (+ endpoints) cross moments;
    independent of the number of calibration images."""
    return ((num_layers + 1) + num_layers + endpoint_pairs) * dim * dim * itemsize


# --------------------------------------------------------------------------- device peaks


@dataclass(frozen=True)
class DevicePeak:
    """Dense (no 2:4 sparsity) peak throughput in TFLOP/s from the vendor's datasheet.

    `names`: substrings of `torch.cuda.get_device_name()` that identify it (the
    first entry of PEAKS that matches wins, so more specific names come first).
    tf32 is the tensor-core rate used by float32 matmuls when TF32 is allowed; fp64
    the FP64 tensor-core (DGEMM) rate where the datasheet gives one."""

    label: str
    names: Tuple[str, ...]
    bf16: float
    tf32: float
    fp32: float
    fp64: Optional[float]
    source: str


_H100 = "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet"
_H200 = "https://www.nvidia.com/en-us/data-center/h200/"
_A100 = "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"
_L40S = "https://resources.nvidia.com/en-us-l40s/l40s-datasheet-28413"
_L4 = "https://resources.nvidia.com/en-us-data-center-overview/l4-gpu-datasheet"
_A10 = "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a10/pdf/datasheet-new/nvidia-a10-datasheet.pdf"

# Datasheets quote tensor-core rates "with sparsity"; the dense rate is half of that.
PEAKS: Tuple[DevicePeak, ...] = (
    DevicePeak("H100 NVL", ("H100 NVL",), 835.0, 417.5, 60.0, 60.0, _H100),
    DevicePeak("H100 PCIe", ("H100 PCIe",), 756.0, 378.0, 51.0, 51.0, _H100),
    DevicePeak("H200 NVL", ("H200 NVL",), 835.0, 417.5, 60.0, 60.0, _H200),
    DevicePeak("H200 SXM / GH200", ("H200", "GH200"), 989.4, 494.7, 67.0, 67.0, _H200),
    DevicePeak("H100 SXM", ("H100",), 989.4, 494.7, 67.0, 67.0, _H100),
    DevicePeak("A100", ("A100",), 312.0, 156.0, 19.5, 19.5, _A100),
    DevicePeak("L40S", ("L40S",), 362.05, 183.0, 91.6, None, _L40S),
    DevicePeak("L4", ("L4",), 121.0, 60.0, 30.3, None, _L4),
    DevicePeak("A10", ("A10",), 125.0, 62.5, 31.2, None, _A10),
)


def find_peak(device_name: str) -> Optional[DevicePeak]:
    """The table entry for a `torch.cuda.get_device_name()` string, or None."""
    for peak in PEAKS:
        if any(n.lower() in device_name.lower() for n in peak.names):
            return peak
    return None


def peak_flops(
    device_name: str, dtype: str, override_tflops: Optional[float] = None
) -> Optional[float]:
    """Peak FLOP/s for `dtype` (bf16 | tf32 | fp32 | fp64) on the named device;
    `override_tflops` (TFLOP/s) wins; None when unknown (e.g. a CPU)."""
    if override_tflops is not None:
        return float(override_tflops) * 1e12
    if dtype not in ("bf16", "tf32", "fp32", "fp64"):
        raise ValueError(f"dtype must be bf16, tf32, fp32 or fp64, got '{dtype}'")
    peak = find_peak(device_name)
    value = getattr(peak, dtype) if peak is not None else None
    return None if value is None else value * 1e12


def images_per_second(flops_per_image: float, peak: float, fraction: float) -> float:
    """Throughput implied by running at `fraction` of a `peak` FLOP/s."""
    return fraction * peak / flops_per_image


def peak_table(
    flops_per_image: float, fraction: float, devices: Sequence[DevicePeak] = PEAKS
) -> List[Dict]:
    """Rows {device, bf16_tflops, images_per_s} for `flops_per_image` at `fraction` of bf16 peak."""
    return [
        {
            "device": p.label,
            "bf16_tflops": p.bf16,
            "images_per_s": images_per_second(flops_per_image, p.bf16 * 1e12, fraction),
        }
        for p in devices
    ]
