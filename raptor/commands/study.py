"""`raptor study STUDY.yaml [key=value ...]`: run a study's cells (docs/STUDIES.md).

    raptor study STUDY.yaml                 every unfinished cell here, one after another
    raptor study STUDY.yaml --jobs 2        two cells at a time (each its own process)
    raptor study STUDY.yaml --slurm [sbatch options]   one SLURM array task per unfinished cell
    raptor study STUDY.yaml --cell I        cell I only (what an array task runs)
    raptor study STUDY.yaml --list          the cells, their overrides and status
    raptor study STUDY.yaml --aggregate     study.json, study.md and plots from finished cells
key=value overrides apply to every cell. Exit status 1 when a cell failed (the others ran).
"""

from __future__ import annotations

import argparse

from raptor.errors import RunFailed, UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", help="study file (see configs/studies/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every cell")
    parser.add_argument("--out", default=None, help="study folder (default runs/studies/NAME)")
    parser.add_argument("--jobs", type=int, default=1, help="cells at a time (local; SLURM: %%N)")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--cell", type=int, default=None, help="run cell I only (array tasks)")
    how.add_argument("--list", action="store_true", help="list the cells and stop")
    how.add_argument("--aggregate", action="store_true", help="only aggregate finished cells")
    how.add_argument(
        "--slurm",
        nargs=argparse.REMAINDER,
        default=None,
        help="submit the unfinished cells as one SLURM array job; what follows goes to sbatch",
    )


def main(args: argparse.Namespace) -> int:
    from raptor.study.aggregate import aggregate
    from raptor.study.execute import cell_record, finished, run_cell, run_local, submit_slurm
    from raptor.study.spec import load_study

    study = load_study(args.study, args.overrides, args.out, validate=args.cell is None)
    if args.list:
        for cell in study.cells:
            rec = cell_record(study, cell)
            state = "finished" if finished(study, cell) else (rec or {}).get("status", "unfinished")
            print(f"{cell.index:3d}  {cell.name:<40}  {state:<8}  {' '.join(cell.overrides)}")
        return 0
    if args.aggregate:
        aggregate(study)
        print((study.out / "study.md").read_text())
        return 0
    if args.slurm is not None:
        submit_slurm(study, args.slurm, args.jobs if args.jobs > 1 else 0)
        return 0
    if args.cell is not None:
        if not 0 <= args.cell < len(study.cells):
            raise UserError(f"--cell {args.cell}: the study has cells 0..{len(study.cells) - 1}")
        record = run_cell(study, study.cells[args.cell])
        aggregate(study)
        if record["status"] != "ok":
            raise RunFailed(f"cell {record['cell']} failed: {record['error']}")
        return 0
    records = run_local(study, args.jobs)
    result = aggregate(study)
    print((study.out / "study.md").read_text())
    failed = [r for r in records if r["status"] != "ok"]
    print(
        f"[study] {result['finished']} of {len(study.cells)} cells finished; results in {study.out}"
    )
    if failed:
        names = ", ".join(f"{r['cell']} ({r['error']})" for r in failed)
        raise RunFailed(
            f"{len(failed)} cell(s) failed: {names}; see cells/NAME/cell.log or error.txt"
        )
    return 0
