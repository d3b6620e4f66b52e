"""The exported backbone as a model repository: the README.md card shows the run's numbers,
loading checks the weights' sha256 and the self-test config.json records (naming an edited
field or a swapped file), and huggingface_hub's mixin saves, reloads and pushes it.

Runs are laid out as the pipeline does (NAME/k2/stage2 with its evaluation in NAME/k2/eval);
the eval.json there is written in `raptor eval`'s format with numbers drawn here.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from test_export import VARIANTS, make_raptor, make_teacher_file, write_checkpoint

from raptor.cli import main as cli_main
from raptor.model.backbone import BackboneFormatError, RaptorBackbone

LAYERS = 4


def write_eval(folder: Path, checkpoint: Path, seed: int = 3) -> dict:
    """An eval.json as `raptor.eval.fidelity.evaluate` writes it, with distinct numbers, and
    a plot beside it."""
    g = torch.Generator().manual_seed(seed)

    def per_layer(missing=()):
        return {
            group: [
                None if i in missing else float(v)
                for i, v in enumerate(torch.rand(LAYERS, generator=g))
            ]
            for group in ("all", "cls", "reg", "patch")
        }

    ev = {
        "checkpoint": str(checkpoint),
        "stage": 2,
        "num_layers": LAYERS,
        "boundaries": [2],
        "images": 360,
        "layers": list(range(1, LAYERS + 1)),
        "student": {"r2": per_layer(), "cos": per_layer()},
        "identity": {"r2": per_layer(), "cos": per_layer()},
        "loss": [0.1] * LAYERS,
        "top1": {"teacher": 0.9611, "student": 0.9333, "ratio": 0.9333 / 0.9611},
        "complete": True,
        "missing": 0,
        "dmd": {"span": {"r2": per_layer()}, "endpoint": {"r2": per_layer(missing=(0, 2))}},
    }
    folder.mkdir(parents=True)
    (folder / "eval.json").write_text(json.dumps(ev, indent=1))
    (folder / "fidelity.png").write_bytes(b"\x89PNG\r\n\x1a\n a plot of the run")
    return ev


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """NAME/k2/stage2 (a checkpoint) and NAME/k2/eval (its evaluation)."""
    root = tmp_path_factory.mktemp("run") / "demo"
    teacher_file = make_teacher_file(root / "teacher.safetensors", **VARIANTS["dinov2_reg"])
    stage2 = root / "k2" / "stage2"
    ckpt = write_checkpoint(stage2, teacher_file, make_raptor(2))
    ev = write_eval(root / "k2" / "eval", ckpt)
    return {"root": root, "stage2": stage2, "teacher": teacher_file, "eval": ev}


@pytest.fixture(scope="module")
def exported_card(pipeline_run, tmp_path_factory):
    """`raptor export NAME/k2/stage2` into its default folder; (folder, printed output)."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli_main(["export", str(pipeline_run["stage2"])]) == 0
    return pipeline_run["root"] / "k2" / "export" / "backbone", buf.getvalue()


def table_rows(card: str, header_start: str) -> list:
    """The cells of the markdown table whose header row starts with `header_start`."""
    lines = card.splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[i + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return [c.strip() for c in lines[i].strip("|").split("|")], rows


def test_card_renders_the_runs_evaluation(pipeline_run, exported_card):
    out, printed = exported_card
    ev = pipeline_run["eval"]
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "fidelity.png",
        "model.safetensors",
    ]
    card = (out / "README.md").read_text()

    header, rows = table_rows(card, "| layer |")
    assert header == ["layer", "Raptor", "identity", "DMD span", "DMD endpoint"]
    expected = {
        "Raptor": ev["student"]["r2"]["all"],
        "identity": ev["identity"]["r2"]["all"],
        "DMD span": ev["dmd"]["span"]["r2"]["all"],
        "DMD endpoint": ev["dmd"]["endpoint"]["r2"]["all"],
    }
    assert [int(r[0]) for r in rows] == ev["layers"]
    for column, values in expected.items():
        cells = [r[header.index(column)] for r in rows]
        for cell, value in zip(cells, values):
            if value is None:
                assert cell == "n/a"
            else:
                assert float(cell) == pytest.approx(value, abs=5e-5), column
    _, (top1,) = table_rows(card, "| teacher top-1 |")
    assert float(top1[0].rstrip("%")) == pytest.approx(100 * ev["top1"]["teacher"], abs=5e-3)
    assert float(top1[1].rstrip("%")) == pytest.approx(100 * ev["top1"]["student"], abs=5e-3)
    assert float(top1[2]) == pytest.approx(ev["top1"]["ratio"], abs=5e-5)
    assert f"{ev['images']} validation images" in card

    # the plot beside it, the run's teacher, partition, training and the papers
    assert "![per-layer fidelity](fidelity.png)" in card
    assert (out / "fidelity.png").read_bytes() == (
        pipeline_run["root"] / "k2" / "eval" / "fidelity.png"
    ).read_bytes()
    assert card.startswith("---\nlibrary_name: raptor\n")
    assert f"the file `{pipeline_run['teacher']}`" in card
    assert "k=2" in card and "block 1: layers 1-2, block 2: layers 3-4" in card
    assert "optimizer step [7]" in card and "stage 1: 10000 steps, stage 2: 10000 steps" in card
    config = json.loads((out / "config.json").read_text())
    assert f"`{config['weights_sha256']}`" in card
    assert "Block-Recurrent Dynamics in Vision Transformers" in card and "ICLR 2026" in card
    assert "Dynamic Mode Decomposition along Depth in Vision Transformers" in card
    assert "arXiv:2605.07556" in card
    assert 'RaptorBackbone.from_pretrained("' in card

    # progress, one line per step with its time
    steps = [line for line in printed.splitlines() if line.startswith("export: ")]
    assert [re.sub(r" .*", "", s[len("export: ") :]) for s in steps] == [
        "loaded",
        "wrote",
        "verified:",
    ]
    assert all(re.search(r"\(\d+\.\d s\)$", s) for s in steps)
    assert str(pipeline_run["root"] / "k2" / "eval" / "eval.json") in steps[1]


