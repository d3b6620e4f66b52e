"""`DMDCallback`: DMD baselines fitted on the teacher and scored next to the student.

At fit start (or at the first validation when there is no fit) the callback
streams the first `calib_images` images of the training data through the
teacher, accumulates moments on each rank and merges them with one
all_reduce, and fits one operator per span and variant (spans given by the
caller, e.g. one per phase of the student's partition: phase (first, last) is
span (first - 1, last - first + 1)). At every validation it scores those
operators, and the identity, on the same validation batches the student sees,
with the same metrics (`dmd.metrics.TrajectoryMetrics`). With
`refit_every_n_steps` > 0 it keeps adding the teacher trajectories of the
training batches to its moments and refits every that many steps.

Duck-typed contract (nothing is imported from the training code):

- ``pl_module.teacher`` has ``trajectory(images) -> (B, L+1, T, D)`` (layer 0 =
  tokens entering block 1; with the ``replaceme`` selection also
  ``trajectory(images, mlp_out=True) -> (trajectory, mlp (B, L, T, D))``, see
  `dmd.stream`), ``groups`` (name -> slice over T), ``finish(a,
  from_layer) -> {"tokens": (B, T, D), "logits": (B, C) or None}`` (the blocks
  after `from_layer` and the final norm) and optionally ``num_classes`` (> 0
  when finish returns logits);
- batches are dicts with "image" (B, C, H, W) and optionally "valid" bool (B,)
  and "label" long (B,) (-1: none);
- when ``validation_step`` / ``training_step`` return a dict holding
  "trajectory" (B, L+1, T, D), it is used instead of a second teacher forward
  (not with ``replaceme``, which needs the blocks' MLP outputs too);
- ``pl_module.fidelity_table`` (optional): the student's `dmd.metrics.FidelityTable`
  of the validation just finished, set in its on_validation_epoch_end; its layers
  beside the DMD ones go into the comparison table.

Logged at each validation (L = 1-based layer, j = span end layer), next to the
student's ``val/{metric}/L{l}``:
``val_dmd/{variant}/{metric}/L{l}`` (all tokens; ``{metric}_{group}`` too with
log_groups), ``val_dmd/{variant}/final_{metric}/L{j}`` (prediction of layer j
finished by the teacher, compared at its last layer) and
``val_dmd/{variant}/top1/L{j}`` with a head. Variants are f"{selection}_{solver}"
and "identity" (x_l predicted as the span's input x_i); ``replaceme`` variants
hold the spans with i >= 1 (`dmd.fit.fits_span`) and predict their end layers only.
Written in `out_dir` (default: the trainer's root dir) on global rank 0:
``dmd_compare.csv`` (one row per validation, predictor and layer: student,
variants, identity; also a W&B Table under "dmd_compare" when a WandbLogger is
attached), ``dmd_eigenvalues.png`` (after each fit) and
``dmd_vs_student_{metric}.png`` (after each validation).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torch import Tensor

from dmd.evaluate import Evaluator, fit_entries
from dmd.fit import NO_SPECTRUM, SELECTIONS, check_span, endpoint_pairs, fits_span
from dmd.metrics import METRICS, FidelityTable
from dmd.moments import UPDATE_BYTES, MiB, MomentAccumulator, moment_dtype
from dmd.plots import curve_figure, eigenvalue_figure, save_figure
from dmd.solvers import ALPHA_MODES, SOLVERS
from dmd.stream import stream_trajectories, through_teacher

COMPARE_FILE = "dmd_compare.csv"
PLOT_METRICS = ("cos", "r2", "rel_l2")


class DMDCallback(L.Callback):
    """Fit DMD operators on the teacher, evaluate them beside the student (module docstring).

    Args:
        spans: [(i, p), ...] cut start and prune length, e.g. one per phase of the student.
            Spans must not overlap (each layer is predicted by one span).
        solvers, selections: variants fitted (dmd.solvers.SOLVERS, dmd.fit.SELECTIONS).
        rank, alpha, center, alpha_mode: fit settings (dmd.solvers: alpha relative to the
            mean eigenvalue of C_xx, or absolute).
        calib_images: calibration images over all ranks.
        refit_every_n_steps: 0 = fit once; N > 0 = accumulate training batches too and
            refit every N optimizer steps.
        downstream: also finish each span end's prediction through the teacher.
        log_groups: also log per-token-group metrics (the CSV table always has them).
        calib_loader: an iterable of batches for calibration (default: the
            datamodule's, else the module's, train_dataloader()).
        out_dir: folder for the CSV and plots (default: trainer.default_root_dir).
        compute_dtype: dtype of the per-batch moment products (float64 or float32).
        max_update_bytes: the most one moments update allocates (`MomentAccumulator`).
    """

    def __init__(
        self,
        spans: Sequence[Sequence[int]],
        solvers: Sequence[str] = ("ridge", "rrr"),
        selections: Sequence[str] = SELECTIONS,
        rank: Optional[int] = None,
        alpha: float = 1e-4,
        center: bool = False,
        calib_images: int = 1000,
        refit_every_n_steps: int = 0,
        downstream: bool = True,
        log_groups: bool = False,
        calib_loader: Optional[Iterable] = None,
        out_dir: Optional[str | Path] = None,
        compute_dtype: torch.dtype = torch.float64,
        alpha_mode: str = "relative",
        max_update_bytes: int = UPDATE_BYTES,
    ) -> None:
        super().__init__()
        for s in solvers:
            if s not in SOLVERS:
                raise ValueError(
                    f"DMDCallback: unknown solver '{s}'; expected one of {', '.join(SOLVERS)}"
                )
        for s in selections:
            if s not in SELECTIONS:
                raise ValueError(
                    f"DMDCallback: unknown selection '{s}'; expected one of {', '.join(SELECTIONS)}"
                )
        if alpha_mode not in ALPHA_MODES:
            raise ValueError(
                f"DMDCallback: unknown alpha_mode '{alpha_mode}'; expected one of "
                f"{', '.join(ALPHA_MODES)}"
            )
        if calib_images < 1:
            raise ValueError(f"DMDCallback: calib_images must be >= 1, got {calib_images}")
        if not spans:
            raise ValueError("DMDCallback: no spans given; pass spans=[(i, p), ...]")
        self.spans = [tuple(int(v) for v in s) for s in spans]
        self.solvers, self.selections = list(solvers), list(selections)
        self.rank, self.alpha, self.center = rank, float(alpha), bool(center)
        self.alpha_mode = alpha_mode
        self.mlp_out = "replaceme" in self.selections
        self.calib_images = int(calib_images)
        self.refit_every_n_steps = int(refit_every_n_steps)
        self.downstream, self.log_groups = bool(downstream), bool(log_groups)
        self.calib_loader = calib_loader
        self.out_dir = Path(out_dir) if out_dir else None
        self.compute_dtype = compute_dtype
        self.max_update_bytes = int(max_update_bytes)
        self.evaluator: Optional[Evaluator] = None
        self.moments: Optional[MomentAccumulator] = None  # merged over ranks
        self._local: Optional[MomentAccumulator] = None  # this rank's, keeps growing with refits
        self.last_results: Optional[dict] = None
        self.fits = 0

    @classmethod
    def from_config(
        cls, dmd_cfg: Any, default_spans: Optional[Sequence[Sequence[int]]] = None, **kwargs: Any
    ) -> DMDCallback:
        """From a config section with keys spans, solvers, selections, rank, alpha, center,
        calib_images, refit_every_n_steps (and optionally downstream, log_groups, compute_dtype,
        alpha_mode, update_memory_mib);
        `default_spans` (the student's phases) when the section names no spans."""
        get = dmd_cfg.get if hasattr(dmd_cfg, "get") else lambda k, d=None: getattr(dmd_cfg, k, d)
        args = dict(
            spans=[list(s) for s in get("spans", None) or []] or default_spans,
            solvers=list(get("solvers", ("ridge", "rrr"))),
            selections=list(get("selections", SELECTIONS)),
            rank=get("rank", None),
            alpha=float(get("alpha", 1e-4)),
            center=bool(get("center", False)),
            calib_images=int(get("calib_images", 1000)),
            refit_every_n_steps=int(get("refit_every_n_steps", 0)),
            downstream=bool(get("downstream", True)),
            log_groups=bool(get("log_groups", False)),
            compute_dtype=moment_dtype(get("compute_dtype", "float64")),
            alpha_mode=str(get("alpha_mode", "relative")),
            max_update_bytes=int(get("update_memory_mib", UPDATE_BYTES / MiB) * MiB),
        )
        args.update(kwargs)
        return cls(**args)

    # ------------------------------------------------------------------ fitting

    def _spans(self, num_layers: int) -> list[tuple[int, int]]:
        spans = [check_span(s, num_layers) for s in self.spans]
        covered = [layer for i, p in spans for layer in range(i + 1, i + p + 1)]
        if len(set(covered)) != len(covered):
            raise ValueError(
                f"DMDCallback: spans {spans} overlap; each layer must belong to one span"
            )
        return spans

    def _trajectory(
        self, pl_module: Any, batch: Mapping[str, Tensor], outputs: Any = None
    ) -> tuple[Tensor, Optional[Tensor]]:
        """(trajectory, the blocks' MLP outputs or None when no selection needs them)."""
        shared = outputs.get("trajectory") if isinstance(outputs, Mapping) else None
        full = getattr(pl_module.teacher, "num_layers", None)
        if (
            not self.mlp_out
            and shared is not None
            and (full is None or shared.shape[1] == full + 1)
        ):
            return shared, None  # the module's own teacher forward (a truncated one is not used)
        out = through_teacher(
            batch, pl_module.teacher.trajectory, pl_module.device, mlp_out=self.mlp_out
        )
        return out.trajectory, out.mlp if self.mlp_out else None

    def _calibration_loader(self, trainer: L.Trainer, pl_module: Any) -> Iterable:
        if self.calib_loader is not None:
            return self.calib_loader
        if trainer.datamodule is not None:
            return trainer.datamodule.train_dataloader()
        return pl_module.train_dataloader()

    def _calibrate(self, trainer: L.Trainer, pl_module: Any) -> None:
        acc = None
        for out in stream_trajectories(
            self._calibration_loader(trainer, pl_module),
            pl_module.teacher.trajectory,
            pl_module.device,
            images=self.calib_images,
            ranks=trainer.world_size,
            mlp_out=self.mlp_out,
        ):
            traj = out.trajectory
            if acc is None:
                spans = self._spans(traj.shape[1] - 1)
                acc = MomentAccumulator(
                    traj.shape[1] - 1,
                    traj.shape[-1],
                    endpoints=endpoint_pairs(spans),
                    device=traj.device,
                    compute_dtype=self.compute_dtype,
                    max_update_bytes=self.max_update_bytes,
                    mlp_spans=[s for s in spans if self.mlp_out and fits_span("replaceme", s)],
                )
            acc.update(traj, out.valid, out.mlp if self.mlp_out else None)
        if acc is None:
            raise RuntimeError("DMDCallback: the calibration loader yielded no valid image")
        self._local = acc
        self._fit(trainer, pl_module)

    def _fit(self, trainer: L.Trainer, pl_module: Any) -> None:
        """Merge this rank's moments over ranks (on a copy) and fit every variant."""
        self.moments = self._local.clone().all_reduce()
        spans = self._spans(self.moments.num_layers)
        teacher = pl_module.teacher
        entries = fit_entries(
            self.moments,
            spans,
            self.solvers,
            self.selections,
            self.rank,
            self.alpha,
            self.center,
            alpha_mode=self.alpha_mode,
        )
        self.evaluator = Evaluator(
            entries,
            teacher.groups,
            finish=teacher.finish if self.downstream else None,
            top1=bool(getattr(teacher, "num_classes", 0)),
        ).to(self.moments.device)
        self.fits += 1
        if trainer.is_global_zero:
            spectra: dict[str, dict[str, Tensor]] = {}
            for e in entries:
                for (i, p), op in e.parts:
                    if e.meta["selection"] not in NO_SPECTRUM:
                        spectra.setdefault(f"layers {i} -> {i + p}", {})[e.name] = op.eigenvalues()
            title = f"DMD eigenvalues ({self.moments.images} calibration images)"
            save_figure(
                eigenvalue_figure(spectra, title),
                self._out(trainer),
                "dmd_eigenvalues",
                trainer.loggers,
                trainer.global_step,
            )

    def _out(self, trainer: L.Trainer) -> Path:
        return self.out_dir or Path(trainer.default_root_dir)

    # ------------------------------------------------------------------ hooks

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.evaluator is None:
            self._calibrate(trainer, pl_module)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.evaluator is None:  # validate() without fit()
            self._calibrate(trainer, pl_module)
        self.evaluator.reset()

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        traj, mlp = self._trajectory(pl_module, batch, outputs)
        self.evaluator.update(traj, batch.get("valid"), batch.get("label"), mlp)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        results = self.evaluator.compute()
        self.evaluator.reset()
        self.last_results = results
        flat = {}
        for name, res in results.items():
            prefix = f"val_dmd/{name}"
            flat.update(self._table(res).flat(prefix, groups=self.log_groups))
            if res["final"] is not None:
                ends = [i + p for i, p in res["spans"]]
                final = FidelityTable.from_metrics(res["final"], ends)
                flat.update(final.flat(prefix, groups=False, tag="final_"))
            if res["top1"] is not None:
                ends = [i + p for i, p in res["spans"]]
                flat.update({f"{prefix}/top1/L{j}": v for j, v in zip(ends, res["top1"])})
        # already reduced over ranks by the metrics: identical on every rank
        pl_module.log_dict({k: float(v) for k, v in flat.items()}, sync_dist=False)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self.last_results is None:
            return
        student = getattr(pl_module, "fidelity_table", None)
        rows = self.comparison_rows(student, trainer.global_step)
        self._write_table(trainer, rows)
        for metric in PLOT_METRICS:
            curves = {}
            for who in dict.fromkeys(r["predictor"] for r in rows):
                pts = [
                    (r["layer"], r[metric])
                    for r in rows
                    if r["predictor"] == who and r["group"] == "all"
                ]
                pts = [(x, y) for x, y in pts if y is not None and math.isfinite(y)]
                if pts:
                    curves[who] = ([x for x, _ in pts], [y for _, y in pts])
            fig = curve_figure(
                curves, metric, title=f"{metric} per layer, step {trainer.global_step}"
            )
            save_figure(
                fig,
                self._out(trainer),
                f"dmd_vs_student_{metric}",
                trainer.loggers,
                trainer.global_step,
            )

    @staticmethod
    def _table(result: Mapping[str, Any]) -> FidelityTable:
        return FidelityTable.from_metrics(result["fidelity"], result["layers"])

    def comparison_rows(self, student: Optional[FidelityTable], step: int) -> list[dict]:
        """Rows (step, predictor, layer, group, every metric) for the student (its table's
        values at the DMD layers, when given), every DMD variant and the identity."""
        tables = {name: self._table(res) for name, res in self.last_results.items()}
        groups = next(iter(tables.values())).groups
        if student is not None:
            dmd_layers = {layer for t in tables.values() for layer in t.layers}
            shared = [layer for layer in student.layers if layer in dmd_layers]
            tables = {"student": FidelityTable(shared, student.aligned(shared)), **tables}
        return [
            dict(step=step, predictor=name, **row)
            for group in groups
            for name, table in tables.items()
            for row in table.rows(group)
        ]

    def _write_table(self, trainer: L.Trainer, rows: list[dict]) -> None:
        path = self._out(trainer) / COMPARE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        columns = ["step", "predictor", "layer", "group", *METRICS]
        new = not path.exists()
        with open(path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            if new:
                writer.writeheader()
            writer.writerows(rows)
        for logger in trainer.loggers:
            if hasattr(logger, "log_table"):
                data = [[r[c] for c in columns] for r in rows]
                logger.log_table(
                    key="dmd_compare", columns=columns, data=data, step=trainer.global_step
                )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.refit_every_n_steps <= 0 or self._local is None:
            return
        traj, mlp = self._trajectory(pl_module, batch, outputs)
        self._local.update(traj, batch.get("valid"), mlp)
        if trainer.global_step % self.refit_every_n_steps == 0:
            self._fit(trainer, pl_module)
