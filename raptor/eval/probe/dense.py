"""Dense linear probes on patch tokens: semantic segmentation and depth (issue 14 items 2, 3).

Both follow the `ProbeTask` interface of `raptor.eval.probe.tasks`: `select` keeps one layer's
patch tokens (n, P, D) in raster order (depth: [patch ; cls] (n, P, 2D) with `use_cls`, the
Raptor paper's NYUv2 input, its Appendix B.3 / Table 6); `head(dim, grid)` is linear per
patch and returns (n, C, h, w) on the patch grid; `loss` and the metrics upsample it
(bilinear) to the target's (H, W) first.

- SegTask (DINOv2's linear protocol, the paper's ADE20k probe): optional BatchNorm over
  the D channels, then a 1x1 convolution to the classes; cross-entropy ignoring void (255).
  Metrics (torchmetrics, over every non-void pixel of the set): `miou`, the mean over the
  classes present in the target or the prediction of TP / (TP + FP + FN), and `pixel_acc`,
  the fraction of non-void pixels predicted right (fractions, not percent).
- DepthTask: a 1x1 convolution to `bins` logits, softmax, depth = the probability-weighted
  centre of `bins` bins evenly spaced in [depth_min, depth_max] (DINOv2's linear depth head;
  bins = 0: depth = sigmoid(1x1 conv) x depth_max). Loss: the scale-invariant log loss of
  Bhat et al. (2021, AdaBins), the paper's NYUv2 choice: 10 sqrt(mean(g^2) - lambda
  mean(g)^2), g = log(pred) - log(depth) over the batch's valid pixels (depth > 0), pred
  clamped to >= depth_min. Metrics, per image over its valid pixels, then averaged over the
  images having any: `rmse` (metres), `abs_rel` = mean(|pred - depth| / depth), `delta1` =
  fraction with max(pred / depth, depth / pred) < 1.25.

`plot_examples` draws a few images beside their ground truth and prediction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raptor.config import ConfigError

VOID = 255  # the ignore index of segmentation targets (raptor.data.dense)


def upsample(out: Tensor, size: Sequence[int]) -> Tensor:
    """(n, C, h, w) -> (n, C, H, W), bilinear (align_corners=False)."""
    if tuple(out.shape[-2:]) == tuple(size):
        return out
    return F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=False)


class PatchLinear(nn.Module):
    """Patch tokens (n, P, D) -> (n, out, h, w): the tokens laid out on the (h, w) grid, an
    optional BatchNorm over D, a 1x1 convolution (one linear map shared by every patch)."""

    def __init__(self, dim: int, out: int, grid: Tuple[int, int], batchnorm: bool = False):
        super().__init__()
        self.grid = (int(grid[0]), int(grid[1]))
        self.norm = nn.BatchNorm2d(dim) if batchnorm else nn.Identity()
        self.conv = nn.Conv2d(dim, out, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        n, p, d = x.shape
        h, w = self.grid
        if p != h * w:
            raise ValueError(f"{p} patch tokens do not fill the {h}x{w} patch grid")
        return self.conv(self.norm(x.float().transpose(1, 2).reshape(n, d, h, w)))


class BinnedDepth(nn.Module):
    """(n, bins, h, w) logits -> (n, 1, h, w) depth: softmax-weighted mean of bin centres."""

    def __init__(self, linear: PatchLinear, centres: Tensor):
        super().__init__()
        self.linear = linear
        self.register_buffer("centres", centres.view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        probs = self.linear(x).softmax(dim=1)
        return (probs * self.centres).sum(dim=1, keepdim=True)


class SigmoidDepth(nn.Module):
    """(n, 1, h, w) -> sigmoid x depth_max (DINOv2's regression head without bins)."""

    def __init__(self, linear: PatchLinear, depth_max: float):
        super().__init__()
        self.linear, self.depth_max = linear, float(depth_max)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.linear(x)) * self.depth_max


