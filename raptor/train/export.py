"""`raptor export RUN_OR_CKPT --out DIR [--onnx] [--overwrite]`: a distilled backbone.

RUN_OR_CKPT is a `raptor fit` run folder (its checkpoints/last.ckpt) or a .ckpt
file: a stage-2 run, or a stage-1 run that trained all k blocks; stage-1 runs of
one block each (SLURM arrays) are joined by commas, as for `train.init_from`.
Checkpoints are read with `torch.load(weights_only=True)`. They hold the Raptor
but not the teacher, which is rebuilt from the run's stored config
(`teacher.weights`, or the hub when `teacher.pretrained`); `--teacher-weights`
points at the file when it has moved.

DIR receives `config.json`, `model.safetensors` and a `README.md` model card
(`raptor.model.backbone`, `raptor.model.card`), which
`raptor.RaptorBackbone.from_pretrained(DIR)` loads without the training stack. The card
shows the run's evaluation when the pipeline's `k{K}/eval/eval.json` beside a `k{K}/stage2`
run (RUN/eval/eval.json otherwise) evaluated the exported checkpoint; its
`fidelity.png` is copied beside the card.
The export is checked before it is reported: the backbone read back from DIR (which
checks the weights' sha256 and the self-test config.json records) must give the in-training model's output, teacher.embed -> Raptor ->
teacher.final_norm, on random images (relative error <= 1e-5 in float32 on
CPU). `--onnx` also writes `model.onnx` (input `images` (B, C, H, W) at the
exported resolution, batch dynamic; outputs `tokens` (B, T, D) and `pooled`
(B, 2D)) and checks it in onnxruntime against torch (relative error <= 1e-4).
Relative error = max |a - b| / max |b| over all outputs.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

import raptor
from raptor.config import ConfigError, from_container
from raptor.data.stream import resolve_transform_config
from raptor.eval.fidelity import EVAL_FILE
from raptor.model.backbone import (
    CARD_NAME,
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    ONNX_NAME,
    WEIGHTS_NAME,
    RaptorBackbone,
)
from raptor.model.teacher import Teacher
from raptor.run_folders import beside_stage2
from raptor.train.checkpoints import load_raptor

TORCH_TOLERANCE = 1e-5  # read-back backbone vs the in-training model (float32, CPU)
ONNX_TOLERANCE = 1e-4  # onnxruntime vs torch
CHECK_IMAGES = 2  # random images used by both checks
PLOT_NAME = "fidelity.png"  # `raptor eval`'s plot, shown by the card
_WRITTEN = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, PLOT_NAME, ONNX_NAME, ONNX_NAME + ".data")


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


def teacher_weights_source(t: Any) -> str:
    """Where the teacher's weights came from, for the card (`load_teacher` needs one)."""
    if t.weights:
        return f"the file `{t.weights}`"
    return f"timm's pretrained `{t.name}` (Hugging Face Hub)"


def training_info(cfg: Any) -> Dict[str, Any]:
    """The run's stages, their configured steps and its training data, for the card."""
    d = cfg.data
    return {
        "stages": [int(s) for s in cfg.train.stages],
        "steps": {str(s): int(cfg.train[f"stage{s}"].steps) for s in cfg.train.stages},
        "data": {
            "source": str(d.source),
            "where": d.train_urls or d.shards_dir or "(not recorded)",
            "batch_size": int(d.batch_size),
            "devices": str(cfg.trainer.devices),
            "nodes": int(cfg.trainer.num_nodes),
        },
    }


def find_evaluation(source: str | Path, checkpoints: List[Path]) -> Optional[Path]:
    """The pipeline's eval.json for `source` when it evaluated these checkpoints, else None."""
    if "," in str(source):
        return None
    path = beside_stage2(source, "eval") / EVAL_FILE
    if not path.is_file():
        return None
    evaluated = json.loads(path.read_text()).get("checkpoint", "")
    same = [Path(c).resolve() for c in evaluated.split(",")] == [p.resolve() for p in checkpoints]
    return path if same else None


