"""`raptor export RUN_OR_CKPT --out DIR [--onnx] [--overwrite]`: a distilled backbone.

RUN_OR_CKPT is a `raptor fit` run folder (its checkpoints/last.ckpt) or a .ckpt
file: a stage-2 run, or a stage-1 run that trained all k blocks; stage-1 runs of
one block each (SLURM arrays) are joined by commas, as for `train.init_from`.
Checkpoints are read with `torch.load(weights_only=True)`. They hold the Raptor
but not the teacher, which is rebuilt from the run's stored config
(`teacher.weights`, or the hub when `teacher.pretrained`); `--teacher-weights`
points at the file when it has moved.

DIR receives `config.json` and `model.safetensors` (`raptor.model.backbone`), which
`raptor.RaptorBackbone.from_pretrained(DIR)` loads without the training stack.
The export is checked before it is reported: the backbone read back from DIR
must give the in-training model's output, teacher.embed -> Raptor ->
teacher.final_norm, on random images (relative error <= 1e-5 in float32 on
CPU). `--onnx` also writes `model.onnx` (input `images` (B, C, H, W) at the
exported resolution, batch dynamic; outputs `tokens` (B, T, D) and `pooled`
(B, 2D)) and checks it in onnxruntime against torch (relative error <= 1e-4).
Relative error = max |a - b| / max |b| over all outputs.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

import raptor
from raptor.config import ConfigError, from_container
from raptor.data.stream import resolve_transform_config
from raptor.model.backbone import (
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    ONNX_NAME,
    WEIGHTS_NAME,
    RaptorBackbone,
)
from raptor.model.teacher import Teacher
from raptor.train.checkpoints import load_raptor

TORCH_TOLERANCE = 1e-5  # read-back backbone vs the in-training model (float32, CPU)
ONNX_TOLERANCE = 1e-4  # onnxruntime vs torch
CHECK_IMAGES = 2  # random images used by both checks
_WRITTEN = (CONFIG_NAME, WEIGHTS_NAME, ONNX_NAME, ONNX_NAME + ".data")


class ExportError(ConfigError):
    """The source cannot be exported, or the exported backbone failed its check."""


# ---------------------------------------------------------------------- sources


def load_teacher(cfg: Any, teacher_weights: Optional[str]):
    """The run's teacher, rebuilt from its stored config (a separate head is not needed)."""
    t = cfg.teacher
    if teacher_weights:
        t.weights = str(teacher_weights)
    if not t.weights and not t.pretrained:
        raise ExportError(
            "export: the run's teacher has neither teacher.weights nor teacher.pretrained, so its "
            "weights cannot be rebuilt; pass --teacher-weights PATH"
        )
    t.head = ""
    return Teacher.from_config(t)


# ---------------------------------------------------------------------- config


def _norm_spec(module: nn.Module, what: str) -> Optional[Dict[str, Any]]:
    """None for no norm; the LayerNorm settings (torch's or timm's LayerNorm class)."""
    if isinstance(module, nn.Identity):
        return None
    if isinstance(module, nn.LayerNorm) and type(module).__name__ == "LayerNorm":
        return {
            "type": "layernorm",
            "eps": float(module.eps),
            "affine": bool(module.elementwise_affine),
            "bias": module.bias is not None,
        }
    raise ExportError(
        f"export: the teacher's {what} is a {type(module).__name__}; the backbone format "
        "supports LayerNorm or no norm"
    )