def _grid(grid: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    if grid is None:
        raise ValueError("a dense probe head needs the patch grid (h, w)")
    return grid


class SegMetrics:
    """mIoU and pixel accuracy (torchmetrics) of upsampled, argmax'd logits; void ignored."""

    def __init__(self, num_classes: int):
        from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

        self.iou = MulticlassJaccardIndex(num_classes, average="macro", ignore_index=VOID)
        self.acc = MulticlassAccuracy(num_classes, average="micro", ignore_index=VOID)

    def update(self, out: Tensor, target: Tensor) -> None:
        pred = upsample(out.float(), target.shape[-2:]).argmax(dim=1).cpu()
        target = target.long().cpu()
        self.iou.update(pred, target)
        self.acc.update(pred, target)

    def compute(self) -> Dict[str, float]:
        return {"miou": float(self.iou.compute()), "pixel_acc": float(self.acc.compute())}


class DepthMetrics:
    """RMSE, abs-rel and delta<1.25 per image over its valid pixels (depth > 0), averaged
    over the images that have any."""

    def __init__(self) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64)
        self.images = 0

    def update(self, out: Tensor, target: Tensor) -> None:
        pred = upsample(out.float(), target.shape[-2:])[:, 0].double().cpu()
        target = target.double().cpu()
        for p, t in zip(pred, target):
            valid = t > 0
            if not valid.any():
                continue
            p, t = p[valid], t[valid]
            ratio = torch.maximum(p / t, t / p)
            self.sums += torch.stack(
                [
                    (p - t).pow(2).mean().sqrt(),
                    ((p - t).abs() / t).mean(),
                    (ratio < 1.25).double().mean(),
                ]
            )
            self.images += 1

    def compute(self) -> Dict[str, float]:
        if not self.images:
            return {k: float("nan") for k in ("rmse", "abs_rel", "delta1")}
        rmse, abs_rel, delta1 = (self.sums / self.images).tolist()
        return {"rmse": rmse, "abs_rel": abs_rel, "delta1": delta1}


class SegTask:
    """Semantic segmentation on patch tokens (module doc)."""

    name = "seg"
    target_key = "target"
    primary = "miou"
    higher_is_better = True

    def __init__(self, num_classes: int, batchnorm: bool = True):
        if int(num_classes) < 1:
            raise ConfigError(f"a seg probe needs the shards' classes, got {num_classes}")
        self.num_classes, self.batchnorm = int(num_classes), bool(batchnorm)

    @classmethod
    def from_config(cls, num_classes: int, cfg: Any) -> SegTask:
        """From a DenseProbeConfig section."""
        return cls(num_classes, batchnorm=bool(cfg.seg_batchnorm))

    def select(self, tokens: Tensor, groups: Dict[str, slice]) -> Tensor:
        return tokens[:, groups["patch"]]

    def head(self, dim: int, grid: Optional[Tuple[int, int]] = None) -> nn.Module:
        return PatchLinear(dim, self.num_classes, _grid(grid), self.batchnorm)

    def loss(self, out: Tensor, target: Tensor) -> Tensor:
        target = target.long()
        if not (target != VOID).any():  # nothing to learn from (e.g. padding rows only)
            return out.sum() * 0.0
        return F.cross_entropy(upsample(out, target.shape[-2:]), target, ignore_index=VOID)

    def predict(self, out: Tensor, size: Sequence[int]) -> Tensor:
        """Class indices (n, H, W)."""
        return upsample(out.float(), size).argmax(dim=1)

    def metrics(self) -> SegMetrics:
        return SegMetrics(self.num_classes)


