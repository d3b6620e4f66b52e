"""The probe runner: several backbones side by side on the same data, one task, one layer.

`run_probe(cfg, out_dir)` probes every model of `cfg.probe.models` on `cfg.probe.task`:
- "teacher": the configured teacher; "raptors": the pipeline's Raptor of each k in
  pipeline.ks (its last stage run); "identity": the embedding a_0 (the identity map's
  prediction of every layer); "random": the teacher's architecture with random weights
  (seeded by probe.seed); or a path: a Raptor run folder, a .ckpt, or an exported backbone.
- Features: `task.select` of layer `probe.layer` (default the last, L) after the teacher's
  final norm (the exported backbone's copy of it; the random model's own), as the Raptor
  paper reuses DINOv2's frozen final norm; computed once per model, layer and split into
  a `FeatureCache` (probe.feature_dtype) under probe.cache_dir (default `probe/cache` in
  the run's root) and
  reused while the model's weights, the layer, the data and the task stay the same; the
  targets beside them (labels int64, masks uint8, depth float32).
- Data: the data section's shards, or probe.data's. seg / depth read dense shards
  (`ShardDataModule(target=TASK)`; seg's classes from the manifest's `dense.seg.classes`);
  on the digits without probe.data, digit_scenes shards are written once into
  runs/NAME/scenes (again when data.scene_* change; `probe_data`). digit_scenes are read at their canvas size; the dense
  heads' patch grid is the data's input size // the patch size.
- Head: `task.head` trained as `HeadTraining.from_config` says (the Raptor paper's Table 6
  unless the probe section sets otherwise: AdamW, linear warmup then cosine decay, the
  gradient norm clipped) on the training split's features, scored on the validation
  split's after every epoch;
  epoch 0 is the head as initialised. For classification at the last layer the head
  starts as the teacher's own classifier (`teacher_head_state`), for every model; dense
  heads start fresh.
Writes into `out_dir`: probe.json (per model every metric per epoch, the best epoch's
metrics, and `ratio`: the best against the teacher's, best / teacher's when higher is
better, teacher's / best when lower is (RMSE): < 1 is worse than the teacher either way),
probe.md (per model: the primary metric at initialisation, the best and its epoch, the
other metrics at that epoch, the ratio), probe_curve.png, heads/MODEL.safetensors (each
final head), for dense tasks examples-MODEL.png (teacher and Raptors: validation images,
truth, prediction), and the per-epoch metrics to the loggers (CSV, W&B, TensorBoard) as
`probe/MODEL/METRIC`.
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from raptor import distributed
from raptor.errors import UserError
from raptor.eval.probe.features import (
    CacheWriter,
    FeatureCache,
    cache_key,
    join_parts,
    part_folder,
    tensors_digest,
)
from raptor.eval.probe.tasks import PAPER_TRAINING, TASKS, ProbeTask
from raptor.eval.sources import RaptorSource, load_source, unique_names

PROBE_FILE = "probe.json"
HEADS_DIR = "heads"
TABLE_FILE = "probe.md"
SPLITS = ("train", "val")
SCENES_DIR = "scenes"  # runs/NAME/scenes: the digit_scenes shards of dense probes on the digits
EXAMPLES = 4  # validation images in each dense example plot
# targets as cached: masks uint8 (void 255), depth float32 metres; labels stay int64
TARGET_DTYPES = {"seg": torch.uint8, "depth": torch.float32}
# how `ratio` compares a model's best with the teacher's: a fraction of the teacher's
# quality, 1 = as good, < 1 = worse, for metrics where higher or lower is better alike
RATIO_DEFINITIONS = {True: "best / teacher's best", False: "teacher's best / best"}


@dataclass
class ProbeModel:
    """A backbone to probe: `tokens(images, layer)` -> final-normed tokens (B, T, D) of
    layer 0..num_layers; `digest` identifies its weights (the feature cache's key)."""

    name: str
    kind: str  # teacher | raptor | export | identity | random
    source: str
    num_layers: int
    groups: Dict[str, slice]
    tokens: Callable[[Tensor, int], Tensor]
    digest: str


# --------------------------------------------------------------------------- models


def _teacher_model(name: str, kind: str, teacher: Any) -> ProbeModel:
    def tokens(images: Tensor, layer: int) -> Tensor:
        a = teacher.embed(images)
        for i in range(1, layer + 1):
            a = teacher.step(a, i)
        return teacher.final_norm(a)

    return ProbeModel(
        name,
        kind,
        str(teacher.arch["name"]),
        teacher.num_layers,
        teacher.groups,
        tokens,
        tensors_digest(teacher.vit.state_dict()),
    )


def _identity_model(teacher: Any, teacher_digest: str) -> ProbeModel:
    return ProbeModel(
        "identity",
        "identity",
        "a_0",
        teacher.num_layers,
        teacher.groups,
        lambda images, layer: teacher.final_norm(teacher.embed(images)),
        teacher_digest + ":a0",
    )


def _random_model(teacher: Any, seed: int) -> ProbeModel:
    """The teacher's architecture with timm's random initialisation (seeded)."""
    import timm

    from raptor.model.teacher import Teacher

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = timm.create_model(teacher.arch["name"], **teacher.arch["kwargs"])
    rand = Teacher(vit, arch=teacher.arch, data_config=teacher.data_config)
    return _teacher_model("random", "random", rand.to(_device_of(teacher)))


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _raptor_model(src: RaptorSource, teacher: Any, teacher_digest: str) -> ProbeModel:
    """A Raptor on top of the teacher's stem and final norm, or an export on its own."""
    bb, raptor = src.backbone, src.raptor
    embed, norm = (teacher.embed, teacher.final_norm) if bb is None else (bb.embed, bb.norm)

    def tokens(images: Tensor, layer: int) -> Tensor:
        a = embed(images)
        if layer:
            a = raptor.rollout(a, 0, layer)[:, -1]
        return norm(a)

    if bb is None:
        digest = teacher_digest + ":" + tensors_digest(raptor.state_dict())
    else:
        digest = tensors_digest(bb.state_dict())
    groups = teacher.groups if bb is None else bb.groups
    return ProbeModel(
        src.name, src.kind, str(src.paths[0]), raptor.num_layers, groups, tokens, digest
    )


def probe_models(cfg: DictConfig, teacher: Any, root: Path) -> List[ProbeModel]:
    """The models of cfg.probe.models, in order, with unique names ("raptors": those in
    the pipeline layout under `root`)."""
    from raptor.run_folders import run_folders
    from raptor.train.runs import CKPT_DIR, LAST_CKPT

    digest = tensors_digest(teacher.vit.state_dict())
    names = "; names allowed besides paths: teacher, raptors, identity, random"
    models: List[ProbeModel] = []
    for spec in cfg.probe.models:
        spec = str(spec)
        if spec == "teacher":
            models.append(_teacher_model("teacher", "teacher", teacher))
        elif spec == "identity":
            models.append(_identity_model(teacher, digest))
        elif spec == "random":
            models.append(_random_model(teacher, int(cfg.probe.seed)))
        elif spec == "raptors":
            stage = 2 if 2 in cfg.train.stages else 1
            for k in cfg.pipeline.ks:
                run = run_folders(cfg, root).stage(int(k), stage)
                if not (run / CKPT_DIR / LAST_CKPT).is_file():
                    raise UserError(
                        f"probe.models: no Raptor k={k}: {run} holds no {CKPT_DIR}/{LAST_CKPT}; "
                        "train it (`raptor pipeline CONFIG`) or list the models to probe"
                    )
                src = load_source(run, teacher, f"probe.models: k={k}")  # named k{K}
                models.append(_raptor_model(src, teacher, digest))
        else:
            src = load_source(spec, teacher, f"probe.models: {spec}", hint=names)
            models.append(_raptor_model(src, teacher, digest))
    for m, name in zip(models, unique_names([m.name for m in models])):
        m.name = name
    return models


def teacher_head_state(teacher: Any) -> Optional[Dict[str, Tensor]]:
    """The teacher's classifier as a linear map on [cls ; mean(patch)] of the final-normed
    tokens (weight (C, 2D), bias (C,)), computing exactly its logits; None when it has no
    head or its head is not such a map (an fc_norm after pooling, attention pooling).

    A separate head (teacher.head) reads these features already; timm's own head reads
    the cls token (global_pool 'token') or the mean of the patch tokens ('avg'), with no
    fc_norm: its weight goes to that half, zeros to the other."""
    if teacher.head is not None:
        w, b = teacher.head.weight, teacher.head.bias
    else:
        vit = teacher.vit
        if vit.num_classes == 0 or not isinstance(vit.fc_norm, nn.Identity):
            return None
        if not isinstance(vit.head, nn.Linear) or vit.global_pool not in ("token", "avg"):
            return None
        zeros = torch.zeros_like(vit.head.weight)
        pair = (vit.head.weight, zeros) if vit.global_pool == "token" else (zeros, vit.head.weight)
        w, b = torch.cat(pair, dim=1), vit.head.bias
    b = b if b is not None else torch.zeros(w.shape[0], device=w.device)
    return {"weight": w.detach().float().clone(), "bias": b.detach().float().clone()}


def file_name(name: str) -> str:
    """A model's name as a file or folder name."""
    return re.sub(r"[^\w.-]+", "_", name)


# --------------------------------------------------------------------------- data


def probe_data(cfg: DictConfig, root: Path) -> str:
    """The probe's shards folder: probe.data when set; else "" (the data section's shards),
    except for seg / depth when the data are the digits (data.source=digits, or shards
    written from them): digit_scenes shards (the data.scene_* settings), written into
    ROOT/scenes once (again when those settings change). UserError naming probe.data when a dense task has no dense shards."""
    from raptor.data.shards import DENSE_PREFIXES, MANIFEST, ensure_shards, read_manifest

    p, d = cfg.probe, cfg.data
    local = p.data and not any(c in str(p.data) for c in "{:")  # not a URL or a pattern
    if local and not Path(p.data).is_dir():
        raise UserError(
            f"probe.data={p.data} is not a folder: write shards there with `raptor shards "
            f"--source SOURCE --out {p.data}` (seg / depth: digit_scenes, ade20k:PATH, nyuv2:PATH)"
        )
    if p.data or p.task == "cls":
        return str(p.data)
    origin = str(d.source)
    if origin == "shards" and d.shards_dir and (Path(d.shards_dir) / MANIFEST).is_file():
        origin = str(read_manifest(d.shards_dir).get("source", ""))
    if origin == "digit_scenes" or origin.startswith(DENSE_PREFIXES):
        return ""
    if origin != "digits":
        raise UserError(
            f"probe.task={p.task} needs shards with {p.task} targets: set probe.data to a folder "
            "written by `raptor shards` from a dense source (digit_scenes, ade20k:PATH, nyuv2:PATH)"
        )
    out = root / SCENES_DIR
    want = {"count": d.scene_count, "size": d.scene_size, "digits": d.scene_digits}
    if (out / MANIFEST).is_file():
        opts = read_manifest(out)["options"]
        if [opts.get("scenes"), opts["val_fraction"], opts["seed"]] != [
            want,
            d.val_fraction,
            d.split_seed,
        ]:
            (out / MANIFEST).unlink()  # scenes of other settings: written again
    if not (out / MANIFEST).is_file():
        print(
            f"raptor probe: probe.task={p.task} on the digits and no probe.data: writing "
            f"{d.scene_count} digit_scenes into {out} (once; later probes reuse them)",
            file=sys.stderr,
        )
    scenes = copy.deepcopy(cfg)
    scenes.data.source, scenes.data.shards_dir = "digit_scenes", str(out)
    return str(ensure_shards(scenes, out, overwrite=True).data.shards_dir)


def _read_scenes_natively(data: DictConfig, folder: str) -> None:
    """digit_scenes shards are read at their canvas size, without resampling (the digits
    keep the scale the teacher saw; its patch grid grows with the image)."""
    from raptor.data.shards import MANIFEST, read_manifest

    if not (Path(folder) / MANIFEST).is_file():
        return
    manifest = read_manifest(folder)
    if manifest.get("source") == "digit_scenes":
        side = int(manifest["options"]["scenes"]["size"])
        data.transform.input_size, data.transform.resize, data.transform.crop_pct = side, side, None


def _dense_targets(dm: Any, task: str, folder: str) -> Dict[str, Any]:
    """The shards' manifest entry for `task` targets (seg: its classes; depth: its scale and
    max in metres); UserError naming probe.data when the shards carry none."""
    info = (dm.shards("train").dense or {}).get(task)
    if not isinstance(info, dict):
        where = f"probe.data={folder}" if folder else "the data section's shards"
        raise UserError(
            f"{where} holds no {task} targets: set probe.data to shards written by `raptor "
            "shards` from a dense source (digit_scenes, ade20k:PATH, nyuv2:PATH)"
        )
    return info


# --------------------------------------------------------------------------- features


def _split_digest(dm: Any, split: str) -> Dict[str, Any]:
    """What a split's images are: its shard URLs (local files by size and mtime), the
    transform and the sample limit."""
    files = []
    for url in dm.shards(split).urls:
        p = Path(url)
        files.append([url, *((p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else ())])
    return {"shards": files, "transform": dm.transform_config, "samples": dm.shards(split).total}


def extract(
    models: List[ProbeModel], task: ProbeTask, loader: Iterable, layer: int, device: torch.device
) -> Iterator[List[Tuple[Tensor, Tensor]]]:
    """Per batch, each model's (select()'s features, targets) of the loader's valid rows:
    the images are read and decoded once for all models."""
    with torch.no_grad():
        for batch in loader:
            keep = batch["valid"]
            if not bool(keep.any()):
                continue
            images, target = batch["image"][keep].to(device), batch[task.target_key][keep]
            target = target.to(TARGET_DTYPES.get(task.name, target.dtype))
            yield [(task.select(m.tokens(images, layer), m.groups), target) for m in models]


def cached_features(
    models: List[ProbeModel],
    task: ProbeTask,
    dm: Any,
    layer: int,
    cache_dir: Path,
    device: torch.device,
    splits: Tuple[str, ...] = SPLITS,
    dtype: torch.dtype = torch.float16,
) -> Tuple[Dict[str, Dict[str, FeatureCache]], set]:
    """({model name: {split: FeatureCache}} of `layer`, the names of the models whose
    features were written): those missing or stale are written in one pass over each
    split's images. With several ranks (a process group), each reads its share of the
    images (`dm`'s split), writes it as a part of the cache, and rank 0 joins the parts
    (features.py); every rank returns the whole caches."""
    rank, world = distributed.rank_and_world()
    out: Dict[str, Dict[str, FeatureCache]] = {m.name: {} for m in models}
    written = set()
    for split in splits:
        data = _split_digest(dm, split)
        todo = []
        for m in models:
            key = cache_key(
                {
                    "model": m.digest,
                    "layer": layer,
                    "task": task.name,
                    "data": data,
                    "dtype": str(dtype),
                }
            )
            folder = cache_dir / task.name / file_name(m.name) / f"L{layer}-{split}"
            cache = FeatureCache.open(folder, key)
            if cache is None:
                todo.append((m, folder, key))
            else:
                out[m.name][split] = cache
        if not todo:
            continue
        if world > 1 and rank == 0:  # no part of an older cache may be joined
            for _, folder, _ in todo:
                shutil.rmtree(folder, ignore_errors=True)
        distributed.barrier()
        writers = [
            CacheWriter(part_folder(folder, rank) if world > 1 else folder, key, dtype=dtype)
            for _, folder, key in todo
        ]
        batches = extract([m for m, _, _ in todo], task, dm.val_dataloader(split), layer, device)
        for per_model in batches:
            for writer, (x, y) in zip(writers, per_model):
                writer.add(x, y)
        for (m, _, _), writer in zip(todo, writers):
            out[m.name][split] = writer.close()
            written.add(m.name)
        if world > 1:
            distributed.barrier()  # every part is complete
            if rank == 0:
                for _, folder, key in todo:
                    join_parts(folder, key, world)
            distributed.barrier()
            for m, folder, key in todo:
                out[m.name][split] = FeatureCache.open(folder, key)
    return out, written


# --------------------------------------------------------------------------- training


def evaluate_head(task: ProbeTask, head: nn.Module, cache: FeatureCache, batch_size: int, device):
    """task.metrics() of `head` over every row of `cache`."""
    metrics = task.metrics()
    head.eval()
    with torch.no_grad():
        for x, y in cache.batches(batch_size):
            metrics.update(head(x.to(device)).cpu(), y)
    return metrics.compute()


@dataclass(frozen=True)
class HeadTraining:
    """How a probe head is trained: `epochs` over the training features in batches of
    `batch_size` rows, AdamW at peak `lr` with `weight_decay`, the learning rate linear
    from lr/warmup_steps to lr over `warmup_steps` steps, then cosine to 0 at the last step
    (`raptor.train.schedules.lr_at`), the gradient norm clipped at `grad_clip` (None: not)."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: Optional[float] = None

    @classmethod
    def from_config(cls, probe: DictConfig) -> HeadTraining:
        """The probe section's values; epochs, batch_size and lr left None are the task's
        in the Raptor paper's Table 6 (`PAPER_TRAINING`)."""
        paper = PAPER_TRAINING[str(probe.task)]

        def value(key: str) -> Any:
            return paper[key] if probe[key] is None else probe[key]

        clip = probe.grad_clip
        return cls(
            epochs=int(value("epochs")),
            batch_size=int(value("batch_size")),
            lr=float(value("lr")),
            weight_decay=float(probe.weight_decay),
            warmup_steps=int(probe.warmup_steps),
            grad_clip=None if clip is None else float(clip),
        )

    def steps(self, train: FeatureCache) -> int:
        """Optimizer steps over `epochs` of `train` (the last batch of a chunk may be short)."""
        per_epoch = sum(math.ceil(c["rows"] / self.batch_size) for c in train.meta["chunks"])
        return self.epochs * per_epoch


def train_head(
    task: ProbeTask,
    head: nn.Module,
    train: Optional[FeatureCache],
    val: FeatureCache,
    training: HeadTraining,
    seed: int,
    device: torch.device,
    on_epoch: Callable[[], None] = lambda: None,
) -> List[Dict[str, float]]:
    """Fine-tune `head` on `train` as `training` says, the batches shuffled with `seed`;
    returns the metrics on `val` at epoch 0 (as given) and after every epoch. A warmup as
    long as the run or longer is cut to the run's steps (the peak comes at the last step)."""
    from raptor.train.schedules import lr_at

    head, t = head.to(device), training
    curve = [{"epoch": 0, **evaluate_head(task, head, val, t.batch_size, device)}]
    if not t.epochs:
        return curve
    total = max(1, t.steps(train))
    warmup = min(t.warmup_steps, total)
    opt = torch.optim.AdamW(head.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, 1.0, 0.0, warmup, total))
    rng = random.Random(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for epoch in range(1, t.epochs + 1):
            head.train()
            for x, y in train.batches(t.batch_size, shuffle=rng):
                loss = task.loss(head(x.to(device)), y.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if t.grad_clip is not None:
                    nn.utils.clip_grad_norm_(head.parameters(), t.grad_clip)
                opt.step()
                sched.step()
            curve.append({"epoch": epoch, **evaluate_head(task, head, val, t.batch_size, device)})
            on_epoch()
    return curve


def _ratio(best: float, ref: Optional[float], higher: bool) -> Optional[float]:
    """A model's best against the teacher's (RATIO_DEFINITIONS); None without a teacher."""
    if not ref:
        return None
    if higher:
        return best / ref
    return ref / best if best else float("inf")


def best_of(curve: List[Dict[str, float]], primary: str, higher: bool) -> Dict[str, float]:
    values = [c[primary] for c in curve]
    i = max(range(len(values)), key=lambda j: values[j] if higher else -values[j])
    return {"best": values[i], "best_epoch": curve[i]["epoch"]}


# --------------------------------------------------------------------------- the run


def run_probe(
    cfg: DictConfig, out_dir: str | Path, root: Optional[str | Path] = None
) -> Dict[str, Any]:
    """Probe every model of cfg.probe.models on cfg.probe.task (module docstring); writes
    the outputs into `out_dir` and returns probe.json's content. `root`: the pipeline's
    root (default runs/NAME), where "raptors" and the default cache_dir are. Under
    torchrun (or a pipeline's DDP), the ranks share the feature extraction
    (`cached_features`) and each trains the same heads on the whole caches; rank 0 writes."""
    distributed.join_process_group(str(cfg.trainer.accelerator))
    return _probe(cfg, out_dir, root)


def _probe(cfg: DictConfig, out_dir: str | Path, root: Optional[str | Path]) -> Dict[str, Any]:
    from tqdm import tqdm

    from raptor.data.stream import ShardDataModule
    from raptor.model.teacher import Teacher
    from raptor.run_folders import run_folders
    from raptor.train.runs import make_loggers, prepare_run_dir

    p = cfg.probe
    out_dir = prepare_run_dir(cfg, out_dir)
    device = distributed.device(str(cfg.trainer.accelerator))
    teacher = Teacher.from_config(cfg.teacher).to(device)
    L = teacher.num_layers
    layer = L if p.layer is None else int(p.layer)
    if not 0 <= layer <= L:
        raise UserError(f"probe.layer={layer} is out of range: the teacher has layers 0..{L}")
    root = run_folders(cfg, root).root
    dense, heads = str(p.task) != "cls", p.dense
    data = copy.deepcopy(cfg.data)
    training = HeadTraining.from_config(p)
    data.val_batch_size = training.batch_size  # features are extracted in probe batches too
    folder = distributed.rank_zero_first(lambda: probe_data(cfg, root))
    if folder:  # the probe's own shards folder (e.g. dense targets)
        data.shards_dir, data.train_urls, data.val_urls = folder, "", ""
        _read_scenes_natively(data, folder)
    if dense:
        dm = ShardDataModule(data, teacher.data_config, None, target=str(p.task))
        targets = _dense_targets(dm, str(p.task), folder)
        classes = len(targets["classes"]) if p.task == "seg" else 0
        if p.task == "depth" and p.dense.depth_max is None:  # bins over the data's range
            heads = copy.deepcopy(p.dense)
            heads.depth_max = float(targets["max"])
    else:
        dm = ShardDataModule(data, teacher.data_config, teacher.num_classes or None)
        classes = teacher.num_classes or len(dm.shards("train").classes or [])
    if p.task == "cls" and not classes:
        raise UserError(
            "probe.task=cls: no class count (the teacher has no head and the shards' manifest "
            "lists no classes)"
        )
    task = TASKS[str(p.task)](classes, heads)
    models = probe_models(cfg, teacher, root)
    for m in models:
        if m.num_layers < layer:
            raise UserError(
                f"probe.layer={layer} is out of range: {m.name} has layers 0..{m.num_layers}"
            )
    cache_dir = Path(p.cache_dir) if p.cache_dir else root / "probe" / "cache"
    init = teacher_head_state(teacher) if task.name == "cls" and layer == L else None
    side = dm.transform_config["input_size"][-2:]  # the data's images, not the teacher's
    grid = tuple(int(s) // int(q) for s, q in zip(side, teacher.vit.patch_embed.patch_size))

    results = []
    bar = tqdm(
        total=len(models) * training.epochs,
        desc=f"probe {task.name}",
        unit="epoch",
        disable=not cfg.logging.progress_bar,
    )
    bar.set_postfix_str("features")
    splits = SPLITS if training.epochs else ("val",)  # no training: no training features
    dtype = getattr(torch, str(p.feature_dtype))
    features, written = cached_features(models, task, dm, layer, cache_dir, device, splits, dtype)
    steps = training.steps(features[models[0].name]["train"]) if training.epochs else 0
    if 0 < steps <= training.warmup_steps and distributed.is_rank_zero():
        print(
            f"raptor probe: probe.warmup_steps={training.warmup_steps} covers all {steps} "
            "training steps of each head, so its learning rate never decays; set "
            "probe.warmup_steps lower",
            file=sys.stderr,
        )
    heads = {}
    for m in models:
        caches = features[m.name]
        bar.set_postfix_str(m.name)
        head = task.head(caches["val"].feature_shape[-1], grid)
        if init is not None:
            head.load_state_dict(init)
        curve = train_head(
            task,
            head,
            caches.get("train"),
            caches["val"],
            training,
            int(p.seed),
            device,
            on_epoch=lambda: bar.update(1),
        )
        heads[m.name] = head
        best = best_of(curve, task.primary, task.higher_is_better)
        results.append(
            {
                "name": m.name,
                "kind": m.kind,
                "source": m.source,
                "features_reused": m.name not in written,
                "train_rows": caches["train"].rows if "train" in caches else 0,
                "val_rows": caches["val"].rows,
                "curve": curve,
                "at_init": curve[0][task.primary],
                **best,
                "at_best": curve[best["best_epoch"]],
            }
        )
    bar.close()
    ref = next((r["best"] for r in results if r["kind"] == "teacher"), None)
    for r in results:
        r["ratio"] = _ratio(r["best"], ref, task.higher_is_better)
    out = {
        "task": task.name,
        "layer": layer,
        "num_layers": L,
        "primary": task.primary,
        "higher_is_better": task.higher_is_better,
        "init": "teacher head" if init is not None else "fresh",
        "ratio": RATIO_DEFINITIONS[task.higher_is_better],
        "epochs": training.epochs,
        "training": asdict(training),
        "models": results,
    }
    if distributed.is_rank_zero():
        loggers = make_loggers(cfg, out_dir, "probe")
        write_outputs(out, out_dir, loggers)
        save_heads(heads, out_dir)
        if dense:
            plot_predictions(task, models, heads, dm, layer, out_dir, device, loggers)
        for logger in loggers:
            logger.finalize("success")
    return out


PERCENT_METRICS = ("top1", "miou", "pixel_acc", "delta1")  # fractions, shown in percent


def _fmt(metric: str, value: float) -> str:
    return f"{100 * value:.1f}%" if metric in PERCENT_METRICS else f"{value:.4f}"


def probe_table(out: Dict[str, Any]) -> str:
    """The markdown table of probe.json's content: per model the primary metric at
    initialisation, the best and its epoch, the other metrics at that epoch, and the
    ratio to the teacher's best (probe.json's `ratio` says how it is defined)."""
    from raptor.train.runs import markdown_table

    m = out["primary"]
    first = out["models"][0]["curve"][0] if out["models"] else {}
    others = [k for k in first if k not in ("epoch", m)]
    rows = [
        [
            r["name"],
            _fmt(m, r["at_init"]),
            _fmt(m, r["best"]),
            r["best_epoch"],
            *(_fmt(k, r["curve"][r["best_epoch"]][k]) for k in others),
            "n/a" if r["ratio"] is None else f"{r['ratio']:.3f}",
        ]
        for r in out["models"]
    ]
    head = ["model", f"{m} at init", f"best {m}", "best epoch", *(f"{k} at best" for k in others)]
    return markdown_table([*head, "ratio to teacher"], rows)


def training_note(out: Dict[str, Any]) -> str:
    """One line saying how probe.json's heads were trained ("" for a result without it)."""
    t = out.get("training")
    if not t or not t["epochs"]:
        return "Heads as initialised (no training)." if t else ""
    clip = f"gradient norm clipped at {t['grad_clip']:g}" if t["grad_clip"] else "no clipping"
    return (
        f"Heads: {t['epochs']} epoch{'s' * (t['epochs'] != 1)} in batches of {t['batch_size']}, AdamW at lr "
        f"{t['lr']:g} ({t['warmup_steps']} warmup steps, then cosine to 0), weight decay "
        f"{t['weight_decay']:g}, {clip}."
    )


def write_outputs(out: Dict[str, Any], out_dir: Path, loggers: List[Any]) -> None:
    """probe.json, probe.md, probe_curve.png, and every epoch's metrics to the loggers."""
    from dmd.plots import save_figure

    (out_dir / PROBE_FILE).write_text(json.dumps(out, indent=1))
    title = f"# Probe: {out['task']}, layer {out['layer']} of {out['num_layers']}"
    better = "higher" if out["higher_is_better"] else "lower"
    note = f"{out['primary']}: {better} is better; ratio to teacher = {out['ratio']}."
    note = f"{note} {training_note(out)}".strip()
    (out_dir / TABLE_FILE).write_text(f"{title}\n\n{probe_table(out)}\n\n{note}\n")
    for epoch in range(out["epochs"] + 1):
        values = {
            f"probe/{r['name']}/{k}": v
            for r in out["models"]
            for k, v in r["curve"][epoch].items()
            if k != "epoch"
        }
        for logger in loggers:
            logger.log_metrics(values, step=epoch)
    save_figure(curve_figure(out), out_dir, "probe_curve", loggers)


def save_heads(heads: Dict[str, nn.Module], out_dir: Path) -> None:
    """Each model's head after the last epoch: heads/NAME.safetensors (its state dict)."""
    from safetensors.torch import save_file

    (out_dir / HEADS_DIR).mkdir(exist_ok=True)
    for name, head in heads.items():
        state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
        save_file(state, str(out_dir / HEADS_DIR / f"{file_name(name)}.safetensors"))


def plot_predictions(
    task: ProbeTask,
    models: List[ProbeModel],
    heads: Dict[str, nn.Module],
    dm: Any,
    layer: int,
    out_dir: Path,
    device: torch.device,
    loggers: List[Any],
) -> None:
    """examples-NAME.png for the teacher and each Raptor: the first EXAMPLES validation
    images, their ground truth and the final head's prediction (`dense.plot_examples`)."""
    from raptor.eval.probe.dense import plot_examples

    batch = next(b for b in dm.val_dataloader("val") if bool(b["valid"].any()))
    keep = batch["valid"]
    images = batch["image"][keep][:EXAMPLES]
    target = batch[task.target_key][keep][:EXAMPLES]
    t = dm.transform_config
    for m in models:
        if m.kind in ("identity", "random"):
            continue
        head = heads[m.name].eval()
        with torch.no_grad():
            outs = head(task.select(m.tokens(images.to(device), layer), m.groups)).cpu()
        name = f"examples-{file_name(m.name)}"
        path = plot_examples(
            task, images, target, outs, out_dir / f"{name}.png", t["mean"], t["std"],
            title=f"{task.name} probe, layer {layer}: {m.name}",
        )  # fmt: skip
        for logger in loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key=name, images=[str(path)])


def curve_figure(out: Dict[str, Any]):
    """The primary metric per epoch (0: the initial head), one line per model."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.6))
    ax = fig.subplots()
    for r in out["models"]:
        ax.plot(
            [c["epoch"] for c in r["curve"]],
            [c[out["primary"]] for c in r["curve"]],
            marker="o",
            ms=3,
            label=r["name"],
        )
    ax.set_xlabel("epoch (0: initial head)")
    ax.set_ylabel(f"validation {out['primary']}")
    ax.set_title(f"{out['task']} probe, layer {out['layer']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
