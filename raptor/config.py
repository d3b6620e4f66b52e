"""Experiment configuration: OmegaConf structured configs built from dataclasses.

A config is one `RaptorConfig`. YAML files in `configs/` set any subset of its
keys (a YAML may name others to compose under `defaults: [file.yaml, ...]`,
later files win); `key=value` overrides from the command line win over both.
Every key is typed: an unknown key or a value of the wrong type fails in
`load_config`, at start-up, with the key's full dotted name and the nearest
valid keys.

Sections: data, teacher, model, phases, train, dmd, logging, trainer (passed
through to `lightning.Trainer`), export, pipeline.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    OmegaConfBaseException,
    ValidationError,
)

from raptor.errors import UserError

# --------------------------------------------------------------------------- sections


@dataclass
class TransformConfig:
    """Evaluation-style preprocessing; every unset key is taken from the teacher's
    timm data config (`timm.data.resolve_data_config`)."""

    input_size: Optional[int] = None  # square side in pixels after crop
    crop_pct: Optional[float] = None  # resize side = input_size / crop_pct, then center crop
    interpolation: Optional[str] = None  # bicubic | bilinear | nearest
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    train_augment: bool = False  # random-resized-crop + flip for training (teacher training)


@dataclass
class DataConfig:
    """Where images come from and how they are streamed.

    source: `digits` (scikit-learn's bundled digits, written to `shards_dir` by the
    pipeline), `imagefolder:PATH` (class folders, written to `shards_dir`), or
    `shards` (use `train_urls` / `val_urls` as given).
    URL patterns use brace expansion (`/data/in1k/train-{000000..001023}.tar`); a
    local folder holding a `manifest.json` is also accepted.
    """

    source: str = "shards"
    shards_dir: str = ""
    train_urls: str = ""
    val_urls: str = ""
    batch_size: int = 64  # per device
    val_batch_size: Optional[int] = None  # per device; default batch_size
    num_workers: int = 4
    shuffle_buffer: int = 2000
    seed: int = 0
    train_samples: Optional[int] = None  # samples per training epoch, all ranks; default: manifest
    val_samples: Optional[int] = None  # default: manifest, else count by reading
    allow_pipe: bool = False  # `pipe:` URLs run shell commands: opt in explicitly
    max_bad_fraction: float = 0.01  # stop when more than this fraction of samples fail
    require_labels: bool = False  # a sample without a valid .cls label is skipped as bad
    # writing shards (`raptor shards`, pipeline)
    shard_size: int = 1000  # samples per shard
    val_fraction: float = 0.2  # digits only
    split_seed: int = 0
    store_crop: Optional[int] = None  # store resize+center-crop JPEGs of this side
    transform: TransformConfig = field(default_factory=TransformConfig)


@dataclass
class TeacherTrainConfig:
    """Training a small teacher from scratch (`raptor teacher`)."""

    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 2
    label_smoothing: float = 0.1
    batch_size: Optional[int] = None  # default data.batch_size
    # torch CPU threads while training (default: torch's); tiny models train fastest on 1,
    # and a shared CPU makes several threads per process spin against each other


@dataclass
class TeacherConfig:
    """The frozen teacher: a timm VisionTransformer.

    `name` is a timm model name. Weights come from `weights` (a local file: timm
    state dict, the official DINOv2 torch.hub `.pth`, or a checkpoint written by
    `raptor teacher`), else from the hub when `pretrained`, else the teacher is
    trained by `raptor teacher` (the pipeline does this when `train_from_scratch`).
    The architecture keys below override timm's defaults for `name` when set.
    """

    name: str = "vit_base_patch14_reg4_dinov2.lvd142m"
    pretrained: bool = False
    weights: str = ""
    head: str = ""  # optional separate linear head on [cls ; mean(patch)] (safetensors/.pth)
    train_from_scratch: bool = False
    img_size: Optional[int] = None
    patch_size: Optional[int] = None
    in_chans: Optional[int] = None
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: Optional[float] = None
    reg_tokens: Optional[int] = None
    num_classes: Optional[int] = None
    drop_path_rate: Optional[float] = None
    init_values: Optional[float] = None  # LayerScale init of the teacher
    train: TeacherTrainConfig = field(default_factory=TeacherTrainConfig)


@dataclass
class ModelConfig:
    """The Raptor surrogate: k weight-tied `RecurrentBlock`s over the phases."""

    k: int = 3
    num_heads: Optional[int] = None  # default: the teacher's
    mlp: str = "swiglu"  # swiglu | gelu
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    ln_eps: float = 1e-5
    layerscale_init: float = 1e-5
    depth_conditioning: bool = True
    depth_hidden: int = 16
    depth_init_std: float = 1e-4


@dataclass
class PhasesConfig:
    """Phase discovery. `boundaries` fixes the partition for `model.k` (skipping
    discovery); otherwise `file` (a phases.json) or the discovery run supplies it."""

    ks: List[int] = field(default_factory=lambda: [2, 3, 4])
    method: str = "dp"  # dp | bisect
    token_mode: str = "cls+patchmean"  # all | cls+patchmean
    num_images: int = 512
    min_length: int = 1
    random_partitions: int = 8  # random contiguous baselines per k (seeded by seed + k)
    seed: int = 0
    boundaries: Optional[List[int]] = None
    file: str = ""


@dataclass
class StageConfig:
    """Optimisation of one distillation stage (steps define the run, not epochs).

    Learning rate: `lr` is for `lr_reference_batch` images per optimizer step; it is
    scaled linearly with the global batch (per-device batch x devices x nodes)
    when `scale_lr` is set (peak lr = lr x global batch / lr_reference_batch; min_lr
    is not scaled). Schedule: linear warmup over `warmup_steps`, cosine to `min_lr`
    at `steps`; AdamW; `grad_clip` is the gradient-norm limit (per block in stage 1).
    Resuming with a different schedule is refused unless `train.schedule_change=apply`.
    Loss per state: w_cls*mean(cls) + w_reg*mean(reg) + w_patch*mean(patch) of the
    squared error (`weighted`) or the plain MSE (`mse`).
    """

    steps: int = 10000
    lr: float = 3e-4
    min_lr: float = 1e-6
    weight_decay: float = 1e-4
    warmup_steps: int = 500
    grad_clip: float = 1.0
    anneal_steps: Optional[int] = None  # teacher-forcing anneal (stage 1); default steps // 4
    w_cls: float = 0.34
    w_reg: float = 0.33
    w_patch: float = 0.33
    loss: str = "weighted"  # weighted | mse | weighted_final (stage 1: weighted for the last phase, mse for the others)
    noise_sigma: float = 0.0  # std of Gaussian noise added to every block input
    lr_reference_batch: int = 256
    scale_lr: bool = False


@dataclass
class TrainConfig:
    stage: int = 1
    blocks: Optional[List[int]] = None  # stage 1: train only these blocks (1-based)
    init_from: str = ""  # stage 2: stage-1 run folder(s)/checkpoint(s), comma-separated
    seed: int = 0
    resume: str = "auto"  # auto | never | PATH to a checkpoint
    # a resume whose schedule (the stage's steps, lr, min_lr, warmup_steps, anneal_steps,
    # weight_decay, or the peak lr from scale_lr x global batch) differs from the
    # checkpoint's: `refuse` (names the keys, old -> new) or `apply`: from the resumed step
    # s on, lr = the new warmup + cosine at s (as if the run had used it from step 0),
    # the new weight decay, and the teacher-forcing ratio of the new anneal_steps
    schedule_change: str = "refuse"
    ckpt_every_n_steps: int = 500
    val_every_n_steps: int = 1000
    val_batches: Optional[int] = None  # limit validation batches per evaluation (per rank)
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig = field(
        default_factory=lambda: StageConfig(w_cls=0.45, w_reg=0.10, w_patch=0.45)
    )


@dataclass
class DmdSweepConfig:
    """One fitting choice varied at a time around the base fit (the first span, selection
    `span`, the first of `solvers` (rrr when listed), `rank`, `alpha`); empty lists skip."""

    ranks: List[int] = field(default_factory=list)  # for each of pcr/rrr in solvers
    alphas: List[float] = field(default_factory=list)  # for each solver
    budgets: List[int] = field(default_factory=list)  # calibration images; error(B) = C / B^gamma
    cut_starts: List[int] = field(default_factory=list)  # span (i, p_base), every selection
    prune_lengths: List[int] = field(default_factory=list)  # span (i_base, p), every selection
    token_groups: List[str] = field(
        default_factory=list
    )  # fit on one group's tokens: cls|reg|patch|all


@dataclass
class DmdConfig:
    """DMD baselines along depth (`dmd/`), standalone (`raptor dmd`) and as a callback."""

    enabled: bool = True  # attach the callback to stage 2
    calib_images: int = 1000
    eval_images: int = 500
    solvers: List[str] = field(default_factory=lambda: ["ridge", "rrr"])
    selections: List[str] = field(
        default_factory=lambda: ["span", "anchor", "endpoint", "identity"]
    )
    rank: Optional[int] = None  # pcr/rrr rank; None = full (ridge ignores it)
    alpha: float = 1e-4  # ridge, relative to the mean eigenvalue of C_xx (alpha * tr(C_xx) / d)
    center: bool = False  # fit y ~ K x + b on centred moments
    spans: List[List[int]] = field(default_factory=list)  # [[i, p], ...]; default: the phases
    refit_every_n_steps: int = 0
    downstream: bool = True  # span-end predictions through the teacher's remaining blocks (+ top-1)
    log_groups: bool = False  # callback: also log per-token-group metrics (the CSV table has them)
    compute_dtype: str = (
        "float64"  # per-batch moment products: float64 | float32 (sums stay float64)
    )
    sweep: DmdSweepConfig = field(default_factory=DmdSweepConfig)


@dataclass
class LoggingConfig:
    wandb: str = "disabled"  # online | offline | disabled
    project: str = "raptor"
    entity: Optional[str] = None
    run_name: Optional[str] = None
    log_every_n_steps: int = 10
    progress_bar: bool = True


@dataclass
class TrainerConfig:
    """Passed to `lightning.Trainer`; `extra` carries any other Trainer argument."""

    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto -> ddp when more than one device
    precision: Optional[str] = None  # default: bf16-mixed on GPU, 32-true on CPU
    deterministic: bool = False
    benchmark: bool = False
    num_threads: Optional[int] = None  # torch CPU threads per process; default torch's own
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ExportConfig:
    """Backbone export (`raptor.export.export_backbone`, used by the pipeline): `out`
    folder, an ONNX graph at the exported resolution with its opset, and whether to
    replace the export files in a non-empty folder."""

    out: str = ""
    onnx: bool = False
    onnx_opset: int = 18
    overwrite: bool = False


@dataclass
class PipelineConfig:
    ks: List[int] = field(default_factory=lambda: [3])  # Raptors trained, one per k
    evaluate: bool = True
    export: bool = True


@dataclass
class RaptorConfig:
    name: str = "raptor"
    run_dir: str = "runs/${name}"  # the run folder; every command writes its resolved config here
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    phases: PhasesConfig = field(default_factory=PhasesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dmd: DmdConfig = field(default_factory=DmdConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


# --------------------------------------------------------------------------- loading


class ConfigError(UserError):
    """A config file or override is invalid; the message names the key."""


def all_keys(node: Any = None, prefix: str = "") -> List[str]:
    """Every dotted key of the schema (leaves and sections)."""
    node = OmegaConf.structured(RaptorConfig) if node is None else node
    keys = []
    for k in node.keys():
        full = f"{prefix}{k}"
        keys.append(full)
        child = node._get_node(k)
        if isinstance(child, DictConfig) and not _is_free_dict(node, k):
            keys.extend(all_keys(child, full + "."))
    return keys


def _is_free_dict(node: DictConfig, key: str) -> bool:
    """`trainer.extra`-style Dict[str, Any] fields accept any sub-key."""
    child = node._get_node(key)
    return isinstance(child, DictConfig) and child._metadata.object_type in (None, dict)


def _nearest(key: str) -> str:
    """The valid keys closest to `key`, by full dotted name and by last component."""
    keys = all_keys()
    by_leaf = {}
    for k in keys:
        by_leaf.setdefault(k.rsplit(".", 1)[-1], k)
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
    for leaf in difflib.get_close_matches(key.rsplit(".", 1)[-1], list(by_leaf), n=2):
        if by_leaf[leaf] not in close:
            close.append(by_leaf[leaf])
    return ", ".join(close[:4]) if close else "(none)"


def _fail(exc: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or ""
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)):
        msg = f"{where}: unknown config key '{key}'. Nearest valid keys: {_nearest(key)}"
    elif isinstance(exc, ValidationError):
        msg = f"{where}: wrong type for config key '{key}': {str(exc.msg).splitlines()[0]}"
    else:
        msg = f"{where}: invalid config at '{key}': {exc.msg if hasattr(exc, 'msg') else exc}"
    return ConfigError(msg)


def _read_yaml(path: Path, seen: tuple = ()) -> DictConfig:
    """Read a YAML file, composing the files it lists under `defaults:` first."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config {path} includes itself through `defaults`")
    raw = OmegaConf.load(path)
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"config {path}: expected a mapping of keys at the top level")
    parts = []
    for name in raw.pop("defaults", None) or []:
        parts.append(_read_yaml(path.parent / str(name), seen + (path.resolve(),)))
    return OmegaConf.merge(*parts, raw) if parts else raw


