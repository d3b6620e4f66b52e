"""W&B run ids: each run folder its own, the same one again when a folder is resumed."""

from raptor.config import load_config
from raptor.train.runs import WANDB_ID_FILE, make_loggers


def test_run_folders_get_distinct_wandb_ids_kept_on_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(None, ["logging.wandb=offline"])

    def wandb_id(folder):  # the id the W&B logger will open its run with (no run started)
        return make_loggers(cfg, folder)[1].version

    folders = [tmp_path / name for name in ("a", "b", "c")]
    ids = [wandb_id(f) for f in folders]
    assert len(set(ids)) == 3, ids
    # a resumed or requeued job in the same folder continues the same W&B run
    assert [wandb_id(f) for f in folders] == ids
    assert [(f / WANDB_ID_FILE).read_text().strip() for f in folders] == ids
