"""`raptor probe` and `raptor analyze` under torchrun (2 CPU ranks, gloo) against one
process: the probe's ranks each extract their share of the images into one cache, which
holds every image once; the analysis is rank 0's of the images one process reads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from raptor.cli import main as cli_main
from raptor.eval.probe.features import FeatureCache
from tests.conftest import write_raptor
from tests.test_probe import config, probe_args

TIMEOUT = 300


def class_sums(cache: FeatureCache) -> dict:
    """Per label: (rows, sum of features, sum of squares), float64: the same for the same
    rows in any order, different when a row is missing or twice."""
    out: dict = {}
    for x, y in cache.chunks():
        for label in y.unique().tolist():
            rows = x[y == label].double()
            n, s, q = out.get(label, (0, 0.0, 0.0))
            out[label] = (n + rows.shape[0], s + rows.sum(0), q + rows.pow(2).sum(0))
    return out


@pytest.mark.slow
def test_two_ranks_share_the_probe_features_and_analyse_what_one_process_does(
    tiny_teacher, digits_shards, tmp_path, free_port
):
    from raptor.model.teacher import Teacher
    from tests.conftest import fit_config

    cfg = fit_config(tiny_teacher, digits_shards)
    raptor = tmp_path / "k2" / "stage2"
    write_raptor(raptor, cfg, Teacher.from_config(cfg.teacher).eval())
    runs = {}
    for name in ("one", "two"):
        folder = tmp_path / name
        probe = probe_args(
            tiny_teacher,
            digits_shards,
            folder,
            **{"probe.models": "[teacher,random]", "probe.epochs": 1},
        )
        analyze = [
            *probe_args(tiny_teacher, digits_shards, folder, **{"analyze.images": 40}),
            f"run_dir={folder / 'analysis'}",
            "model=teacher",
            f"model={raptor}",
        ]
        runs[name] = (["probe", config(tmp_path), *probe], ["analyze", config(tmp_path), *analyze])
    for argv in runs["one"]:
        assert cli_main(argv) == 0
    script = tmp_path / "both.py"
    script.write_text(
        "import sys\nfrom raptor.cli import main\n"
        f"for argv in {runs['two']!r}:\n    assert main(argv) == 0\n"
    )
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2"]
    launch += [f"--master-port={free_port}", str(script)]
    proc = subprocess.run(launch, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]

    for model in ("teacher", "random"):
        for split, total in (("train", 1438), ("val", 359)):
            one, two = (
                FeatureCache(d, json.loads((d / "cache.json").read_text()))
                for d in (tmp_path / r / "cache" / "cls" / model / f"L4-{split}" for r in runs)
            )
            assert one.rows == two.rows == total
            assert {c["file"].split("/")[0] for c in two.meta["chunks"]} == {"part-0", "part-1"}
            a, b = class_sums(one), class_sums(two)
            assert a.keys() == b.keys()
            for label in a:
                assert a[label][0] == b[label][0]
                torch.testing.assert_close(a[label][1], b[label][1], rtol=1e-9, atol=1e-6)
                torch.testing.assert_close(a[label][2], b[label][2], rtol=1e-9, atol=1e-6)
    one, two = (json.loads((tmp_path / r / "out" / "probe.json").read_text()) for r in runs)
    assert [m["at_init"] for m in one["models"]] == [m["at_init"] for m in two["models"]]
    one, two = (json.loads((tmp_path / r / "analysis" / "analysis.json").read_text()) for r in runs)
    assert one["images"] == two["images"] == 40
    assert json.dumps(one["stats"], sort_keys=True) == json.dumps(two["stats"], sort_keys=True)
