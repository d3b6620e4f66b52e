"""Configs: typed schema, YAML composition, overrides, and errors that name the key."""

from pathlib import Path

import pytest
import yaml

from raptor.cli import main as cli_main
from raptor.config import ConfigError, load_config, save_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.name


def test_overrides_take_effect_and_win_over_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: a\ndata:\n  batch_size: 8\n")
    cfg = load_config(f, ["data.batch_size=32", "trainer.devices=2", "phases.boundaries=[3,5]"])
    assert cfg.data.batch_size == 32
    assert cfg.trainer.devices == 2
    assert list(cfg.phases.boundaries) == [3, 5]
    assert cfg.run_dir == "runs/a"  # interpolation resolved from the YAML's name


def test_defaults_compose_later_files_win(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\nmodel:\n  k: 2\n  mlp: gelu\n")
    (tmp_path / "child.yaml").write_text("defaults: [base.yaml]\nmodel:\n  k: 4\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.name, cfg.model.k, cfg.model.mlp) == ("base", 4, "gelu")


def test_unknown_key_names_key_and_nearest(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  batch_sise: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert "data.batch_sise" in str(err.value)
    assert "data.batch_size" in str(err.value)
    with pytest.raises(ConfigError, match=r"trainer\.devicez.*trainer\.devices"):
        load_config(None, ["trainer.devicez=2"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"wrong type.*'model\.k'"):
        load_config(None, ["model.k=three"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, ["model.k"])


def test_trainer_extra_accepts_free_keys():
    cfg = load_config(None, ["trainer.extra.limit_val_batches=2"])
    assert cfg.trainer.extra.limit_val_batches == 2


def test_save_config_round_trips(tmp_path):
    cfg = load_config(None, ["name=x", "model.k=2"])
    path = save_config(cfg, tmp_path / "run")
    again = load_config(path)
    assert again == cfg
    assert yaml.safe_load(path.read_text())["run_dir"] == "runs/x"


def test_cli_config_show(capsys, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: shown\n")
    assert cli_main(["config", "show", str(f), "stage=2"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["name"] == "shown" and out["train"]["stage"] == 2
    assert cli_main(["config", "show", str(f), "model.kk=1"]) == 2
    assert "model.kk" in capsys.readouterr().err
