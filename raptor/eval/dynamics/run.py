"""`analyze(cfg, sources, out_dir)`: the dynamics of the teacher and Raptors on the same images.

The validation stream (`cfg.data`) goes once through `dmd.stream.stream_trajectories`, with a
trajectory function that runs every model on each batch, until `cfg.analyze.images` images;
each model's `Dynamics` accumulates its statistics batch by batch (nothing is held across
batches but sums, the DMD eigenvalues and the class paths). The perturbation noise of a
batch is drawn once (seeded) and used for every model. Writes the report (`report.py`) and
one plot per analysis (`plots.py`) into `out_dir`, sending plots and tables to `loggers`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch
from omegaconf import DictConfig

from dmd.plots import save_figure
from dmd.stream import stream_trajectories
from raptor import distributed
from raptor.errors import UserError
from raptor.eval.dynamics import plots, report
from raptor.eval.dynamics.accumulate import Dynamics
from raptor.eval.dynamics.models import Model, raptor_model, teacher_model
from raptor.eval.sources import unique_names


def run_analysis(cfg: DictConfig, sources: Sequence[str], folder: Path) -> Dict[str, Any]:
    """`analyze` into `folder` with the loggers of the step "analyze" (CSV, TensorBoard, W&B
    as configured); returns what `raptor pipeline` records: images, models, plots, summary.
    With several ranks (torchrun, a pipeline's DDP) rank 0 analyses the images one process
    would, alone, while the others wait and then read its analysis.json."""
    from raptor.train.runs import make_loggers

    keep = ("images", "models", "plots")
    distributed.join_process_group(str(cfg.trainer.accelerator))
    if not distributed.is_rank_zero():
        distributed.barrier()
        result = json.loads((folder / report.REPORT_FILE).read_text())
        summary = report.comparison(result["stats"])
        return {"folder": str(folder), **{k: result[k] for k in keep}, "summary": summary}
    folder.mkdir(parents=True, exist_ok=True)
    loggers = make_loggers(cfg, folder, "analyze")
    result = analyze(cfg, sources, folder, loggers)
    for logger in loggers:
        logger.finalize("success")
    distributed.barrier()
    return {"folder": str(folder), **{k: result[k] for k in (*keep, "summary")}}


def load_models(sources: Sequence[str], teacher) -> List[Model]:
    """ "teacher" or a Raptor source (models.py) each; the teacher always comes first."""
    if not sources:
        raise UserError("raptor analyze: no model to analyse (model=teacher|RUN|EXPORT)")
    models = [teacher_model(teacher)]
    models += [raptor_model(str(s), teacher) for s in sources if str(s) != "teacher"]
    for m in models[1:]:
        if m.groups != teacher.groups:
            raise UserError(f"model={m.source}: token groups {m.groups} differ from the teacher's")
    for m, name in zip(models, unique_names([m.name for m in models])):
        m.name = name
    return models


def analyze(
    cfg: DictConfig, sources: Sequence[str], out_dir: Path, loggers: Sequence[Any] = ()
) -> Dict[str, Any]:
    """The analysis of the module docstring; returns analysis.json's content plus "summary"
    (the comparison lines of analysis.md)."""
    from raptor.data.stream import ShardDataModule
    from raptor.model.teacher import Teacher

    a = cfg.analyze
    device = distributed.device(cfg.trainer.accelerator)
    teacher = Teacher.from_config(cfg.teacher).to(device).eval()
    models = load_models(sources, teacher)
    L, D = teacher.num_layers, teacher.embed_dim
    dyn = [Dynamics(L, D, m.groups, a.classes, a.dmd_rank, a.epsilon) for m in models]

    def every_model(images: torch.Tensor) -> torch.Tensor:
        return torch.stack([m.trajectory(images) for m in models], dim=1)

    # every image of the stream, whatever the job's ranks (run_analysis: rank 0 alone)
    data = ShardDataModule(cfg.data, teacher.data_config, teacher.num_classes, ranks=(0, 1))
    gen = torch.Generator().manual_seed(int(a.seed))
    batches = stream_trajectories(
        data.val_dataloader(),
        every_model,
        device,
        images=a.images,
        only_valid=True,
        progress="analyze" if cfg.logging.progress_bar else None,
    )
    with torch.no_grad():
        for trajs, _, labels in batches:
            noise = torch.randn(trajs[:, 0].shape, generator=gen, dtype=torch.float32)
            for i, m in enumerate(models):
                dyn[i].update(trajs[:, i].float(), labels, m.step, noise)
    if not dyn[0].images:
        raise UserError("raptor analyze: the validation stream gave no image")
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {m.name: d.compute() for m, d in zip(models, dyn)}
    bounds = {m.name: m.boundaries for m in models}
    figs = plots.figures(stats, bounds)
    result = {
        "images": dyn[0].images,
        "epsilon": float(a.epsilon),
        "dmd_rank": int(a.dmd_rank),
        "models": [
            {"name": m.name, "source": m.source, "boundaries": m.boundaries} for m in models
        ],
        "plots": list(figs),
        "stats": stats,
    }
    written = report.write_report(out_dir, result)
    for name, fig in figs.items():
        save_figure(fig, out_dir, name, loggers)
    for name, rows in written["tables"].items():
        for logger in loggers:
            if hasattr(logger, "log_table") and rows:
                logger.log_table(
                    f"analysis/{name}", list(rows[0]), [list(r.values()) for r in rows]
                )
    return {**result, "summary": written["summary"]}
