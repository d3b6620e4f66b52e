"""The package layout's promises: raptor.model stays free of the training stack and
the command line, `import raptor` and `raptor config show` stay torch-free, and the
public API is reachable from the top level."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# What each layout test imports, in a fresh interpreter of its own. The four interpreters
# start together (`loaded`): each pays the imports of torch and Lightning, 5-10 s on 2 cores.
SCRIPTS = {
    "model": "import raptor.model.raptor, raptor.model.teacher, raptor.model.backbone, "
    "raptor.model.partition",
    "config_show": """
        import raptor
        from raptor.cli import main
        # demo.yaml sets trainer.num_threads, which does import torch to apply it
        assert main(["config", "show", "configs/demo.yaml", "trainer.num_threads=null"]) == 0
        """,
    "dmd": "import dmd, dmd.callback, dmd.evaluate, dmd.sweeps, dmd.plots",
    "evaluation": "import raptor.eval.validation, raptor.eval.phases, raptor.eval.dmd_baselines, "
    "raptor.eval.summary",
}


@pytest.fixture(scope="module")
def loaded() -> dict:
    """SCRIPTS' names -> the names in sys.modules after running the script."""
    procs = {}
    for name, code in SCRIPTS.items():
        script = textwrap.dedent(code) + "\nimport sys\nprint('MODULES', *sys.modules)\n"
        procs[name] = subprocess.Popen(
            [sys.executable, "-c", script], cwd=ROOT, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, (name, stderr)
        out[name] = set(stdout.split("MODULES", 1)[1].split())
    return out


def test_model_imports_without_lightning_or_the_command_line(loaded):
    loaded = loaded["model"]
    assert "raptor.model.teacher" in loaded
    heavy = {m for m in loaded if m.split(".")[0] in ("lightning", "pytorch_lightning")}
    assert heavy == set()
    outside = {m for m in loaded if m.startswith(("raptor.cli", "raptor.commands", "raptor.train"))}
    assert outside == set()


def test_import_raptor_and_config_show_stay_torch_free(loaded):
    loaded = loaded["config_show"]
    assert "raptor.commands.config" in loaded
    assert "torch" not in loaded


def test_public_api_from_the_top_level():
    import raptor
    from raptor import Partition, Raptor, RaptorBackbone, RecurrentBlock, Teacher, losses
    from raptor.model import backbone, partition, teacher
    from raptor.model import raptor as surrogate
    from raptor.train import losses as train_losses

    assert (Raptor, RecurrentBlock) == (surrogate.Raptor, surrogate.RecurrentBlock)
    assert (Teacher, RaptorBackbone) == (teacher.Teacher, backbone.RaptorBackbone)
    assert Partition is partition.Partition
    assert losses is train_losses
    with pytest.raises(AttributeError, match="no attribute 'Surrogate'"):
        _ = raptor.Surrogate


def test_dmd_imports_nothing_from_raptor(loaded):
    loaded = loaded["dmd"]
    assert "dmd.callback" in loaded
    assert {m for m in loaded if m.split(".")[0] == "raptor"} == set()


def test_evaluation_does_not_load_the_training_module(loaded):
    """Validation, phases, DMD baselines and summaries run without raptor.train.fit (the
    Distiller builds on raptor.eval.validation, not the other way round)."""
    loaded = loaded["evaluation"]
    assert "raptor.eval.validation" in loaded
    assert "raptor.train.fit" not in loaded