def test_card_leaves_out_the_evaluation_of_another_checkpoint(pipeline_run, tmp_path):
    root = tmp_path / "other"
    shutil.copytree(pipeline_run["root"], root)
    ev_file = root / "k2" / "eval" / "eval.json"
    ev = json.loads(ev_file.read_text())
    ev["checkpoint"] = str(tmp_path / "elsewhere" / "last.ckpt")
    ev_file.write_text(json.dumps(ev))
    assert cli_main(["export", str(root / "k2" / "stage2"), "--out", str(tmp_path / "out")]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Not evaluated" in card and "| layer |" not in card
    assert not (tmp_path / "out" / "fidelity.png").exists()


@pytest.fixture
def export_copy(exported_card, tmp_path):
    return Path(shutil.copytree(exported_card[0], tmp_path / "backbone"))


def _edit(folder: Path, edit) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def _fails(folder: Path, message: str) -> str:
    with pytest.raises(BackboneFormatError, match=message) as info:
        RaptorBackbone.from_pretrained(folder)
    text = str(info.value)
    assert "\n" not in text and str(folder) in text
    return text


def test_edited_num_heads_is_named(export_copy):
    _edit(export_copy, lambda c: c["architecture"].update(num_heads=4))
    _fails(
        export_copy,
        r"config\.json: edited after export: architecture\.num_heads is 4, exported with 2",
    )


def test_edited_ln_eps_is_named(export_copy):
    _edit(export_copy, lambda c: c["architecture"].update(ln_eps=0.5))
    _fails(export_copy, r"architecture\.ln_eps is 0\.5, exported with 1e-05")


def test_swapped_weights_are_named(export_copy, tmp_path):
    """Another Raptor's weights of the same shapes (a different seed) in model.safetensors."""
    other_run = tmp_path / "other_run"
    teacher = make_teacher_file(tmp_path / "t.safetensors", seed=4, **VARIANTS["dinov2_reg"])
    write_checkpoint(other_run, teacher, make_raptor(2, seed=8))
    from raptor.train.export import export_backbone

    other = export_backbone(other_run, tmp_path / "other")
    shutil.copyfile(other / "model.safetensors", export_copy / "model.safetensors")
    _fails(
        export_copy,
        r"model\.safetensors: sha256 [0-9a-f]{12}\.\.\. differs from the weights_sha256",
    )


def test_self_test_catches_a_consistent_edit(export_copy):
    """An edit of a field and of its record together still fails: the outputs changed."""

    def edit(c):
        c["architecture"]["num_heads"] = 4
        c["self_test"]["fields"]["architecture.num_heads"] = 4

    _edit(export_copy, edit)
    _fails(export_copy, r"self_test: output at \(token, feature\) \(\d+, \d+\) is .* recorded ")


def test_mixin_round_trip_and_push(exported_card, tmp_path, monkeypatch):
    """save_pretrained / from_pretrained / push_to_hub come from PyTorchModelHubMixin; the
    hub's network calls (create_repo, upload_folder) are replaced, nothing else."""
    from huggingface_hub import HfApi, PyTorchModelHubMixin

    out, _ = exported_card
    original = RaptorBackbone.from_pretrained(out)
    assert isinstance(original, PyTorchModelHubMixin)
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = original.forward_features(images)

    original.save_pretrained(tmp_path / "saved")
    again = RaptorBackbone.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(again.forward_features(images), expected, rtol=0, atol=0)
    for name in ("README.md", "fidelity.png", "config.json"):  # same hash and self-test
        assert (tmp_path / "saved" / name).read_bytes() == (out / name).read_bytes(), name

    uploaded = {}

    def create_repo(self, repo_id, **kwargs):
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploaded["repo_id"] = repo_id
        shutil.copytree(folder_path, tmp_path / "pushed")
        return "https://huggingface.co/someone/raptor-k2/commit/0"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    again.push_to_hub("someone/raptor-k2")
    assert uploaded["repo_id"] == "someone/raptor-k2"
    pushed = RaptorBackbone.from_pretrained(tmp_path / "pushed")
    with torch.no_grad():
        torch.testing.assert_close(pushed.forward_features(images), expected, rtol=0, atol=0)
    assert (tmp_path / "pushed" / "README.md").read_text() == (out / "README.md").read_text()


def test_hub_id_offline_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(
        BackboneFormatError,
        match="not a local folder, and fetching it from the Hugging Face Hub failed",
    ):
        RaptorBackbone.from_pretrained("someone/raptor-missing", local_files_only=True)
