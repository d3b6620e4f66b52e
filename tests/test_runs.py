"""Run folders: metrics.csv survives a resume; the W&B id is made once and reused."""

import csv

import pytest

from raptor.config import load_config
from raptor.train.runs import make_loggers, truncate_metrics, wandb_run_id


def test_csv_metrics_append_across_resumes(tmp_path):
    cfg = load_config(None, [])
    for run in range(2):  # the second logger is what a resumed run creates
        logger = make_loggers(cfg, tmp_path)[0]
        logger.log_metrics({"a": 1.0 + run}, step=run)
        if run == 1:
            logger.log_metrics({"b": 5.0}, step=2)  # a new column rewrites the header
        logger.save()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [r["a"] for r in rows] == ["1.0", "2.0", ""]
    assert [r["step"] for r in rows] == ["0", "1", "2"]
    assert rows[2]["b"] == "5.0"


def test_truncate_metrics_drops_what_a_resume_logs_again(tmp_path):
    cfg = load_config(None, [])
    logger = make_loggers(cfg, tmp_path)[0]
    for step in range(4):
        logger.log_metrics({"a": float(step)}, step=step)
    logger.log_metrics({"b": 9.0}, step=3)
    logger.save()
    truncate_metrics(tmp_path, 2)  # resumed from a checkpoint at step 2
    resumed = make_loggers(cfg, tmp_path)[0]
    resumed.log_metrics({"a": 2.5}, step=2)
    resumed.save()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [(r["step"], r["a"], r["b"]) for r in rows] == [
        ("0", "0.0", ""),
        ("1", "1.0", ""),
        ("2", "2.5", ""),
    ]
    truncate_metrics(tmp_path, 0)  # a fresh start in the same folder
    assert list(csv.DictReader(open(tmp_path / "metrics.csv"))) == []


def test_a_kill_while_new_columns_rewrite_the_file_keeps_its_rows(tmp_path, monkeypatch):
    """Lightning rewrites metrics.csv when new keys come (the first val/ metrics): a process
    that dies half-way through must leave the old file whole, not a header alone."""
    cfg = load_config(None, [])
    logger = make_loggers(cfg, tmp_path)[0]
    for step in range(3):
        logger.log_metrics({"a": float(step)}, step=step)
    logger.save()
    before = (tmp_path / "metrics.csv").read_text()

    def dies(self, rows):
        raise KeyboardInterrupt("killed while writing the rows")

    monkeypatch.setattr(csv.DictWriter, "writerows", dies)
    logger.log_metrics({"val/r2": 0.5}, step=3)
    with pytest.raises(KeyboardInterrupt):
        logger.save()
    assert (tmp_path / "metrics.csv").read_text() == before


def test_a_row_cut_by_a_kill_is_dropped_with_a_message_on_resume(tmp_path, capsys):
    path = tmp_path / "metrics.csv"
    path.write_text("a,b,step\n0.0,,0\n1.0,,1\n2.0,0.5")  # the last row cut short
    truncate_metrics(tmp_path, 5)
    assert "dropped 1 row(s) cut short" in capsys.readouterr().err
    resumed = make_loggers(load_config(None, []), tmp_path)[0]
    resumed.log_metrics({"a": 2.5}, step=2)
    resumed.save()
    rows = list(csv.DictReader(open(path)))
    assert [(r["step"], r["a"]) for r in rows] == [("0", "0.0"), ("1", "1.0"), ("2", "2.5")]


def test_wandb_id_is_stable(tmp_path):
    first = wandb_run_id(tmp_path)
    assert len(first) == 12 and wandb_run_id(tmp_path) == first


def test_each_run_folder_gets_its_own_wandb_run(tmp_path, monkeypatch):
    """Steps run in one process (the pipeline) must not log into the first step's run."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(None, ["logging.wandb=offline"])
    ids = []
    for name in ("a", "b"):
        logger = make_loggers(cfg, tmp_path / name)[1]
        logger.log_metrics({"x": 1.0}, step=0)
        ids.append(logger.experiment.id)
    assert ids == [wandb_run_id(tmp_path / "a"), wandb_run_id(tmp_path / "b")]
    assert len(list((tmp_path / "b" / "wandb").glob("offline-run-*"))) == 1
    import wandb

    wandb.finish()
