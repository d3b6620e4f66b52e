"""The one-shot GPU suite (`make bench-gpu`, `python -m raptor.bench.gpu`): every GPU
figure issue 17 asks for, in one process, under a time budget, into one JSON and one
markdown table.

Sections, in order of importance (each one a `raptor bench` command run in-process, so
the figures are exactly what that command prints; a section that fails or needs a
missing package is recorded as such and the suite goes on; once `--budget-s` is spent
the remaining sections are skipped and say so):

1. `stage2`: stage-2 training steps at DINOv2 ViT-B/14-reg shapes (224 px, random
   weights), bf16 teacher and student, batch 64, interleaved with the reference-style
   baseline (`raptor.bench.train`, float32 and explicit softmax attention), plus the DMD
   moments pass over the teacher's forward on the same images (float64 products);
2. `stage2_compile`: the same with every block under torch.compile;
3. `stage2_max_batch`: the largest batch that fits (bounded search) and its images/s;
4. `stage1`: stage 1 (k = 3, teacher forcing on) with its baseline;
5. `dmd`: `raptor bench dmd` at ViT-B shapes (its own old/new moments figures);
6. `data`: `raptor bench data`, full-size JPEG shards read with CPU decoding
   (loader workers) and with data.decode=gpu.

`--dry-run` runs the same sections with tiny shapes on the CPU in seconds (torch.compile
with the `eager` backend; no largest-batch search, which needs CUDA memory): what the
test suite runs.

Packages: the suite imports only what `raptor bench` imports (torch, lightning, timm,
torchmetrics, torchvision, PIL, numpy, PyYAML, omegaconf; webdataset and braceexpand in
the `data` section); a section whose package is missing says which and the others run
(docs/BENCHMARKS.md shows how to carry the wheels to a machine without them).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional

TINY_CONFIG = """
name: bench_gpu_dry_run
data: {batch_size: 4}
teacher:
  name: vit_tiny_patch16_224
  img_size: 8
  patch_size: 4
  embed_dim: 32
  depth: 4
  num_heads: 2
  mlp_ratio: 2.0
  reg_tokens: 1
  num_classes: 0
model: {k: 2, mlp_ratio: 2.0}
phases: {boundaries: [3]}
train:
  stage1: {steps: 100, warmup_steps: 2}
  stage2: {steps: 100, warmup_steps: 2}
