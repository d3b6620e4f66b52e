"""`raptor bench dmd`: the old and new moment updates side by side, the moments pass over
the teacher's forward, and the budget runs, from the command line."""

import json

import pytest
import torch
from test_bench import finite_numbers, run_cli

from raptor.bench.dmd import PATHS, allocator_peak


def test_allocator_peak_counts_live_tensors():
    def work():
        a = torch.empty(1000, 1000)  # 4 MB, alive with b
        b = torch.empty(500, 1000)  # 2 MB
        del a, b
        torch.empty(1500, 1000)  # 6 MB after both were freed: the peak again, not 12

    assert allocator_peak(work) == 6_000_000


def test_bench_dmd_prints_old_and_new_paths_and_the_teacher_ratio(tmp_path, capsys):
    out = tmp_path / "dmd.json"
    text = run_cli(
        [
            "bench", "dmd", "--dim", "16", "--layers", "5", "--tokens", "5",
            "--budgets", "20", "200", "--batch-size", "10", "--rank", "4",
            "--teacher", "vit_tiny_patch16_224", "--teacher-batch", "1", "--repeats", "1",
            "--device", "cpu", "--threads", "1", "--json", str(out),
        ],
        capsys,
    )  # fmt: skip
    for word in ("accumulate_s", "ridge_s", "rrr_s", "ratio_float32", "ratio_float64", *PATHS):
        assert word in text
    result = json.loads(out.read_text())
    finite_numbers(result)
    paths = {r["path"]: r for r in result["paths"]}
    old, new64, new32 = (paths[p] for p in PATHS)
    # the same moments: float64 blocks to rounding, float32 products to their bound
    assert new64["max_rel_diff"] < 1e-13 and new32["max_rel_diff"] < 1e-6
    # the old path copied the (10, 6, 5, 16) batch to float64 twice; the blocks hold 3 layers
    batch = 10 * 6 * 5 * 16
    assert old["allocated_mib"] * 2**20 >= 2 * 8 * batch
    assert new64["allocated_mib"] * 2**20 <= 3 * 8 * batch / 6 + 16 * 16 * 8 + 2 * 16 * 8
    teacher = result["teacher"]
    assert (teacher["layers"], teacher["tokens"], teacher["dim"]) == (12, 197, 192)
    for dtype in ("float64", "float32"):
        ratio = teacher[f"forward_and_{dtype}_moments_s"] / teacher["forward_s"]
        assert teacher[f"ratio_{dtype}"] == pytest.approx(ratio)
    rows = result["budgets"]
    assert [r["images"] for r in rows] == [20, 200]
    for r in rows:
        solve = r["ridge_s"] + r["pcr_s"] + r["rrr_s"]
        assert r["accumulate_share"] == pytest.approx(
            r["accumulate_s"] / (r["accumulate_s"] + solve)
        )
        assert r["accumulate_images_per_s"] == pytest.approx(r["images"] / r["accumulate_s"])
    assert result["summary"]["moments_mib (analytic, float64)"] == pytest.approx(
        11 * 16 * 16 * 8 / 2**20
    )