def parse_overrides(overrides: List[str]) -> DictConfig:
    """`a.b=1 c=[1,2]` -> a DictConfig; each item must be key=value."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
    return OmegaConf.from_dotlist(list(overrides))


def load_config(
    path: Optional[str | Path] = None, overrides: Optional[List[str]] = None
) -> DictConfig:
    """Schema <- YAML (with its defaults) <- overrides, validated; returns a typed DictConfig.

    Raises ConfigError naming the offending key and the nearest valid keys.
    """
    cfg = OmegaConf.structured(RaptorConfig)
    sources = []
    if path is not None:
        sources.append((str(path), _read_yaml(Path(path))))
    if overrides:
        sources.append(("command line", parse_overrides(overrides)))
    for where, src in sources:
        try:
            cfg = OmegaConf.merge(cfg, src)
        except OmegaConfBaseException as exc:
            raise _fail(exc, where) from None
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        raise _fail(exc, "config") from None
    OmegaConf.set_readonly(cfg, False)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_container(cfg: DictConfig) -> Dict[str, Any]:
    """Plain dict of builtins (for checkpoints: loads with weights_only=True)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def save_config(cfg: DictConfig, run_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config into the run folder; returns its path."""
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    dest = out / name
    dest.write_text(to_yaml(cfg))
    return dest


def from_container(data: Dict[str, Any]) -> DictConfig:
    """A typed config from a plain dict (e.g. stored in a checkpoint)."""
    try:
        return OmegaConf.merge(OmegaConf.structured(RaptorConfig), data)
    except OmegaConfBaseException as exc:
        raise _fail(exc, "stored config") from None
