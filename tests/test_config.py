"""Configs: typed schema, YAML composition, overrides, and errors that name the key."""

import copy
import dataclasses
import functools
import re
import typing
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from raptor.cli import main as cli_main
from raptor.config import (
    ConfigError,
    Range,
    RaptorConfig,
    check_values,
    load_config,
    save_config,
)

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
    assert cfg.run_dir == ""  # unset: each command's folder under runs/a (run_folders)


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
    assert yaml.safe_load(path.read_text())["name"] == "x"


def test_cli_config_show(capsys, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: shown\n")
    assert cli_main(["config", "show", str(f), "stage=2"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["name"] == "shown" and out["train"]["stage"] == 2
    assert cli_main(["config", "show", str(f), "model.kk=1"]) == 2
    assert "model.kk" in capsys.readouterr().err


# --------------------------------------------------------------------------- valid ranges

# (override, the line `raptor config show` must print after "raptor config show: ")
OUT_OF_RANGE = [
    ("data.batch_size=0", "data.batch_size=0 is out of range: expected an integer >= 1"),
    ("data.batch_size=-4", "data.batch_size=-4 is out of range: expected an integer >= 1"),
    ("train.stage1.steps=0", "train.stage1.steps=0 is out of range: expected an integer >= 1"),
    ("train.stage1.steps=-5", "train.stage1.steps=-5 is out of range: expected an integer >= 1"),
    ("train.stage1.lr=nan", "train.stage1.lr=nan is out of range: expected a number >= 0"),
    ("data.val_fraction=1.5", "data.val_fraction=1.5 is out of range: expected a number in [0, 1)"),
    ("data.val_fraction=1", "data.val_fraction=1.0 is out of range: expected a number in [0, 1)"),
    (
        "logging.wandb=offlin",
        "logging.wandb=offlin is not a valid choice: expected one of online, offline, disabled"
        " (did you mean offline?)",
    ),
    # a sample of every section
    ("name=''", "name='' is empty: expected a non-empty string"),
    (
        "data.transform.crop_pct=0",
        "data.transform.crop_pct=0.0 is out of range: expected a number > 0",
    ),
    (
        "data.max_bad_fraction=1.01",
        "data.max_bad_fraction=1.01 is out of range: expected a number in [0, 1]",
    ),
    (
        "data.source=imagefolder",
        "data.source=imagefolder is not a valid choice: expected one of shards, digits, digit_scenes, imagefolder:PATH, ade20k:PATH, nyuv2:PATH (did you mean imagefolder:PATH?)",
    ),
    ("teacher.train.epochs=0", "teacher.train.epochs=0 is out of range: expected an integer >= 1"),
    (
        "teacher.drop_path_rate=1.0",
        "teacher.drop_path_rate=1.0 is out of range: expected a number in [0, 1)",
    ),
    (
        "teacher.precision=fp16",
        "teacher.precision=fp16 is not a valid choice: expected one of bf16, fp32",
    ),
    ("model.mlp=relu", "model.mlp=relu is not a valid choice: expected one of swiglu, gelu"),
    ("model.ln_eps=0", "model.ln_eps=0.0 is out of range: expected a number > 0"),
    (
        "phases.method=greedy",
        "phases.method=greedy is not a valid choice: expected one of dp, bisect",
    ),
    ("phases.ks=[2,0]", "phases.ks[1]=0 is out of range: expected an integer >= 1"),
    ("train.stage=3", "train.stage=3 is not a valid choice: expected one of 1, 2"),
    ("train.stage2.lr=-1e-3", "train.stage2.lr=-0.001 is out of range: expected a number >= 0"),
    (
        "train.stage1.loss=l1",
        "train.stage1.loss=l1 is not a valid choice: expected one of weighted, mse, weighted_final",
    ),
    (
        "dmd.solvers=[ridge,svd]",
        "dmd.solvers[1]=svd is not a valid choice: expected one of ridge, pcr, rrr",
    ),
    ("dmd.selections=[]", "dmd.selections=[] is empty: expected a non-empty list"),
    (
        "dmd.sweep.alphas=[1.0,-1.0]",
        "dmd.sweep.alphas[1]=-1.0 is out of range: expected a number >= 0",
    ),
    (
        "dmd.compute_dtype=float16",
        "dmd.compute_dtype=float16 is not a valid choice: expected one of float64, float32 (did you mean float64?)",
    ),
    (
        "logging.log_every_n_steps=0",
        "logging.log_every_n_steps=0 is out of range: expected an integer >= 1",
    ),
    (
        "trainer.devices=0",
        "trainer.devices=0 is out of range: expected auto, a device count >= 1, -1 (all devices), or a list of device indices like [0, 1]",
    ),
    (
        "trainer.precision=bf-16",
        "trainer.precision=bf-16 is not a valid choice: expected one of transformer-engine, transformer-engine-float16, 16-true, 16-mixed, bf16-true, bf16-mixed, 32-true, 64-true, 64, 32, 16, bf16 (did you mean bf16?)",
    ),
    ("export.onnx_opset=0", "export.onnx_opset=0 is out of range: expected an integer >= 1"),
    ("pipeline.ks=[]", "pipeline.ks=[] is empty: expected a non-empty list"),
]


@pytest.mark.parametrize("override,line", OUT_OF_RANGE, ids=[o for o, _ in OUT_OF_RANGE])
def test_config_show_rejects_out_of_range(override, line, capsys):
    """One line naming key, value and range; exit 2; no traceback."""
    assert cli_main(["config", "show", str(CONFIGS[0]), override]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"raptor config show: {line}\n"


@pytest.mark.parametrize(
    "override,key,expected",
    [
        ("data.val_fraction=0", "data.val_fraction", 0.0),
        ("data.max_bad_fraction=1", "data.max_bad_fraction", 1.0),
        ("data.source=imagefolder:/data/x", "data.source", "imagefolder:/data/x"),
        ("trainer.devices=-1", "trainer.devices", -1),
        ("trainer.devices=[0,3]", "trainer.devices", [0, 3]),
        ("trainer.devices='0,1'", "trainer.devices", "0,1"),
        ("trainer.precision=32", "trainer.precision", "32"),
        ("trainer.precision=bf16-mixed", "trainer.precision", "bf16-mixed"),
        ("teacher.drop_path_rate=null", "teacher.drop_path_rate", None),
        ("train.stage1.grad_clip=0", "train.stage1.grad_clip", 0.0),
        ("train.stage=2", "train.stage", 2),
    ],
)
def test_values_at_the_edge_of_a_range_load(override, key, expected):
    cfg = load_config(None, [override])
    value = OmegaConf.select(cfg, key)
    assert (list(value) if OmegaConf.is_list(value) else value) == expected


def _ranged_fields(schema=RaptorConfig, prefix=""):
    """(dotted key, Range, default) of every schema field with a Range rule."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _ranged_fields(hints[f.name], prefix + f.name + ".")
        elif isinstance(f.metadata.get("rule"), Range):
            yield prefix + f.name, f.metadata["rule"], hints[f.name]


RANGED = list(_ranged_fields())


def test_every_range_is_enforced_at_both_ends():
    """For every key with a Range, each finite end is accepted when closed and rejected when
    open, and a value just beyond it is rejected (by `check_values`, the check `load_config`
    runs; the cases above go through `raptor config show`)."""
    assert len(RANGED) > 60  # the walk found the schema's ranges
    defaults = OmegaConf.to_container(load_config(), resolve=True)
    for key, rule, hint in RANGED:
        is_int = "int" in str(hint)
        step = 1 if is_int else 1e-9
        for end, is_open, sign in ((rule.low, rule.open_low, -1), (rule.high, rule.open_high, 1)):
            if end is None:
                continue
            edge = int(end) if is_int else float(end)
            for value, ok in ((edge, not is_open), (edge + sign * step, False)):
                values = copy.deepcopy(defaults)
                *path, leaf = key.split(".")
                section = functools.reduce(dict.__getitem__, path, values)
                section[leaf] = [value] if "List" in str(hint) else value
                if ok:
                    check_values(values)
                else:
                    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}(\[0\])?="):
                        check_values(values)


def test_choices_match_the_libraries_that_take_them():
    """The names written out in the schema are the ones the code and libraries accept."""
    from lightning.fabric.connector import _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from timm.data.transforms import str_to_pil_interp

    import dmd
    from raptor import config
    from raptor.eval import phases

    lightning_precisions = typing.get_args(_PRECISION_INPUT_STR)
    assert set(config.PRECISIONS) == set(lightning_precisions) | set(
        typing.get_args(_PRECISION_INPUT_STR_ALIAS)
    )
    accelerators = _rule("trainer.accelerator").choices
    assert set(accelerators) == set(AcceleratorRegistry.available_accelerators()) | {"auto", "gpu"}
    for name in _rule("data.transform.interpolation").choices:
        str_to_pil_interp(name)  # raises KeyError for a name timm does not know
    assert config.PHASE_METHODS == phases.METHODS and config.TOKEN_MODES == phases.TOKEN_MODES
    assert config.DMD_SOLVERS == dmd.SOLVERS and config.DMD_SELECTIONS == dmd.SELECTIONS
    assert config.DMD_ALPHA_MODES == dmd.solvers.ALPHA_MODES


def _rule(key):
    section, _, leaf = key.rpartition(".")
    node = OmegaConf.select(OmegaConf.structured(RaptorConfig), section)
    schema = OmegaConf.get_type(node)
    return next(f for f in dataclasses.fields(schema) if f.name == leaf).metadata["rule"]
