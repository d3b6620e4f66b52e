"""Experiment configuration: OmegaConf structured configs built from dataclasses.

A config is one `RaptorConfig`. YAML files in `configs/` set any subset of its
keys (a YAML may name others to compose under `defaults: [file.yaml, ...]`,
later files win); `key=value` overrides from the command line win over both.
Every key is typed: an unknown key or a value of the wrong type fails in
`load_config`, at start-up, with the key's full dotted name and the nearest
valid keys. A key with a valid range or a set of choices declares it next to its
field (`valid(default, rule)`); `load_config` rejects a value outside it, naming
the key, the value and the range. `None` is always valid for an Optional key.

Sections: data, teacher, model, phases, train, dmd, logging, trainer (passed
through to `lightning.Trainer`), export, pipeline, probe, analyze (`raptor analyze`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import typing
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

# --------------------------------------------------------------------------- valid values


@dataclass(frozen=True)
class Range:
    """Numbers from `low` to `high` (None: unbounded); `open_low`/`open_high` exclude an end."""

    low: Optional[float] = None
    high: Optional[float] = None
    open_low: bool = False
    open_high: bool = False

    def ok(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            return False  # not a number, or NaN
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or (value < self.high if self.open_high else value <= self.high)

    def describe(self, value: Any) -> str:
        kind = "an integer" if isinstance(value, int) else "a number"
        lo = None if self.low is None else _num(self.low)
        hi = None if self.high is None else _num(self.high)
        if hi is None:
            return f"{kind} {'>' if self.open_low else '>='} {lo}"
        if lo is None:
            return f"{kind} {'<' if self.open_high else '<='} {hi}"
        left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
        return f"{kind} in {left}{lo}, {hi}{right}"


@dataclass(frozen=True)
class OneOf:
    """One of `choices`, or a string `prefix` + non-empty text (e.g. `imagefolder:PATH`)."""

    choices: tuple
    prefixes: tuple = ()

    def ok(self, value: Any) -> bool:
        if value in self.choices:
            return True
        text = str(value)
        return any(text.startswith(p) and len(text) > len(p) for p in self.prefixes)

    def describe(self, value: Any) -> str:
        names = [str(c) for c in self.choices] + [f"{p}PATH" for p in self.prefixes]
        close = difflib.get_close_matches(str(value), names, n=1, cutoff=0.8)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"one of {', '.join(names)}{hint}"


@dataclass(frozen=True)
class Devices:
    """`trainer.devices` as Lightning takes it: auto, a count, -1 (all), or device indices."""

    def ok(self, value: Any) -> bool:
        if isinstance(value, bool):
            return False
        if isinstance(value, int):
            return value >= 1 or value == -1
        if isinstance(value, list):
            return bool(value) and all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value
            )
        text = str(value).strip()
        if text == "auto":
            return True
        if "," in text:
            parts = [p.strip() for p in text.split(",") if p.strip()]
            return bool(parts) and all(p.isdigit() for p in parts)
        try:
            return self.ok(int(text))
        except ValueError:
            return False

    def describe(self, value: Any) -> str:
        return (
            "auto, a device count >= 1, -1 (all devices), or a list of device indices like [0, 1]"
        )


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def valid(default: Any = None, rule: Any = None, *, nonempty: bool = False) -> Any:
    """A dataclass field with its valid values: `rule` (Range/OneOf/Devices) applies to the
    value, or to each item of a list; `nonempty` rejects "" and []. A callable `default`
    is a factory (for lists)."""
    meta = {"rule": rule, "nonempty": nonempty}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


POSITIVE = Range(1)  # an integer count >= 1
NON_NEGATIVE = Range(0)
GREATER_THAN_0 = Range(0, open_low=True)
FRACTION = Range(0, 1, open_high=True)  # [0, 1)
PROBABILITY = Range(0, 1)
SEED = Range(0, 2**32 - 1)  # what Lightning's seed_everything and numpy accept
# Lightning's precision strings (lightning.fabric.connector._PRECISION_INPUT), checked by a test
PRECISIONS = (
    "transformer-engine",
    "transformer-engine-float16",
    "16-true",
    "16-mixed",
    "bf16-true",
    "bf16-mixed",
    "32-true",
    "64-true",
    "64",
    "32",
    "16",
    "bf16",
)
# the same names as raptor.eval.phases.METHODS/SPLITS/TOKEN_MODES and dmd's SOLVERS/SELECTIONS
# (tests check), written out so that `raptor config show` imports neither torch nor dmd
PHASE_METHODS = ("dp", "bisect")
PHASE_SPLITS = ("train", "val")
TEACHER_PRECISIONS = ("bf16", "fp32")  # teacher.precision: the teacher forward's on GPU
TOKEN_MODES = ("all", "cls+patchmean")
DMD_SOLVERS = ("ridge", "pcr", "rrr")
PROBE_TASKS = (
    "cls",
    "seg",
    "depth",
)  # the names of raptor.eval.probe.tasks.TASKS (tests/test_probe.py checks)
DMD_SELECTIONS = ("span", "anchor", "endpoint", "replaceme", "identity")
DMD_ALPHA_MODES = ("relative", "absolute")
TEACHER_FORCING = ("anneal", "always", "never")  # stage 1: r annealed, 1 throughout, 0 throughout

# --------------------------------------------------------------------------- sections


@dataclass
class TransformConfig:
    """Evaluation-style preprocessing: resize the shorter side, center-crop
    input_size x input_size, normalize with mean/std. Every unset key is taken from the
    teacher's timm data config (`timm.data.resolve_data_config`). `resize`: the shorter side
    in pixels before the crop (torchvision's Resize(resize) + CenterCrop(input_size), as the
    Raptor reference preprocesses: 256 -> 224 bicubic); null: timm's rule, shorter side
    floor(input_size / crop_pct), through timm's own transform. Shards stored with
    `raptor shards --crop SIDE` need SIDE = that resize side."""

    input_size: Optional[int] = valid(None, POSITIVE)  # square side in pixels after crop
    resize: Optional[int] = valid(None, POSITIVE)  # shorter side before the crop; null: crop_pct
    crop_pct: Optional[float] = valid(
        None, GREATER_THAN_0
    )  # with resize null: input_size / crop_pct
    interpolation: Optional[str] = valid(
        None, OneOf(("bicubic", "bilinear", "nearest", "box", "hamming", "lanczos"))
    )
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = valid(None, GREATER_THAN_0)
    train_augment: bool = False  # random-resized-crop + flip for training (teacher training)


@dataclass
class DataConfig:
    """Where images come from and how they are streamed.

    source: `digits` (scikit-learn's bundled digits, written to `shards_dir` by the
    pipeline), `imagefolder:PATH` (class folders, written to `shards_dir`), or
    `shards` (use `train_urls` / `val_urls` as given); dense sources (masks / depth beside
    the image, `raptor.data.dense`): `digit_scenes` (generated: `scene_count` scenes of
    `scene_digits` digits on a `scene_size`-pixel canvas), `ade20k:PATH`
    (ADEChallengeData2016 layout), `nyuv2:PATH` ({train,val}/{rgb,depth}).
    URL patterns use brace expansion (`/data/in1k/train-{000000..001023}.tar`); a
    local folder holding a `manifest.json` is also accepted.
    `decode`: `cpu` (loader workers decode with PIL and transform) or `gpu` (workers pass
    the JPEG bytes on; each batch is decoded with torchvision.io.decode_jpeg on the current
    CUDA device and transformed there: JPEG shards only, evaluation transform only;
    `raptor.data.device_decode`).
    """

    source: str = valid(
        "shards",
        OneOf(("shards", "digits", "digit_scenes"), prefixes=("imagefolder:", "ade20k:", "nyuv2:")),
    )
    shards_dir: str = ""
    train_urls: str = ""
    val_urls: str = ""
    batch_size: int = valid(64, POSITIVE)  # per device
    val_batch_size: Optional[int] = valid(None, POSITIVE)  # per device; default batch_size
    num_workers: int = valid(4, NON_NEGATIVE)
    shuffle_buffer: int = valid(2000, NON_NEGATIVE)
    seed: int = valid(0, SEED)
    # samples per training epoch, all ranks; default: manifest
    train_samples: Optional[int] = valid(None, POSITIVE)
    val_samples: Optional[int] = valid(None, POSITIVE)  # default: manifest, else count by reading
    allow_pipe: bool = False  # `pipe:` URLs run shell commands: opt in explicitly
    # stop when more than this fraction of samples fail
    max_bad_fraction: float = valid(0.01, PROBABILITY)
    require_labels: bool = False  # a sample without a valid .cls label is skipped as bad
    decode: str = valid("cpu", OneOf(("cpu", "gpu")))  # where JPEGs are decoded (docstring)
    # writing shards (`raptor shards`, pipeline)
    shard_size: int = valid(1000, POSITIVE)  # samples per shard
    val_fraction: float = valid(0.2, FRACTION)  # digits only
    split_seed: int = valid(0, SEED)
    store_crop: Optional[int] = valid(None, POSITIVE)  # store resize+center-crop JPEGs of this side
    scene_count: int = valid(2000, Range(2))  # digit_scenes: scenes in all (val: val_fraction)
    scene_size: int = valid(8, Range(8))  # digit_scenes: canvas side in pixels, a multiple of 8
    scene_digits: int = valid(2, POSITIVE)  # digit_scenes: digits per scene
    transform: TransformConfig = field(default_factory=TransformConfig)


@dataclass
class TeacherTrainConfig:
    """Training a small teacher from scratch (`raptor teacher`)."""

    epochs: int = valid(30, POSITIVE)
    lr: float = valid(1e-3, NON_NEGATIVE)
    weight_decay: float = valid(0.05, NON_NEGATIVE)
    warmup_epochs: int = valid(2, NON_NEGATIVE)
    label_smoothing: float = valid(0.1, FRACTION)
    batch_size: Optional[int] = valid(None, POSITIVE)  # default data.batch_size


@dataclass
class TeacherConfig:
    """The frozen teacher: a timm VisionTransformer.

    `name` is a timm model name. Weights come from `weights` (a local file: timm
    state dict, the official DINOv2 torch.hub `.pth`, or a checkpoint written by
    `raptor teacher`; commands default to `runs/NAME/teacher/teacher.safetensors`), else
    from the hub when `pretrained`; with neither the teacher is trained by `raptor teacher`
    (the pipeline does this when `train_from_scratch`). Random weights only with
    `init=random`.
    `precision`: the teacher's forward on GPU, `bf16` (autocast, fast) or `fp32` (float32,
    autocast off, as the reference computes its targets); float32 on CPU either way.
    The architecture keys below override timm's defaults for `name` when set.
    """

    name: str = valid("vit_base_patch14_reg4_dinov2.lvd142m", nonempty=True)
    # weights: load teacher.weights, else the hub's when pretrained (never random weights);
    # random: a randomly initialised teacher, asked for by name (benchmarks, tests)
    init: str = valid("weights", OneOf(("weights", "random")))
    pretrained: bool = False
    weights: str = ""
    head: str = ""  # optional separate linear head on [cls ; mean(patch)] (safetensors/.pth)
    train_from_scratch: bool = False
    precision: str = valid("bf16", OneOf(TEACHER_PRECISIONS))  # the forward's precision on GPU
    img_size: Optional[int] = valid(None, POSITIVE)
    patch_size: Optional[int] = valid(None, POSITIVE)
    in_chans: Optional[int] = valid(None, POSITIVE)
    embed_dim: Optional[int] = valid(None, POSITIVE)
    depth: Optional[int] = valid(None, POSITIVE)
    num_heads: Optional[int] = valid(None, POSITIVE)
    mlp_ratio: Optional[float] = valid(None, GREATER_THAN_0)
    reg_tokens: Optional[int] = valid(None, NON_NEGATIVE)
    num_classes: Optional[int] = valid(None, NON_NEGATIVE)  # 0: no classifier head
    drop_path_rate: Optional[float] = valid(None, FRACTION)
    init_values: Optional[float] = valid(None, NON_NEGATIVE)  # LayerScale init of the teacher
    train: TeacherTrainConfig = field(default_factory=TeacherTrainConfig)


@dataclass
class ModelConfig:
    """The Raptor surrogate: k weight-tied `RecurrentBlock`s over the phases."""

    k: int = valid(3, POSITIVE)
    num_heads: Optional[int] = valid(None, POSITIVE)  # default: the teacher's
    mlp: str = valid("swiglu", OneOf(("swiglu", "gelu")))
    mlp_ratio: float = valid(4.0, GREATER_THAN_0)
    qkv_bias: bool = True
    ln_eps: float = valid(1e-5, GREATER_THAN_0)
    layerscale_init: float = valid(1e-5, NON_NEGATIVE)
    depth_conditioning: bool = True
    depth_hidden: int = valid(16, POSITIVE)
    depth_init_std: float = valid(1e-4, NON_NEGATIVE)


@dataclass
class PhasesConfig:
    """Phase discovery. `boundaries` fixes the partition for `model.k` (skipping
    discovery); otherwise `file` (a phases.json) or the discovery run supplies it.

    Discovery (`raptor phases`) streams `num_images` images of the `split` split
    (train: the shuffled training stream, as the reference's notebook; val: the
    validation set in order) and partitions their layer similarity for every k in
    `ks` by `method` (docs/PHASES.md):
    - dp: the fewest within-phase dissimilarity, phases of >= `min_length` layers;
    - bisect: the reference's recursive bisection: never splits a phase of fewer
      than `min_split` layers (the reference: 4); with `eps`, only makes splits
      gaining more than eps x the total pair weight (the reference's stopping rule;
      fewer than k phases is then an error); null: no threshold, stops at k.
    """

    ks: List[int] = valid(lambda: [2, 3, 4], POSITIVE, nonempty=True)
    method: str = valid("dp", OneOf(PHASE_METHODS))
    token_mode: str = valid("cls+patchmean", OneOf(TOKEN_MODES))
    split: str = valid("val", OneOf(PHASE_SPLITS))
    num_images: int = valid(512, POSITIVE)
    min_length: int = valid(1, POSITIVE)
    min_split: int = valid(4, POSITIVE)  # bisect only
    eps: Optional[float] = valid(None, FRACTION)  # bisect only; a fraction of the pair weight
    # random contiguous baselines per k (seeded by seed + k)
    random_partitions: int = valid(8, NON_NEGATIVE)
    seed: int = valid(0, SEED)
    boundaries: Optional[List[int]] = valid(None, POSITIVE)  # last layer of each phase but the last
    file: str = ""


@dataclass
class StageConfig:
    """Optimisation of one distillation stage (steps define the run, not epochs).

    Learning rate: `lr` is for `lr_reference_batch` images per optimizer step; it is
    scaled linearly with the global batch (per-device batch x devices x nodes)
    when `scale_lr` is set (peak lr = lr x global batch / lr_reference_batch; min_lr
    is not scaled). Schedule: linear warmup over `warmup_steps`, cosine to `min_lr`
    at `steps`; AdamW; `grad_clip` is the gradient-norm limit (per block in stage 1;
    0: none). Loss per state: w_cls*mean(cls) + w_reg*mean(reg) + w_patch*mean(patch)
    of the squared error (`weighted`) or the plain MSE (`mse`); `weighted_final` is
    `weighted` for the block whose phase ends at the last layer and `mse` for the others
    in stage 1 (every block is weighted in stage 2). Stage 1 defaults to `weighted_final`
    (the reference's recipe: its run scripts train the inner blocks with --mse and the
    block ending at layer L with --weighted), stage 2 to `weighted`. Stage 1's
    teacher-forcing weight r follows `teacher_forcing` (annealed over `anneal_steps`, or
    fixed at 1 or 0). Resuming with a different schedule is refused unless
    `train.schedule_change=apply`.
    """

    steps: int = valid(10000, POSITIVE)
    lr: float = valid(3e-4, NON_NEGATIVE)
    min_lr: float = valid(1e-6, NON_NEGATIVE)
    weight_decay: float = valid(1e-4, NON_NEGATIVE)
    warmup_steps: int = valid(500, NON_NEGATIVE)
    grad_clip: float = valid(1.0, NON_NEGATIVE)
    # teacher-forcing anneal (stage 1); default steps // 4; 0: no teacher forcing
    anneal_steps: Optional[int] = valid(None, NON_NEGATIVE)
    # stage 1's teacher-forcing weight r (the ablations of the Raptor paper's Table 2):
    # anneal (1 -> 0 over anneal_steps) | always (r = 1: teacher forcing alone)
    # | never (r = 0: autoregressive alone)
    teacher_forcing: str = valid("anneal", OneOf(TEACHER_FORCING))
    w_cls: float = valid(0.34, NON_NEGATIVE)
    w_reg: float = valid(0.33, NON_NEGATIVE)
    w_patch: float = valid(0.33, NON_NEGATIVE)
    # weighted | mse | weighted_final (stage 1: weighted for the last phase, mse for the others)
    loss: str = valid("weighted", OneOf(("weighted", "mse", "weighted_final")))
    noise_sigma: float = valid(
        0.0, NON_NEGATIVE
    )  # std of Gaussian noise added to every block input
    lr_reference_batch: int = valid(256, POSITIVE)
    scale_lr: bool = False


@dataclass
class TrainConfig:
    """`stage` is the one `raptor fit` trains; `stages` the ones a Raptor gets (the pipeline
    runs them; the ablations of the Raptor paper's Table 2): [1, 2] both, stage 2 from
    stage 1's blocks; [1] stage 1 only, its blocks evaluated and exported as one rollout;
    [2] stage 2 only, from freshly initialised blocks (no train.init_from)."""

    stage: int = valid(1, OneOf((1, 2)))
    stages: List[int] = valid(lambda: [1, 2], OneOf((1, 2)), nonempty=True)
    blocks: Optional[List[int]] = valid(None, POSITIVE)  # stage 1: train only these (1-based)
    init_from: str = ""  # stage 2: stage-1 run folder(s)/checkpoint(s), comma-separated
    seed: int = valid(0, SEED)
    resume: str = valid("auto", nonempty=True)  # auto | never | PATH to a checkpoint
    # a resume whose schedule (the stage's steps, lr, min_lr, warmup_steps, anneal_steps,
    # weight_decay, or the peak lr from scale_lr x global batch) differs from the
    # checkpoint's: `refuse` (names the keys, old -> new) or `apply`: from the resumed step
    # s on, lr = the new warmup + cosine at s (as if the run had used it from step 0),
    # the new weight decay, and the teacher-forcing ratio of the new anneal_steps
    schedule_change: str = valid("refuse", OneOf(("refuse", "apply")))
    ckpt_every_n_steps: int = valid(500, POSITIVE)
    val_every_n_steps: int = valid(1000, POSITIVE)
    # limit validation batches per evaluation (per rank)
    val_batches: Optional[int] = valid(None, POSITIVE)
    stage1: StageConfig = field(default_factory=lambda: StageConfig(loss="weighted_final"))
    stage2: StageConfig = field(
        default_factory=lambda: StageConfig(w_cls=0.45, w_reg=0.10, w_patch=0.45)
    )


@dataclass
class DmdSweepConfig:
    """One fitting choice varied at a time around the base fit (the first span, selection
    `span`, the first of `solvers` (rrr when listed), `rank`, `alpha`); empty lists skip."""

    ranks: List[int] = valid(list, POSITIVE)  # for each of pcr/rrr in solvers
    alphas: List[float] = valid(list, NON_NEGATIVE)  # for each solver
    # calibration images; error(B) = C / B^gamma
    budgets: List[int] = valid(list, POSITIVE)
    cut_starts: List[int] = valid(list, NON_NEGATIVE)  # span (i, p_base), every selection
    prune_lengths: List[int] = valid(list, POSITIVE)  # span (i_base, p), every selection
    # fit on one group's tokens
    token_groups: List[str] = valid(list, OneOf(("cls", "reg", "patch", "all")))


@dataclass
class DmdConfig:
    """DMD baselines along depth (`dmd/`), standalone (`raptor dmd`) and as a callback."""

    enabled: bool = True  # attach the callback to stage 2
    calib_images: int = valid(1000, POSITIVE)
    eval_images: int = valid(500, POSITIVE)
    solvers: List[str] = valid(lambda: ["ridge", "rrr"], OneOf(DMD_SOLVERS), nonempty=True)
    # replaceme: ReplaceMe's map on the MLP output of the block before the cut (spans i >= 1)
    selections: List[str] = valid(
        lambda: ["span", "anchor", "endpoint", "replaceme", "identity"],
        OneOf(DMD_SELECTIONS),
        nonempty=True,
    )
    rank: Optional[int] = valid(None, POSITIVE)  # pcr/rrr rank; None = full (ridge ignores it)
    # ridge added to C_xx: alpha * tr(C_xx) / d (alpha_mode relative) or alpha (absolute)
    alpha: float = valid(1e-4, NON_NEGATIVE)
    # relative: to the mean eigenvalue of C_xx; absolute: kooplearn's, the DMD paper's values
    alpha_mode: str = valid("relative", OneOf(DMD_ALPHA_MODES))
    center: bool = False  # fit y ~ K x + b on centred moments
    # [[i, p], ...]; default: the phases; checked against the teacher's depth by `raptor dmd`
    spans: List[List[int]] = field(default_factory=list)
    refit_every_n_steps: int = valid(0, NON_NEGATIVE)  # 0: fit once
    downstream: bool = True  # span-end predictions through the teacher's remaining blocks (+ top-1)
    log_groups: bool = False  # callback: also log per-token-group metrics (the CSV table has them)
    # dtype of the moment products, each block's partial sums added into float64 moments:
    # float32 (default: 1.6-1.7x faster per update on CPU, docs/BENCHMARKS.md; moments
    # within 1e-6 and K within 2e-2 of float64 at relative alpha >= 1e-4,
    # tests/test_dmd_moments_precision.py) or float64
    compute_dtype: str = valid("float32", OneOf(("float64", "float32")))
    # the most one moments update allocates, in MiB, whatever the batch and model size
    update_memory_mib: float = valid(256.0, GREATER_THAN_0)
    sweep: DmdSweepConfig = field(default_factory=DmdSweepConfig)


@dataclass
class LoggingConfig:
    """Loggers of every training run (`raptor.train.runs.make_loggers`): CSV always; W&B
    when `wandb` is online/offline; `tensorboard`: TensorBoard events in the run folder
    (the optional extra `raptor-vit[tensorboard]`; `raptor dashboard`)."""

    wandb: str = valid("disabled", OneOf(("online", "offline", "disabled")))
    project: str = "raptor"
    entity: Optional[str] = None
    run_name: Optional[str] = None
    log_every_n_steps: int = valid(10, POSITIVE)
    progress_bar: bool = True
    tensorboard: bool = valid(False, OneOf((True, False)))


@dataclass
class TrainerConfig:
    """Passed to `lightning.Trainer`; `extra` carries any other Trainer argument."""

    accelerator: str = valid("auto", OneOf(("auto", "cpu", "gpu", "cuda", "mps", "tpu")))
    devices: Any = valid("auto", Devices())
    num_nodes: int = valid(1, POSITIVE)
    strategy: str = "auto"  # auto -> ddp when more than one device; any Lightning strategy name
    # default: bf16-mixed on GPU, 32-true on CPU
    precision: Optional[str] = valid(None, OneOf(PRECISIONS))
    deterministic: bool = False
    benchmark: bool = False
    # torch CPU threads per process; default torch's own
    num_threads: Optional[int] = valid(None, POSITIVE)
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ExportConfig:
    """Backbone export (`raptor.train.export.export_backbone`, used by the pipeline): `out`
    folder, an ONNX graph at the exported resolution with its opset, and whether to
    replace the export files in a non-empty folder."""

    out: str = ""
    onnx: bool = False
    onnx_opset: int = valid(18, POSITIVE)
    overwrite: bool = False


@dataclass
class PipelineConfig:
    ks: List[int] = valid(lambda: [3], POSITIVE, nonempty=True)  # Raptors trained, one per k
    evaluate: bool = True
    export: bool = True
    # probe tasks run after every Raptor (runs/NAME/probe/TASK), with the probe section
    probes: List[str] = valid(list, OneOf(PROBE_TASKS))
    analyze: bool = False  # the `raptor analyze` step after the Raptors' evaluation


@dataclass
class DenseProbeConfig:
    """The dense linear probes' heads (`raptor.eval.probe.dense`; nested under `probe`).
    seg: a 1x1 conv on the patch tokens, after a BatchNorm when `seg_batchnorm` (DINOv2's
    linear protocol). depth: on [patch ; cls] when `depth_cls` (the Raptor paper's NYUv2
    probe), `depth_bins` > 0: softmax over that many bins evenly spaced in
    [depth_min, depth_max] (depth_max None: the shards' manifest's maximum, 1.5 m for digit
    scenes, 10 m for NYUv2), depth = the probability-weighted bin centre (DINOv2's linear
    depth head); 0: depth = sigmoid(1x1 conv) x depth_max. Loss: scale-invariant log
    (Bhat et al. 2021) with `silog_lambda`, on valid pixels (depth > 0)."""

    seg_batchnorm: bool = True
    depth_bins: int = valid(256, NON_NEGATIVE)
    depth_min: float = valid(1e-3, GREATER_THAN_0)  # metres
    depth_max: Optional[float] = valid(None, GREATER_THAN_0)  # metres; None: the shards' max
    depth_cls: bool = True
    silog_lambda: float = valid(0.85, PROBABILITY)


@dataclass
class ProbeConfig:
    """`raptor probe` and the pipeline's probe steps (`raptor.eval.probe.run`): a `task`
    head trained on frozen features of `layer` (None: the last) of each of `models`
    (teacher, raptors = the pipeline's Raptors for pipeline.ks, identity = a_0, random =
    random weights, or a Raptor run folder / .ckpt / exported backbone folder), `epochs`
    of AdamW at peak `lr` with `weight_decay` on batches of `batch_size` features, the
    learning rate warmed up linearly over `warmup_steps` then cosine-decayed to 0, the
    gradient norm clipped at `grad_clip` (None: not clipped); `epochs`, `batch_size` and
    `lr` left None take the task's values of the Raptor paper's Table 6
    (`raptor.eval.probe.tasks.PAPER_TRAINING`), the other three are Table 6's already;
    `data`: a shards folder with train and val splits (empty: the data section's shards;
    seg / depth on the digits: digit_scenes shards written once into runs/NAME/scenes);
    features cached as `feature_dtype` (float16; float32 keeps them exact) in `cache_dir`
    (empty: runs/NAME/probe/cache); `dense`: the seg / depth heads (DenseProbeConfig)."""

    task: str = valid("cls", OneOf(PROBE_TASKS))
    layer: Optional[int] = valid(None, NON_NEGATIVE)
    models: List[str] = valid(lambda: ["teacher", "raptors", "identity", "random"], nonempty=True)
    epochs: Optional[int] = valid(None, NON_NEGATIVE)
    lr: Optional[float] = valid(None, NON_NEGATIVE)
    weight_decay: float = valid(1e-2, NON_NEGATIVE)
    warmup_steps: int = valid(100, NON_NEGATIVE)
    grad_clip: Optional[float] = valid(1.0, GREATER_THAN_0)
    batch_size: Optional[int] = valid(None, POSITIVE)
    seed: int = valid(0, SEED)
    data: str = ""
    feature_dtype: str = valid("float16", OneOf(("float16", "float32")))
    cache_dir: str = ""
    dense: DenseProbeConfig = field(default_factory=DenseProbeConfig)


@dataclass
class AnalyzeConfig:
    """`raptor analyze` (`raptor.eval.dynamics`): the same `images` validation images through
    every model of `models` ("teacher", a `raptor fit` run folder or checkpoint, an export
    folder; empty: the teacher and the pipeline's Raptors); the perturbation size `epsilon`
    (eps u, u ~ N(0, I) per token, drawn with `seed`), the exact-DMD `dmd_rank`, and the
    first `classes` class labels averaged for the PCA view of the paths."""

    images: int = valid(256, POSITIVE)
    models: List[str] = field(default_factory=list)
    epsilon: float = valid(0.05, GREATER_THAN_0)
    dmd_rank: int = valid(10, POSITIVE)
    classes: int = valid(5, NON_NEGATIVE)
    seed: int = valid(0, SEED)


@dataclass
class RaptorConfig:
    name: str = valid("raptor", nonempty=True)
    # the run folder; every command writes its resolved config here. Empty: the command's
    # folder in the pipeline's layout under runs/NAME (`raptor.run_folders`)
    run_dir: str = ""
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
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig)


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
    path: Optional[str | Path] = None,
    overrides: Optional[List[str]] = None,
    stored: Optional[Dict[str, Any]] = None,
) -> DictConfig:
    """Schema <- `stored` (a run's config) <- YAML (with its defaults) <- overrides,
    validated; returns a typed DictConfig.

    Raises ConfigError naming the offending key and the nearest valid keys.
    """
    cfg = copy.deepcopy(_schema())
    sources = [] if stored is None else [("stored config", OmegaConf.create(stored))]
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
        values = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        raise _fail(exc, "config") from None
    check_values(values)
    OmegaConf.set_readonly(cfg, False)
    return cfg


@functools.cache
def _schema() -> DictConfig:
    """The structured default config, built once (a copy is several times faster)."""
    return OmegaConf.structured(RaptorConfig)


@functools.cache
def _hints(schema: type) -> Dict[str, Any]:
    return typing.get_type_hints(schema)


def check_values(values: Dict[str, Any], schema: type = RaptorConfig, prefix: str = "") -> None:
    """Every key of the resolved `values` against the rule declared by its field in the
    schema; raises ConfigError naming the key, the value and the valid range."""
    hints = _hints(schema)
    for f in dataclasses.fields(schema):
        key, value = prefix + f.name, values[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            check_values(value, hints[f.name], key + ".")
            continue
        if value is None:
            continue
        if f.metadata.get("nonempty") and value in ("", []):
            what = "a non-empty list" if isinstance(value, list) else "a non-empty string"
            raise ConfigError(f"{key}={_show(value)} is empty: expected {what}")
        rule = f.metadata.get("rule")
        if rule is None:
            continue
        items = (
            enumerate(value)
            if isinstance(value, list) and not isinstance(rule, Devices)
            else [(None, value)]
        )
        for i, item in items:
            if not rule.ok(item):
                at = key if i is None else f"{key}[{i}]"
                problem = "is not a valid choice" if isinstance(rule, OneOf) else "is out of range"
                raise ConfigError(f"{at}={_show(item)} {problem}: expected {rule.describe(item)}")


def _show(value: Any) -> str:
    """A value as it would be written in a `key=value` override."""
    if isinstance(value, str):
        return value if value and value.strip() == value else repr(value)
    return str(value)


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