class DepthTask:
    """Monocular depth on patch tokens (module doc); `num_classes` is unused (the runner's
    task factories all take it)."""

    name = "depth"
    target_key = "target"
    primary = "rmse"
    higher_is_better = False

    def __init__(
        self,
        num_classes: int = 0,
        bins: int = 256,
        depth_min: float = 1e-3,
        depth_max: float = 10.0,
        use_cls: bool = True,
        silog_lambda: float = 0.85,
    ):
        if not 0 < depth_min < depth_max:
            raise ConfigError(
                f"depth probe: depth_min={depth_min} and depth_max={depth_max} must satisfy "
                "0 < depth_min < depth_max"
            )
        self.bins, self.use_cls = int(bins), bool(use_cls)
        self.depth_min, self.depth_max = float(depth_min), float(depth_max)
        self.silog_lambda = float(silog_lambda)

    @classmethod
    def from_config(cls, num_classes: int, cfg: Any) -> DepthTask:
        """From a DenseProbeConfig section."""
        return cls(
            num_classes,
            bins=int(cfg.depth_bins),
            depth_min=float(cfg.depth_min),
            depth_max=float(cfg.depth_max),
            use_cls=bool(cfg.depth_cls),
            silog_lambda=float(cfg.silog_lambda),
        )

    def select(self, tokens: Tensor, groups: Dict[str, slice]) -> Tensor:
        patch = tokens[:, groups["patch"]]
        if not self.use_cls:
            return patch
        cls = tokens[:, groups["cls"]][:, :1].expand(-1, patch.shape[1], -1)
        return torch.cat([patch, cls], dim=-1)

    def head(self, dim: int, grid: Optional[Tuple[int, int]] = None) -> nn.Module:
        grid = _grid(grid)
        if self.bins:
            centres = torch.linspace(self.depth_min, self.depth_max, self.bins)
            return BinnedDepth(PatchLinear(dim, self.bins, grid), centres)
        return SigmoidDepth(PatchLinear(dim, 1, grid), self.depth_max)

    def loss(self, out: Tensor, target: Tensor) -> Tensor:
        pred = upsample(out, target.shape[-2:])[:, 0]
        valid = target > 0
        if not valid.any():
            return out.sum() * 0.0
        g = pred[valid].clamp_min(self.depth_min).log() - target[valid].float().log()
        d = g.pow(2).mean() - self.silog_lambda * g.mean().pow(2)
        return 10.0 * d.clamp_min(1e-12).sqrt()

    def predict(self, out: Tensor, size: Sequence[int]) -> Tensor:
        """Depth in metres (n, H, W)."""
        return upsample(out.float(), size)[:, 0]

    def metrics(self) -> DepthMetrics:
        return DepthMetrics()


def plot_examples(
    task: Any,
    images: Tensor,
    targets: Tensor,
    outs: Tensor,
    path: str | Path,
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
    title: str = "",
) -> Path:
    """A PNG with one row per example: the image (normalized (n, 3, H, W), un-normalized with
    mean/std), its ground truth and the head's prediction (`outs`, the head's output).
    Masks in a fixed colour per class (void black); depth on one colour scale per row,
    no depth black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(images)
    pred = task.predict(outs, targets.shape[-2:]).cpu()
    shown = images.float().cpu() * torch.tensor(std).view(1, -1, 1, 1)
    shown = (shown + torch.tensor(mean).view(1, -1, 1, 1)).clamp(0, 1).permute(0, 2, 3, 1)
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n), squeeze=False)
    for i in range(n):
        truth = targets[i].cpu()
        axes[i, 0].imshow(shown[i].numpy())
        if task.name == "seg":
            palette = np.random.default_rng(0).random((256, 3))
            palette[VOID] = 0.0
            for ax, m in ((axes[i, 1], truth), (axes[i, 2], pred[i])):
                ax.imshow(palette[m.long().clamp(0, 255).numpy()])
        else:
            valid = truth > 0
            lo = float(truth[valid].min()) if valid.any() else 0.0
            hi = float(truth[valid].max()) if valid.any() else 1.0
            cmap = matplotlib.colormaps["viridis"].with_extremes(bad="black")
            masked = np.ma.masked_where(~valid.numpy(), truth.numpy())
            axes[i, 1].imshow(masked, cmap=cmap, vmin=lo, vmax=hi)
            axes[i, 2].imshow(pred[i].numpy(), cmap=cmap, vmin=lo, vmax=hi)
        for ax, name in zip(axes[i], ("image", "truth", "prediction")):
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