"""

FULL_CONFIG = "configs/dinov2_vitb14_reg_k3.yaml"
# issue 17's targets, by figure
TARGETS = {
    "stage 2 images/s": ">= 1600",
    "stage 2 fraction of bf16 peak": ">= 0.40",
    "stage 2 / reference-style baseline": ">= 7",
    "DMD moments pass / teacher forward": "<= 1.10",
}


def plan(dry_run: bool, work: Path) -> List[tuple]:
    """(section name, `raptor bench` argv without --json) for every section."""
    if dry_run:
        config = work / "tiny.yaml"
        config.write_text(TINY_CONFIG)
        train = [str(config), "--device", "cpu", "--threads", "1", "--steps", "2", "--warmup", "1"]
        dev = ["--device", "cpu", "--threads", "1"]
        dmd = ["--dim", "16", "--layers", "3", "--tokens", "5", "--budgets", "10", "20"]
        dmd += ["--batch-size", "10", "--rank", "4", "--skip-teacher"]
        data = ["--images", "16", "--image-size", "48x40", "--input-size", "32"]
        data += ["--batch-size", "4", "--workers", "0", "--threads", "1"]
        compile_backend, rounds, dmd_repeats = "eager", "1", "1"
    else:
        train = [FULL_CONFIG, "teacher.precision=bf16", "--device", "cuda"]
        train += ["--precision", "bf16-mixed", "--steps", "30", "--warmup", "10"]
        dev = ["--device", "cuda"]
        dmd = ["--dim", "768", "--layers", "12", "--tokens", "261", "--budgets", "256", "1024"]
        dmd += ["--batch-size", "64", "--rank", "256"]
        dmd += ["--teacher", "vit_base_patch16_224", "--teacher-batch", "64"]
        data = ["--images", "1024", "--image-size", "500x375", "--input-size", "224"]
        data += ["--batch-size", "64", "--workers", "4", "8"]
        compile_backend, rounds, dmd_repeats = "inductor", "3", "8"
    stage2 = ["train", *train, "--stage", "2", "--skip-separate"]
    sections = [
        ("stage2", [*stage2, "--baseline-rounds", rounds, "--dmd-repeats", dmd_repeats]),
        (
            "stage2_compile",
            [*stage2, "--compile", "--compile-backend", compile_backend]
            + ["--skip-baseline", "--skip-dmd-pass"],
        ),
    ]
    if not dry_run:  # the search needs CUDA's out-of-memory error
        sections.append(
            (
                "stage2_max_batch",
                [*stage2, "--max-batch", "--max-batch-limit", "2048"]
                + ["--skip-baseline", "--skip-dmd-pass", "--steps", "10", "--warmup", "3"],
            )
        )
    stage1 = ["train", *train, "--stage", "1", "--skip-separate", "--skip-dmd-pass"]
    sections += [
        ("stage1", [*stage1, "--baseline-rounds", "1" if dry_run else "2"]),
        ("dmd", ["dmd", *dmd, *dev]),
        ("data", ["data", *data, "--decode", "cpu", "gpu"]),
    ]
    return sections


def run_section(argv: List[str], json_path: Path) -> Dict[str, Any]:
    """One `raptor bench` command in this process; its JSON, or why there is none."""
    try:
        from raptor import cli

        rc = cli.main(["bench", *argv, "--json", str(json_path)])
    except ImportError as exc:
        return {"status": f"skipped: package missing here ({exc})"}
    except SystemExit as exc:  # argparse and the bench commands' own refusals
        return {
            "status": f"failed: {exc} (exit status {exc.code})"
            if isinstance(exc.code, str)
            else f"failed: exit status {exc.code}"
        }
    except Exception as exc:  # noqa: BLE001 - record it, run the other sections
        return {"status": f"failed: {type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    if rc != 0 or not json_path.is_file():
        return {"status": f"failed: exit status {rc}"}
    return {"status": "ok", "figures": json.loads(json_path.read_text())}


def run_suite(dry_run: bool, out: Path, budget_s: float, only: Optional[List[str]] = None):
    """Run every section (or `only` those) within `budget_s` seconds; write
    out/bench_gpu.json and out/bench_gpu.md; return the JSON object."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    sections: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="raptor-bench-gpu-") as tmp:
        for name, argv in plan(dry_run, Path(tmp)):
            if only and name not in only:
                continue
            elapsed = time.perf_counter() - start
            if elapsed > budget_s:
                sections[name] = {"status": f"skipped: time budget {budget_s:.0f} s spent"}
                continue
            print(f"\n=== bench-gpu: {name}: raptor bench {' '.join(argv)}", flush=True)
            t0 = time.perf_counter()
            result = run_section(argv, Path(tmp) / f"{name}.json")
            result["command"] = "raptor bench " + " ".join(argv)
            result["seconds"] = time.perf_counter() - t0
            sections[name] = result
    suite = {
        "bench": "gpu-suite",
        "dry_run": dry_run,
        "seconds": time.perf_counter() - start,
        "budget_s": budget_s,
        "env": _environment(),
        "summary": summarize(sections),
        "sections": sections,
    }
    (out / "bench_gpu.json").write_text(json.dumps(suite, indent=1))
    (out / "bench_gpu.md").write_text(markdown(suite))
    print(markdown(suite))
    print(f"wrote {out / 'bench_gpu.json'} and {out / 'bench_gpu.md'}")
    return suite