def stem_config(vit: nn.Module) -> Dict[str, Any]:
    """The teacher ViT's embedding settings (timm VisionTransformer) as plain JSON."""
    pe = vit.patch_embed
    proj = pe.proj
    if (
        not isinstance(proj, nn.Conv2d)
        or tuple(proj.kernel_size) != tuple(pe.patch_size)
        or tuple(proj.stride) != tuple(pe.patch_size)
        or any(proj.padding)
    ):
        raise ExportError(
            "export: the teacher's patch embedding is not a Conv2d with kernel = stride = patch size"
        )
    return {
        "img_size": list(pe.img_size),
        "patch_size": list(pe.patch_size),
        "in_chans": int(proj.in_channels),
        "embed_dim": int(vit.embed_dim),
        "patch_bias": proj.bias is not None,
        "patch_norm": _norm_spec(pe.norm, "patch-embedding norm"),
        "class_token": True,
        "reg_tokens": int(vit.num_reg_tokens),
        "pos_embed": "none" if vit.pos_embed is None else "learned",
        "no_embed_class": bool(vit.no_embed_class),
        "norm_pre": _norm_spec(vit.norm_pre, "pre-norm (norm_pre)"),
    }


def preprocessing(data_config: Dict[str, Any], transform: Any) -> Dict[str, Any]:
    """The evaluation transform the run used (`raptor.data.stream.resolve_transform_config`: the
    teacher's timm data config with the `data.transform` overrides), as JSON."""
    resolved = resolve_transform_config(data_config, transform)
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return {
        k: list(resolved[k]) if isinstance(resolved[k], tuple) else resolved[k]
        for k in keys
        if k in resolved
    }


def backbone_config(teacher: Any, model: Any, cfg: Any, source: Dict[str, Any]) -> Dict[str, Any]:
    """config.json for `teacher`'s stem and final norm around the Raptor `model`."""
    if (model.num_layers, model.dim) != (teacher.num_layers, teacher.embed_dim):
        raise ExportError(
            f"export: the Raptor has {model.num_layers} layers of width {model.dim}, the teacher "
            f"{teacher.num_layers} of width {teacher.embed_dim}; the run's config has changed"
        )
    arch = model.arch_config()
    stem = stem_config(teacher.vit)
    r = teacher.num_reg_tokens
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "raptor_version": raptor.__version__,
        "architecture": arch,
        "phases": {
            **model.partition.to_json(),
            "layers_of_block": [list(p) for p in model.partition.phases],
        },
        "depth_conditioning": {
            "enabled": bool(arch["depth_conditioning"]),
            "formula": arch["depth_formula"],
            "hidden": arch["depth_hidden"],
        },
        "tokens": {
            "layout": "[cls, reg_1..reg_R, patch_1..patch_P], patches row-major",
            "num_tokens": teacher.num_tokens,
            "cls": 1,
            "reg": r,
            "patch": teacher.num_tokens - 1 - r,
            "grid": [s // p for s, p in zip(stem["img_size"], stem["patch_size"])],
        },
        "stem": stem,
        "final_norm": _norm_spec(teacher.vit.norm, "final norm") or {"type": "identity"},
        "preprocessing": preprocessing(teacher.data_config, cfg.data.transform),
        "teacher": {"name": teacher.arch["name"], "kwargs": teacher.arch.get("kwargs", {})},
        "source": source,
    }


def backbone_state(teacher: Any, model: Any) -> Dict[str, torch.Tensor]:
    """Backbone state dict: the teacher ViT's stem and final norm, the Raptor's blocks."""
    state = {}
    for key, value in teacher.vit.state_dict().items():
        if key.startswith(("patch_embed.", "norm_pre.")) or key in (
            "cls_token",
            "reg_token",
            "pos_embed",
        ):
            state["stem." + key] = value
        elif key.startswith("norm."):
            state[key] = value
    state.update({"raptor." + k: v for k, v in model.state_dict().items()})
    return state