def card_evaluation(path: Path) -> Dict[str, Any]:
    """The card's summary of an eval.json: top-1, per-layer R^2 (all tokens) of the Raptor,
    the identity and each DMD baseline, and the plot's name when the plot is beside it."""
    ev = json.loads(path.read_text())
    r2 = {"Raptor": ev["student"]["r2"]["all"], "identity": ev["identity"]["r2"]["all"]}
    r2.update({f"DMD {name}": v["r2"]["all"] for name, v in (ev.get("dmd") or {}).items()})
    return {
        "file": str(path),
        "images": ev["images"],
        "complete": ev.get("complete", True),
        "layers": ev["layers"],
        "top1": ev["top1"],
        "r2": r2,
        "plot": PLOT_NAME if (path.parent / PLOT_NAME).is_file() else None,
    }


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


def backbone_config(
    teacher: Any,
    model: Any,
    cfg: Any,
    source: Dict[str, Any],
    evaluation: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """config.json for `teacher`'s stem and final norm around the Raptor `model`
    (`save_pretrained` adds the weights' sha256 and the self-test)."""
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
        "teacher": {
            "name": teacher.arch["name"],
            "kwargs": teacher.arch.get("kwargs", {}),
            "weights": teacher_weights_source(cfg.teacher),
        },
        "source": source,
        "evaluation": evaluation,
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


class Progress:
    """Calls `say` with each finished step and the seconds it took (since the last call)."""

    def __init__(self, say: Optional[Callable[[str], None]]):
        self.say = say
        self.last = time.perf_counter()

    def __call__(self, what: str) -> None:
        now = time.perf_counter()
        if self.say is not None:
            self.say(f"export: {what} ({now - self.last:.1f} s)")
        self.last = now


def export_onnx(
    backbone: RaptorBackbone, out: Path, opset: int = 18, progress: Optional[Progress] = None
) -> float:
    """Write out/model.onnx and return its relative error in onnxruntime vs torch."""
    progress = progress or Progress(None)
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
    progress(f"wrote {ONNX_NAME} (opset {opset})")
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
    progress(f"checked {ONNX_NAME} in onnxruntime: relative error {err:.2e}")
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
    progress: Optional[Callable[[str], None]] = None,
) -> Path:
    """Export RUN_OR_CKPT (see the module docstring) into `out`; returns `out`.

    `report`, when given, receives {"torch_rel_error", "onnx_rel_error" (with onnx),
    "files", "evaluation" (the eval.json shown by the card, or None)}; `progress`, when
    given, is called with a line per finished step and its time. Raises ExportError (a
    ConfigError) or BackboneFormatError with a clear message; refuses a non-empty `out`
    unless `overwrite`.
    """
    step = Progress(progress)
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
        "training": training_info(cfg),
    }
    step(f"loaded {', '.join(map(str, paths))} and the teacher {teacher.arch['name']}")
    eval_file = find_evaluation(source, paths)
    evaluation = card_evaluation(eval_file) if eval_file else None
    config = backbone_config(teacher, model, cfg, info, evaluation)
    backbone = RaptorBackbone(config)
    backbone.load_state_dict(backbone_state(teacher, model), strict=True)
    if evaluation and evaluation["plot"]:
        backbone.files[PLOT_NAME] = (eval_file.parent / PLOT_NAME).read_bytes()

    prepare_out(out, overwrite)
    backbone.save_pretrained(out)
    step(
        f"wrote {CONFIG_NAME}, {WEIGHTS_NAME}, {CARD_NAME} (evaluation: "
        f"{eval_file or 'none found'})"
    )
    reloaded = RaptorBackbone.from_pretrained(out)
    result: Dict[str, Any] = {"torch_rel_error": check_against_training(reloaded, teacher, model)}
    step(
        "verified: read back (sha256, self-test) vs the in-training model, relative error "
        f"{result['torch_rel_error']:.2e}"
    )
    if onnx:
        result["onnx_rel_error"] = export_onnx(reloaded, out, opset, step)
    result["files"] = sorted(p.name for p in out.iterdir() if p.name in _WRITTEN)
    result["evaluation"] = str(eval_file) if eval_file else None
    if report is not None:
        report.update(result)
    return out