def _environment() -> Dict[str, Any]:
    import torch

    from raptor.bench.common import environment

    return environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def _get(sections: Dict[str, Any], name: str, *keys: str) -> Any:
    value = sections.get(name, {}).get("figures")
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def summarize(sections: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The headline rows: figure, value, target, the section it comes from."""
    rows: List[Dict[str, Any]] = []

    def row(figure: str, value: Any, section: str, note: str = "") -> None:
        rows.append(
            {
                "figure": figure,
                "value": value,
                "target": TARGETS.get(figure, ""),
                "section": section,
                "note": note or sections.get(section, {}).get("status", "not run"),
            }
        )

    batch = _get(sections, "stage2", "params", "batch_size")
    row("stage 2 images/s", _get(sections, "stage2", "result", "images_per_s"), "stage2")
    row(
        "stage 2 fraction of bf16 peak",
        _get(sections, "stage2", "result", "fraction_of_peak"),
        "stage2",
        f"batch {batch}" if batch else "",
    )
    row(
        "stage 2 / reference-style baseline",
        _get(sections, "stage2", "baseline", "images_per_s_ratio"),
        "stage2",
        "images/s ratio, interleaved rounds, medians",
    )
    row(
        "reference-style baseline images/s",
        _get(sections, "stage2", "baseline", "images_per_s_baseline"),
        "stage2",
    )
    compiled = _get(sections, "stage2_compile", "result", "images_per_s")
    eager = _get(sections, "stage2", "result", "images_per_s")
    row("stage 2 images/s, torch.compile", compiled, "stage2_compile")
    row(
        "torch.compile on / off",
        compiled / eager if compiled and eager else None,
        "stage2_compile",
        "separate runs, same batch",
    )
    row(
        "largest stage-2 batch",
        _get(sections, "stage2_max_batch", "params", "batch_size"),
        "stage2_max_batch",
    )
    row(
        "stage 2 images/s at the largest batch",
        _get(sections, "stage2_max_batch", "result", "images_per_s"),
        "stage2_max_batch",
    )
    row(
        "stage 2 fraction of bf16 peak at the largest batch",
        _get(sections, "stage2_max_batch", "result", "fraction_of_peak"),
        "stage2_max_batch",
    )
    row(
        "stage 1 images/s (k=3, teacher forcing on)",
        _get(sections, "stage1", "result", "images_per_s"),
        "stage1",
    )
    row(
        "stage 1 fraction of bf16 peak",
        _get(sections, "stage1", "result", "fraction_of_peak"),
        "stage1",
    )
    row(
        "stage 1 / reference-style baseline",
        _get(sections, "stage1", "baseline", "images_per_s_ratio"),
        "stage1",
    )
    row(
        "DMD moments pass / teacher forward",
        _get(sections, "stage2", "dmd_pass", "ratio"),
        "stage2",
        "float32 products into float64 sums (bench train's dmd_pass); bench dmd's own figures in the JSON",
    )
    for loader in _get(sections, "data", "loaders") or []:
        row(
            f"loader images/s, {loader['shards']}, decode={loader['decode']}, "
            f"{loader['workers']} workers",
            loader["images_per_s"],
            "data",
        )
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.0f}"
    return str(value)


def markdown(suite: Dict[str, Any]) -> str:
    """The summary as a markdown table, with the hardware and the sections' status."""
    env = suite["env"]
    lines = [
        f"# raptor bench-gpu{' (dry run, tiny shapes on CPU)' if suite['dry_run'] else ''}",
        "",
        f"{env.get('date')}; {env.get('device_name')}; torch {env.get('torch')}, "
        f"CUDA {env.get('cuda', '-')}; suite {suite['seconds']:.0f} s (budget {suite['budget_s']:.0f} s)",
        "",
        "| figure | value | target | section | note |",
        "|---|---:|---|---|---|",
    ]
    for r in suite["summary"]:
        lines.append(
            f"| {r['figure']} | {_cell(r['value'])} | {r['target']} | {r['section']} | {r['note']} |"
        )
    lines += ["", "| section | status | seconds | command |", "|---|---|---:|---|"]
    for name, s in suite["sections"].items():
        lines.append(
            f"| {name} | {s['status']} | {_cell(s.get('seconds'))} | `{s.get('command', '')}` |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m raptor.bench.gpu", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (seconds)")
    parser.add_argument(
        "--out", default="results/bench_gpu", help="folder for the JSON and markdown"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="start no section after this many seconds (default 420: the suite ends < 8 min)",
    )
    parser.add_argument("--only", nargs="+", help="run only these sections")
    args = parser.parse_args(argv)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device here: use --dry-run for the CPU rehearsal")
    suite = run_suite(args.dry_run, Path(args.out), args.budget_s, args.only)
    failed = [n for n, s in suite["sections"].items() if s["status"].startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
