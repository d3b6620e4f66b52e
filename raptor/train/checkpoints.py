"""`raptor fit` checkpoints: reading, validating, resuming, writing.

A checkpoint is RUN/checkpoints/last.ckpt (or any .ckpt file) holding the
Raptor's weights under "raptor.", its architecture and stage in
"hyper_parameters" ({"config", "arch", "stage", "blocks" (1-based, trained)}),
the schedule it followed ("schedule", `raptor.train.schedules.schedule`), and
Lightning's optimizer and loop state. Read with `torch.load(weights_only=True)`.
Stage-1 runs that trained separate blocks are joined by commas
("RUN_1,RUN_2"), as for `train.init_from` and `raptor export`.

Importing this module imports Lightning (the atomic writer is one of its
checkpoint plugins).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Type

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from raptor.config import ConfigError, from_container
from raptor.model.raptor import Raptor
from raptor.train.runs import CKPT_DIR, LAST_CKPT
from raptor.train.schedules import schedule


def checkpoint_file(path: str | Path) -> Path:
    """A checkpoint path, or a run folder -> its checkpoints/last.ckpt."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / CKPT_DIR / LAST_CKPT
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path} (expected a run folder or a .ckpt file)")
    return path


def read_checkpoint(path: str | Path) -> Dict[str, Any]:
    """torch.load(weights_only=True) of a Raptor checkpoint, with a clear error."""
    path = checkpoint_file(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise ConfigError(
            f"{path}: not a readable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        ) from None
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hparams, dict) or "arch" not in hparams or "state_dict" not in ckpt:
        raise ConfigError(f"{path}: not a `raptor fit` checkpoint (no Raptor arch/state_dict)")
    return ckpt


def _sources(source: str | Path) -> List[str]:
    """The run folders / .ckpt files of a comma-separated `source`."""
    return [s.strip() for s in str(source).split(",") if s.strip()]


def load_blocks(raptor: Raptor, init_from: str) -> List[int]:
    """Initialise `raptor`'s blocks from stage-1 checkpoints (comma-separated run folders
    or .ckpt files); each contributes the blocks it trained. Returns the 1-based blocks
    loaded; every block must come from exactly one source with the same architecture."""
    want = {k: v for k, v in raptor.arch_config().items() if k != "depth_formula"}
    owner: Dict[int, str] = {}
    for source in _sources(init_from):
        ckpt = read_checkpoint(source)
        hparams = ckpt["hyper_parameters"]
        have = {k: v for k, v in hparams["arch"].items() if k != "depth_formula"}
        diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        if diff:
            raise ConfigError(
                f"train.init_from {source}: its Raptor differs from this config's "
                f"(key: (checkpoint, config)) {diff}"
            )
        state = ckpt["state_dict"]
        for j in hparams.get("blocks") or range(1, raptor.k + 1):
            if j in owner:
                raise ConfigError(f"train.init_from: block {j} is in both {owner[j]} and {source}")
            prefix = f"raptor.blocks.{j - 1}."
            raptor.blocks[j - 1].load_state_dict(
                {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            )
            owner[j] = source
    missing = sorted(set(range(1, raptor.k + 1)) - set(owner))
    if missing:
        raise ConfigError(f"train.init_from: no stage-1 weights for block(s) {missing}")
    return sorted(owner)


def load_raptor(
    source: str | Path, error: Type[ConfigError] = ConfigError
) -> Tuple[Raptor, List[Dict[str, Any]], List[Path]]:
    """The whole Raptor (every block trained) of `source`: a run folder or .ckpt of stage 2
    or of a stage-1 run that trained all k blocks, or stage-1 runs of separate blocks joined
    by commas. Returns (raptor, checkpoints, their paths); a source that does not give every
    block raises `error` (a ConfigError; callers pass their own kind)."""
    names = _sources(source)
    if not names:
        raise error("no run folder or checkpoint given")
    paths = [checkpoint_file(name) for name in names]
    ckpts = [read_checkpoint(p) for p in paths]
    hparams = ckpts[0]["hyper_parameters"]
    model = Raptor.from_arch(hparams["arch"])
    if len(ckpts) > 1:
        if any(int(c["hyper_parameters"].get("stage", 0)) != 1 for c in ckpts):
            raise error(f"{source}: several sources are joined only for stage-1 runs")
        load_blocks(model, str(source))  # checks architectures and that each block comes once
        return model, ckpts, paths
    blocks = hparams.get("blocks") or list(range(1, model.k + 1))
    if sorted(blocks) != list(range(1, model.k + 1)):
        raise error(
            f"{paths[0]}: this stage-1 run trained block(s) {blocks} of {model.k}; the others "
            "are untrained. Use a stage-2 run, or join the stage-1 runs of all blocks with "
            "commas (RUN_1,RUN_2,...)"
        )
    prefix = "raptor."
    state = {k[len(prefix) :]: v for k, v in ckpts[0]["state_dict"].items() if k.startswith(prefix)}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise error(
            f"{paths[0]}: its Raptor weights do not fit its stored architecture: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    return model, ckpts, paths


def resume_path(cfg: Any, run_dir: Path) -> Optional[Path]:
    """The checkpoint `train.resume` asks to continue from, if any."""
    mode = str(cfg.train.resume)
    last = run_dir / CKPT_DIR / LAST_CKPT
    if mode == "auto":  # newest of last.ckpt and Lightning's SLURM requeue checkpoints
        found = [p for p in [last, *run_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
        path = max(found, key=lambda p: p.stat().st_mtime) if found else None
    elif mode == "never":
        if last.exists():
            raise ConfigError(
                f"train.resume=never but {last} exists: use resume=auto to continue that run, "
                "or another run_dir"
            )
        path = None
    else:
        path = checkpoint_file(mode)
    return path


def check_resume(cfg: Any, path: Optional[Path], global_batch: int, world: int) -> int:
    """The step a run resumed from `path` (None: a fresh run) starts at, once the checkpoint
    is known to be of this stage and its schedule (for `global_batch` images per step)
    unchanged, or `train.schedule_change=apply`. A checkpoint without a stored schedule is
    compared through its config, with its data.batch_size on `world` ranks."""
    if path is None:
        return 0
    ckpt = read_checkpoint(path)
    hparams = ckpt["hyper_parameters"]
    stored = hparams.get("stage")
    if stored != int(cfg.train.stage):
        raise ConfigError(
            f"{path} is a stage-{stored} checkpoint but train.stage={cfg.train.stage}: "
            "give each stage its own run_dir (stage 2 reads stage 1 through train.init_from)"
        )
    step = int(ckpt["global_step"])
    old = ckpt.get("schedule")
    if not old:
        old_cfg = from_container(hparams["config"])
        old = schedule(old_cfg, int(old_cfg.data.batch_size) * world)
    new = schedule(cfg, global_batch)
    changed = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
    if changed and cfg.train.schedule_change == "refuse":
        diff = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())
        raise ConfigError(
            f"resuming {path} (step {step}) with a different schedule ({diff}): set the old "
            "values back, or train.schedule_change=apply to follow the new schedule from step "
            f"{step} on, or use another run_dir to start afresh"
        )
    return step


def first_non_finite(checkpoint: Dict[str, Any]) -> Optional[str]:
    """The first NaN/inf weight or optimizer state in a checkpoint, named; None if all finite."""
    tensors = {f"weight {k}": v for k, v in checkpoint["state_dict"].items()}
    for opt in checkpoint.get("optimizer_states", []):
        for p, state in opt["state"].items():
            tensors.update({f"optimizer state {k} of parameter {p}": v for k, v in state.items()})
    for name, t in tensors.items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file and renames it, so a job killed while
    saving keeps its previous checkpoint intact."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = str(path)
        if "://" in path:  # remote storage: no atomic rename
            return super().save_checkpoint(checkpoint, path, storage_options)
        tmp = f"{path}.tmp"
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)