# ---------------------------------------------------------------------- checks


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|."""
    return float(
        (got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)
    )


def check_images(backbone: RaptorBackbone, n: int = CHECK_IMAGES) -> torch.Tensor:
    """Fixed random inputs at the exported resolution (normalized images are ~N(0, 1))."""
    stem = backbone.stem
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, stem.in_chans, *stem.img_size, generator=g)


@torch.no_grad()
def check_against_training(backbone: RaptorBackbone, teacher: Any, model: Any) -> float:
    """Relative error of backbone.forward_features vs teacher.embed -> Raptor -> final norm."""
    images = check_images(backbone)
    reference = teacher.final_norm(model(teacher.embed(images))[:, -1])
    err = relative_error(backbone.forward_features(images), reference)
    if not err <= TORCH_TOLERANCE:
        raise ExportError(
            f"export: the exported backbone differs from the in-training model (relative error "
            f"{err:.3g} > {TORCH_TOLERANCE:g})"
        )
    return err


class _OnnxGraph(nn.Module):
    def __init__(self, backbone: RaptorBackbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor):
        tokens = self.backbone.forward_features(images)
        return tokens, self.backbone.pool(tokens)


def export_onnx(backbone: RaptorBackbone, out: Path, opset: int = 18) -> float:
    """Write out/model.onnx and return its relative error in onnxruntime vs torch."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError(
            "export --onnx needs onnx, onnxscript and onnxruntime: pip install 'raptor-vit[onnx]'"
        ) from None
    graph = _OnnxGraph(backbone.eval())
    images = check_images(backbone)
    path = out / ONNX_NAME
    nbytes = sum(p.numel() * p.element_size() for p in backbone.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (images,),
            str(path),
            input_names=["images"],
            output_names=["tokens", "pooled"],
            opset_version=opset,
            dynamo=True,
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
            external_data=nbytes > 1_800_000_000,  # protobuf's 2 GB limit
            verbose=False,
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        ref = graph(images)
    err = max(relative_error(torch.from_numpy(g), r) for g, r in zip(got, ref))
    if not err <= ONNX_TOLERANCE:
        raise ExportError(
            f"export: {path} differs from torch in onnxruntime (relative error {err:.3g} > "
            f"{ONNX_TOLERANCE:g}); the file is left there for inspection"
        )
    return err


# ---------------------------------------------------------------------- export


def prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty folder unless `overwrite`; then drop our stale files."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"export --out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(
                f"export --out {out}: the folder is not empty; pass --overwrite to replace its "
                f"export files ({', '.join(_WRITTEN)})"
            )
        for name in _WRITTEN:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def export_backbone(
    source: str | Path,
    out: str | Path,
    onnx: bool = False,
    overwrite: bool = False,
    *,
    opset: int = 18,
    teacher_weights: Optional[str] = None,
    report: Optional[Dict[str, Any]] = None,
) -> Path:
    """Export RUN_OR_CKPT (see the module docstring) into `out`; returns `out`.

    `report`, when given, receives {"torch_rel_error", "onnx_rel_error" (with onnx),
    "files"}. Raises ExportError (a ConfigError) or BackboneFormatError with a clear
    message; refuses a non-empty `out` unless `overwrite`.
    """
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        prepare_out(out, overwrite)  # raises before any heavy work
    model, ckpts, paths = load_raptor(source, ExportError)
    model.eval()
    hp = ckpts[0]["hyper_parameters"]
    cfg = from_container(hp["config"])
    teacher = load_teacher(cfg, teacher_weights)
    info = {
        "checkpoints": [str(p) for p in paths],
        "stage": int(hp.get("stage", 0)),
        "global_step": [int(c.get("global_step", -1)) for c in ckpts],
        "run_name": str(cfg.name),
    }
    config = backbone_config(teacher, model, cfg, info)
    backbone = RaptorBackbone(config)
    backbone.load_state_dict(backbone_state(teacher, model), strict=True)

    prepare_out(out, overwrite)
    backbone.save_pretrained(out)
    reloaded = RaptorBackbone.from_pretrained(out)
    result: Dict[str, Any] = {"torch_rel_error": check_against_training(reloaded, teacher, model)}
    if onnx:
        result["onnx_rel_error"] = export_onnx(reloaded, out, opset)
    result["files"] = sorted(p.name for p in out.iterdir() if p.name in _WRITTEN)
    if report is not None:
        report.update(result)
    return out
