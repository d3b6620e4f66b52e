"""`logging.tensorboard` and `raptor dashboard`: a tiny fit writes TensorBoard events next
to its metrics.csv; the dashboard, started as a subprocess, serves the same scalars (read
back through TensorBoard's HTTP API), the figures and tables sent to the loggers, and
stops on SIGINT with exit 130."""

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from conftest import fit_config, read_csv

pytest.importorskip(
    "tensorboard", reason="the tensorboard extra: pip install 'raptor-vit[tensorboard]'"
)

STEPS = 6


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory, tiny_teacher, digits_shards):
    """A pipeline-like root with one stage-1 run (k2/stage1) that logged to TensorBoard, a
    figure and a table sent through its loggers after the fit."""
    import numpy as np
    from matplotlib.figure import Figure

    from dmd.plots import save_figure
    from raptor.train import fit as distill
    from raptor.train.runs import make_loggers

    root = tmp_path_factory.mktemp("tb_root")
    run = root / "k2" / "stage1"
    cfg = fit_config(
        tiny_teacher,
        digits_shards,
        **{
            "train.stage": 1,
            "train.stage1.steps": STEPS,
            "train.val_every_n_steps": 3,
            "train.val_batches": 2,
            "logging.tensorboard": True,
        },
    )
    distill.fit(cfg, run)
    loggers = make_loggers(cfg, run)
    fig = Figure(figsize=(3, 2))
    fig.add_subplot().plot(np.arange(4), np.arange(4) ** 2)
    png = save_figure(fig, run, "fidelity", loggers, step=STEPS)
    for logger in loggers:
        if hasattr(logger, "log_table"):
            logger.log_table(
                key="per_layer", columns=["layer", "r2"], data=[[1, 0.25], [2, 0.125]], step=STEPS
            )
    return root, run, png


def _get(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return json.loads(r.read())


def _csv_series(run):
    """metrics.csv -> {metric: [(step, value), ...]} over the rows that have it."""
    rows = read_csv(run / "metrics.csv")
    series = {}
    for row in rows:
        for key, value in row.items():
            if key != "step" and value != "":
                series.setdefault(key, []).append((int(row["step"]), float(value)))
    return series


def test_dashboard_serves_the_runs_scalars_figures_and_tables(tb_run, free_port):
    import numpy as np
    from PIL import Image

    root, run, png = tb_run
    assert list(run.glob("events.out.tfevents.*")), "no TensorBoard events in the run folder"
    expected = _csv_series(run)
    assert len(expected) > 10 and "val/r2/L4" in expected and "train/loss" in expected
    proc = subprocess.Popen(
        [sys.executable, "-m", "raptor.cli", "dashboard", str(root), "--port", str(free_port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        first = proc.stdout.readline()
        url = proc.stdout.readline().split()[0]
        assert "k2/stage1" in first and url == f"http://127.0.0.1:{free_port}/", (first, url)
        deadline, tags = time.monotonic() + 60, {}
        while time.monotonic() < deadline:  # TensorBoard loads the events in the background
            tags = _get(free_port, "/data/plugin/scalars/tags").get("k2/stage1", {})
            if set(tags) >= set(expected):
                break
            time.sleep(0.5)
        assert set(tags) == set(expected), set(tags) ^ set(expected)
        for tag, values in expected.items():
            q = urllib.parse.urlencode({"run": "k2/stage1", "tag": tag})
            served = [(s, v) for _, s, v in _get(free_port, f"/data/plugin/scalars/scalars?{q}")]
            assert [s for s, _ in served] == [s for s, _ in values], tag
            for (_, got), (_, want) in zip(served, values):  # events store float32
                got = float(got)  # NaN and inf come as strings
                same = math.isnan(want) and math.isnan(got) or math.isclose(got, want, rel_tol=1e-6)
                assert same, (tag, got, want)

        images = _get(free_port, "/data/plugin/images/tags")["k2/stage1"]
        assert "fidelity" in images, images
        q = urllib.parse.urlencode({"run": "k2/stage1", "tag": "fidelity", "sample": 0})
        (entry,) = _get(free_port, f"/data/plugin/images/images?{q}")
        assert entry["step"] == STEPS
        path = f"/data/plugin/images/individualImage?{entry['query']}"
        with urllib.request.urlopen(f"http://127.0.0.1:{free_port}{path}", timeout=10) as r:
            served = np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"))
        with Image.open(png) as im:
            assert np.array_equal(served, np.asarray(im.convert("RGB")))
        tag = "per_layer/text_summary"  # torch's SummaryWriter.add_text names it so
        assert tag in _get(free_port, "/data/plugin/text/tags")["k2/stage1"]
        q = urllib.parse.urlencode({"run": "k2/stage1", "tag": tag})
        (text,) = _get(free_port, f"/data/plugin/text/text?{q}")
        assert text["step"] == STEPS and "<table>" in text["text"] and "0.125" in text["text"]
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err[-2000:]
    assert "dashboard stopped (SIGINT)" in out


def test_dashboard_stops_on_sigterm_with_143(tb_run, free_port):
    root = tb_run[0]
    cmd = [sys.executable, "-m", "raptor.cli", "dashboard", str(root), "--port", str(free_port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "k2/stage1" in proc.stdout.readline() and "http://" in proc.stdout.readline()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err[-2000:]
    assert "dashboard stopped (SIGTERM)" in out


def test_dashboard_without_event_files_fails_in_one_line(tmp_path, capsys):
    from raptor.cli import main

    (tmp_path / "k2" / "stage1").mkdir(parents=True)
    (tmp_path / "k2" / "stage1" / "metrics.csv").write_text("step\n")
    assert main(["dashboard", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.count("\n") == 0 and "no TensorBoard event files" in err and "tensorboard=true" in err
    )


def test_without_tensorboard_the_command_and_the_key_name_the_extra(
    tmp_path, capsys, monkeypatch, tiny_teacher, digits_shards
):
    from raptor.cli import main
    from raptor.errors import UserError
    from raptor.train.runs import make_loggers

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    assert main(["dashboard", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'raptor-vit[tensorboard]'" in err
    cfg = fit_config(tiny_teacher, digits_shards, **{"logging.tensorboard": True})
    with pytest.raises(UserError, match=r"logging.tensorboard=true needs the tensorboard"):
        make_loggers(cfg, tmp_path)


def test_tensorboard_is_off_by_default(tmp_path, tiny_teacher, digits_shards):
    from lightning.pytorch.loggers import TensorBoardLogger

    from raptor.train.runs import make_loggers

    loggers = make_loggers(fit_config(tiny_teacher, digits_shards), tmp_path)
    assert not any(isinstance(lg, TensorBoardLogger) for lg in loggers)
