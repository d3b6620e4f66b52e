"""`raptor export` and `RaptorBackbone`: round trip against the in-training model, ONNX in
onnxruntime, refusal to overwrite, and clear errors for corrupted or mismatched files.

Checkpoints are written here in the layout `raptor fit` saves (raptor.train.fit.Distiller):
{"state_dict": {"raptor.*": ...} (the teacher's weights are left out), "hyper_parameters":
{"config", "arch", "stage", "blocks"}, "global_step"}; the teacher is a `raptor teacher`
safetensors file that the stored config points at.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_vit
from safetensors.torch import load_file, save_file

from raptor.cli import main as cli_main
from raptor.config import load_config, to_container
from raptor.model.backbone import BackboneFormatError, RaptorBackbone
from raptor.model.raptor import Raptor
from raptor.model.teacher import Teacher
from raptor.train.export import ExportError, export_backbone

DEPTH, DIM, HEADS, IMG, PATCH = 4, 32, 2, 16, 4
DATA_CONFIG = {
    "input_size": (3, IMG, IMG),
    "interpolation": "bilinear",
    "mean": (0.1, 0.2, 0.3),
    "std": (0.4, 0.5, 0.6),
    "crop_pct": 1.0,
    "crop_mode": "center",
}

# timm layouts of the stem and the final norm: DINOv2-reg (pos embed on patches only),
# DeiT (pos embed on [cls, patches]), CLIP-like (norm_pre, no patch bias, registers under a
# pos embed that covers them) with fc_norm pooling (no final norm)
VARIANTS = {
    "dinov2_reg": dict(reg_tokens=2, no_embed_class=True),
    "deit": dict(reg_tokens=0, no_embed_class=False),
    "clip_fcnorm": dict(
        reg_tokens=1, no_embed_class=False, pre_norm=True, global_pool="avg", fc_norm=True
    ),
}


def make_teacher_file(path: Path, seed: int = 0, **variant) -> Path:
    vit = make_vit(
        seed=seed,
        img_size=IMG,
        patch_size=PATCH,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=HEADS,
        num_classes=0,
        **variant,
    ).eval()
    with torch.no_grad():  # non-trivial prefix tokens, position embedding and norms
        for name, p in vit.named_parameters():
            if name in ("cls_token", "reg_token", "pos_embed") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.5)
    return Teacher(vit, data_config=DATA_CONFIG).save(path)


def make_raptor(k: int, seed: int = 1, **options) -> Raptor:
    """A Raptor far from its near-identity init: LayerScale ~1, visible depth conditioning."""
    torch.manual_seed(seed)
    boundaries = {1: [], 2: [2], 3: [1, 3]}[k]
    model = Raptor(DEPTH, boundaries, DIM, HEADS, **options)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.0)
            elif "depth_out" in name:
                p.normal_(std=0.1)
    return model


def write_checkpoint(run: Path, teacher_file: Path, model: Raptor, stage=2, blocks=None, **cfg_kw):
    overrides = [
        f"name={run.name}",
        f"teacher.weights={teacher_file}",
        f"model.k={model.k}",
        f"phases.boundaries={list(model.boundaries)}",
        f"train.stage={stage}",
        "data.transform.crop_pct=0.875",
    ] + [f"{k}={v}" for k, v in cfg_kw.items()]
    cfg = load_config(None, overrides)
    blocks = blocks or list(range(1, model.k + 1))
    ckpt = {
        "state_dict": {f"raptor.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {
            "config": to_container(cfg),
            "arch": model.arch_config(),
            "stage": stage,
            "blocks": blocks,
        },
        "global_step": 7,
    }
    path = run / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save(ckpt, path)
    return path


def reference_features(teacher_file: Path, model: Raptor, images: torch.Tensor) -> torch.Tensor:
    """timm's own forward_features with the teacher's blocks replaced by the Raptor's layers
    (independent of Teacher.embed and of the backbone's stem)."""
    vit = Teacher.from_config(load_config(None, [f"teacher.weights={teacher_file}"]).teacher).vit

    class Layer(torch.nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return model.step(x, self.layer)

    vit.blocks = torch.nn.Sequential(*[Layer(i) for i in range(1, DEPTH + 1)])
    with torch.no_grad():
        return vit.forward_features(images)


@pytest.fixture
def images():
    return torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(5))


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_equals_training_model(tmp_path, images, variant):
    teacher_file = make_teacher_file(tmp_path / "teacher.safetensors", **VARIANTS[variant])
    model = make_raptor(
        2 if variant != "deit" else 3, mlp="gelu" if variant == "deit" else "swiglu"
    )
    run = tmp_path / "run"
    write_checkpoint(run, teacher_file, model)
    report = {}
    out = export_backbone(run, tmp_path / "export", report=report)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    assert report["torch_rel_error"] <= 1e-5

    backbone = RaptorBackbone.from_pretrained(out)
    ref = reference_features(teacher_file, model, images)
    with torch.no_grad():
        tokens = backbone.forward_features(images)
        pooled = backbone(images)
        traj = backbone.trajectory(images)
        normed = backbone.norm(traj)
    R = VARIANTS[variant]["reg_tokens"]
    T = 1 + R + (IMG // PATCH) ** 2
    assert tokens.shape == ref.shape == (3, T, DIM)
    assert rel(tokens, ref) < 1e-5
    torch.testing.assert_close(pooled, torch.cat([ref[:, 0], ref[:, 1 + R :].mean(1)], dim=-1))
    assert traj.shape == (3, DEPTH + 1, T, DIM)
    torch.testing.assert_close(normed[:, -1], tokens)
    # the blocks matter (a wrongly routed or untrained Raptor would not match)
    assert rel(tokens, normed[:, 0]) > 1e-2

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format_version"] == 1
    assert cfg["phases"]["boundaries"] == model.boundaries
    assert cfg["phases"]["layers_of_block"] == [list(p) for p in model.phases]
    assert {k: cfg["tokens"][k] for k in ("num_tokens", "cls", "reg", "patch")} == {
        "num_tokens": T,
        "cls": 1,
        "reg": R,
        "patch": T - 1 - R,
    }
    assert cfg["depth_conditioning"]["enabled"] is True
    assert cfg["stem"]["no_embed_class"] == VARIANTS[variant]["no_embed_class"]
    assert cfg["stem"]["norm_pre"] == (
        {"type": "layernorm", "eps": 1e-6, "affine": True, "bias": True}
        if variant == "clip_fcnorm"
        else None
    )
    assert cfg["final_norm"]["type"] == ("identity" if variant == "clip_fcnorm" else "layernorm")
    prep = cfg["preprocessing"]
    assert prep["mean"] == [0.1, 0.2, 0.3] and prep["std"] == [0.4, 0.5, 0.6]
    assert prep["crop_pct"] == 0.875 and prep["interpolation"] == "bilinear"
    assert prep["input_size"] == [3, IMG, IMG]
    assert cfg["source"]["stage"] == 2 and cfg["source"]["global_step"] == [7]


def test_cli_onnx_matches_onnxruntime(tmp_path, capsys):
    import onnxruntime as ort

    teacher_file = make_teacher_file(tmp_path / "teacher.safetensors", **VARIANTS["dinov2_reg"])
    run = tmp_path / "run"
    write_checkpoint(run, teacher_file, make_raptor(2))
    out = tmp_path / "export"
    assert cli_main(["export", str(run), "--out", str(out), "--onnx"]) == 0
    printed = capsys.readouterr().out
    assert "onnxruntime vs torch: relative error" in printed
    assert (out / "model.onnx").is_file()

    # another batch size than the one traced: the batch axis is dynamic
    x = torch.randn(5, 3, IMG, IMG, generator=torch.Generator().manual_seed(9))
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    tokens, pooled = session.run(["tokens", "pooled"], {"images": x.numpy()})
    backbone = RaptorBackbone.from_pretrained(out)
    with torch.no_grad():
        assert rel(torch.from_numpy(tokens), backbone.forward_features(x)) <= 1e-4
        assert rel(torch.from_numpy(pooled), backbone(x)) <= 1e-4


def test_refuses_non_empty_out_without_overwrite(tmp_path):
    teacher_file = make_teacher_file(tmp_path / "teacher.safetensors", **VARIANTS["deit"])
    run = tmp_path / "run"
    write_checkpoint(run, teacher_file, make_raptor(2))
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty; pass --overwrite"):
        export_backbone(run, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert cli_main(["export", str(run), "--out", str(out)]) == 2

    (out / "model.onnx").write_text("stale")
    export_backbone(run, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "notes.txt",
    ]
    assert (out / "notes.txt").read_text() == "mine"


def test_stage1_runs_of_single_blocks_are_joined(tmp_path, images):
    teacher_file = make_teacher_file(tmp_path / "teacher.safetensors", **VARIANTS["dinov2_reg"])
    model = make_raptor(2)
    runs = []
    for j in (1, 2):  # each run holds the trained block j and an untrained other block
        part = make_raptor(2, seed=10 + j)
        part.blocks[j - 1].load_state_dict(model.blocks[j - 1].state_dict())
        runs.append(tmp_path / f"block{j}")
        write_checkpoint(
            runs[-1], teacher_file, part, stage=1, blocks=[j], **{"train.blocks": f"[{j}]"}
        )
    with pytest.raises(ExportError, match=r"trained block\(s\) \[1\] of 2"):
        export_backbone(runs[0], tmp_path / "one")
    out = export_backbone(",".join(map(str, runs)), tmp_path / "joined")
    with torch.no_grad():
        got = RaptorBackbone.from_pretrained(out).forward_features(images)
    assert rel(got, reference_features(teacher_file, model, images)) < 1e-5


@pytest.fixture(scope="module")
def exported_once(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exported")
    teacher_file = make_teacher_file(tmp / "teacher.safetensors", **VARIANTS["dinov2_reg"])
    write_checkpoint(tmp / "run", teacher_file, make_raptor(2))
    return export_backbone(tmp / "run", tmp / "export")


@pytest.fixture
def exported(exported_once, tmp_path):
    """A fresh copy of one export, free to corrupt."""
    return Path(shutil.copytree(exported_once, tmp_path / "export"))


def _edit_config(out: Path, edit) -> None:
    cfg = json.loads((out / "config.json").read_text())
    edit(cfg)
    (out / "config.json").write_text(json.dumps(cfg))


def _edit_weights(out: Path, edit) -> None:
    path = out / "model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata={"format": "raptor-backbone", "format_version": "1"})


CORRUPTIONS = {
    "truncated weights": (
        lambda out: (out / "model.safetensors").write_bytes(
            (out / "model.safetensors").read_bytes()[:1000]
        ),
        r"model\.safetensors: not a readable safetensors file",
    ),
    "garbage weights": (
        lambda out: (out / "model.safetensors").write_bytes(b"\x80\x04not a safetensors file" * 10),
        r"model\.safetensors: not a readable safetensors file",
    ),
    "missing weights": (
        lambda out: (out / "model.safetensors").unlink(),
        r"model\.safetensors: file not found",
    ),
    "bad json": (
        lambda out: (out / "config.json").write_text('{"format": "raptor-backbone", '),
        r"config\.json: not valid JSON",
    ),
    "unknown version": (
        lambda out: _edit_config(out, lambda c: c.update(format_version=99)),
        r"format_version 99 is not one this raptor reads \(1\)",
    ),
    "not a backbone": (
        lambda out: _edit_config(out, lambda c: c.update(format="something-else")),
        r"not a raptor backbone export",
    ),
    "missing section": (
        lambda out: _edit_config(out, lambda c: c.pop("stem")),
        r"config\.json: missing key 'stem'",
    ),
    "phases disagree": (
        lambda out: _edit_config(out, lambda c: c["phases"].update(boundaries=[3])),
        r"phases\.boundaries=\[3\] disagrees with architecture\.boundaries=\[2\]",
    ),
    "wider config": (
        lambda out: _edit_config(
            out, lambda c: (c["architecture"].update(dim=64), c["stem"].update(embed_dim=64))
        ),
        r"model\.safetensors does not match config\.json: wrong shapes \[",
    ),
    "token counts": (
        lambda out: _edit_config(out, lambda c: c["tokens"].update(reg=3)),
        r"tokens: .* does not match the stem",
    ),
    "missing tensor": (
        lambda out: _edit_weights(out, lambda s: s.pop("norm.weight")),
        r"missing tensors \[norm\.weight\]",
    ),
    "extra tensor": (
        lambda out: _edit_weights(out, lambda s: s.update({"head.weight": torch.zeros(2, 2)})),
        r"unexpected tensors \[head\.weight\]",
    ),
    "extra block": (
        lambda out: _edit_config(
            out,
            lambda c: (
                c["architecture"].update(boundaries=[1, 2]),
                c["phases"].update(boundaries=[1, 2]),
            ),
        ),
        r"missing tensors \[raptor\.blocks\.2\.",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupted_or_mismatched_files_fail_clearly(exported, case, monkeypatch):
    corrupt, message = CORRUPTIONS[case]
    corrupt(exported)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("from_pretrained must not unpickle anything")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    with pytest.raises(BackboneFormatError, match=message) as info:
        RaptorBackbone.from_pretrained(exported)
    assert str(exported) in str(info.value)


def test_wrong_image_size_is_named(exported):
    backbone = RaptorBackbone.from_pretrained(exported)
    with pytest.raises(
        ValueError, match=r"expected shape \(B, 3, 16, 16\) \(the exported resolution\)"
    ):
        backbone(torch.zeros(1, 3, 32, 32))


def test_loads_without_the_training_stack(exported, images, tmp_path):
    """from_pretrained in a fresh interpreter where timm, lightning, wandb and omegaconf
    cannot be imported."""
    np.save(tmp_path / "x.npy", images.numpy())
    script = textwrap.dedent(
        f"""
        import sys
        BLOCKED = ("timm", "lightning", "pytorch_lightning", "wandb", "omegaconf", "torchmetrics")
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import numpy as np, torch, raptor
        model = raptor.RaptorBackbone.from_pretrained({str(exported)!r})
        with torch.no_grad():
            out = model.forward_features(torch.from_numpy(np.load({str(tmp_path / "x.npy")!r})))
        np.save({str(tmp_path / "y.npy")!r}, out.numpy())
        print(sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    with torch.no_grad():
        expected = RaptorBackbone.from_pretrained(exported).forward_features(images)
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "y.npy")), expected)
