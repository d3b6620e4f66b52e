"""`raptor import-reference`: the reference code's pickled Block / Raptor modules, read without
running pickled code, mapped onto a Raptor and written as a `raptor fit` checkpoint.

The pickles are made here with stand-in classes registered under the reference's module
names (`block`, `raptor`) and attribute names only while saving; loading happens with
those modules gone, so it could not import them. The imported Raptor is checked against a
float64 forward written below from the stand-ins' weights, in the reference's order of
operations (nn.MultiheadAttention's packed [q; k; v], the t_proj scales, thresholds)."""

from __future__ import annotations

import math
import sys
import types
from contextlib import contextmanager

import pytest
import torch
from conftest import fit_overrides
from torch import nn

from raptor.cli import main as cli_main
from raptor.config import load_config
from raptor.model.raptor import Raptor
from raptor.train.checkpoints import load_blocks, load_raptor

DIM, HEADS, LAYERS = 32, 2, 4  # the tiny teacher's width, heads and depth


def reference_modules():
    """Stand-ins with the reference's module paths, class names and attribute names."""

    class LayerScale(nn.Module):
        __module__, __qualname__ = "block", "LayerScale"

        def __init__(self, dim):
            super().__init__()
            self.gamma = nn.Parameter(torch.ones(dim))

    class SwiGLU(nn.Module):
        __module__, __qualname__ = "block", "SwiGLU"

    class Block(nn.Module):
        __module__, __qualname__ = "block", "Block"

        def __init__(self, dim, num_heads, swiglu, t_scale, layer_scale=True):
            super().__init__()
            hid = 4 * dim
            self.t_scale = t_scale
            self.norm1 = nn.LayerNorm(dim)
            self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
            self.ls1 = LayerScale(dim) if layer_scale else nn.Identity()
            self.norm2 = nn.LayerNorm(dim)
            act = SwiGLU() if swiglu else nn.GELU()
            self.mlp = nn.Sequential(
                nn.Linear(dim, hid * (2 if swiglu else 1)), act, nn.Linear(hid, dim)
            )
            self.ls2 = LayerScale(dim) if layer_scale else nn.Identity()
            if t_scale:
                self.t_proj = nn.Sequential(nn.Linear(1, 16), nn.SiLU(), nn.Linear(16, 3 * dim))

    class ReferenceRaptor(nn.Module):
        __module__, __qualname__ = "raptor", "Raptor"

        def __init__(self, blocks, thresholds):
            super().__init__()
            self.blocks = nn.ModuleList(blocks)
            self.thresholds = thresholds

    block = types.ModuleType("block")
    block.Block, block.LayerScale, block.SwiGLU = Block, LayerScale, SwiGLU
    raptor = types.ModuleType("raptor")
    raptor.Raptor = ReferenceRaptor
    return block, raptor


@contextmanager
def registered(*modules):
    """The stand-in modules in sys.modules (shadowing this project's `raptor`) for a while."""
    saved = {m.__name__: sys.modules.get(m.__name__) for m in modules}
    sys.modules.update({m.__name__: m for m in modules})
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                del sys.modules[name]
            else:
                sys.modules[name] = old


def save(obj, path, modules):
    with registered(*modules):
        torch.save(obj, path)
    assert "block" not in sys.modules and sys.modules["raptor"].__file__.endswith("__init__.py")
    return path


def make_blocks(k, seed=0, swiglu=True, t_scale=True, layer_scale=True):
    """k stand-in Blocks with every weight random (visible LayerScale and depth scales)."""
    modules = reference_modules()
    torch.manual_seed(seed)
    blocks = [modules[0].Block(DIM, HEADS, swiglu, t_scale, layer_scale) for _ in range(k)]
    with torch.no_grad():
        for b in blocks:
            for name, p in b.named_parameters():
                p.copy_(torch.randn_like(p) * (0.3 if "t_proj" in name else 0.2))
                if name.startswith(("norm", "ls")):
                    p.add_(1.0 if name.startswith("norm") else 0.5)
    return blocks, modules


# ------------------------------------------------------------------ the reference, by hand


def linear(m, x):
    return x @ m.weight.double().T + m.bias.double()


def layer_norm(m, x):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + m.eps) * m.weight.double() + m.bias.double()


def attention(m, x):
    B, T, D = x.shape
    h = D // m.num_heads
    qkv = x @ m.in_proj_weight.double().T + m.in_proj_bias.double()
    q, k, v = (z.reshape(B, T, m.num_heads, h).transpose(1, 2) for z in qkv.split(D, dim=-1))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(h), dim=-1)
    return linear(m.out_proj, (weights @ v).transpose(1, 2).reshape(B, T, D))


def silu(x):
    return x / (1 + torch.exp(-x))


def reference_block(b, x, t):
    """The reference Block's computation for output layer t, in float64."""
    gamma = [
        getattr(b, n).gamma.double() if hasattr(getattr(b, n), "gamma") else 1.0
        for n in ("ls1", "ls2")
    ]
    s = [1.0, 1.0, 1.0]
    if b.t_scale:
        s = (
            linear(
                b.t_proj[2],
                silu(linear(b.t_proj[0], torch.tensor([[float(t)]], dtype=torch.float64))),
            )
            + 1
        ).chunk(3, -1)
    x = x + s[0] * gamma[0] * attention(b.attn, layer_norm(b.norm1, x))
    h = linear(b.mlp[0], layer_norm(b.norm2, x))
    if isinstance(b.mlp[1], nn.GELU):
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    else:
        gate, value = h.chunk(2, -1)
        h = silu(gate) * value
    x = x + s[1] * gamma[1] * linear(b.mlp[2], h)
    return s[2] * x


def reference_trajectory(blocks, thresholds, a0):
    """a_1..a_L (B, L, T, D): layer t by the first block whose threshold is >= t."""
    out, x = [], a0
    for t in range(1, LAYERS + 1):
        j = next((i for i, th in enumerate(thresholds) if t <= th), len(thresholds))
        x = reference_block(blocks[j], x, t)
        out.append(x)
    return torch.stack(out, 1)


# ------------------------------------------------------------------ helpers


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "reference.yaml"
    path.write_text("name: reference_import\n")
    return path


def overrides(tiny_teacher, digits_shards, **extra):
    return fit_overrides(tiny_teacher, digits_shards, **extra)


def run_import(ckpts, config_file, overrides, out):
    return cli_main(
        [
            "import-reference",
            *map(str, ckpts),
            "--config",
            str(config_file),
            *overrides,
            "--out",
            str(out),
        ]
    )


def assert_matches_reference(model: Raptor, blocks, thresholds):
    torch.manual_seed(1)
    a0 = torch.randn(2, 7, DIM, dtype=torch.float64)
    with torch.no_grad():
        got = model.double()(a0)
        want = reference_trajectory(blocks, thresholds, a0)
    assert want.abs().max() > 1.0  # the blocks move the tokens a lot
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-10), float((got - want).abs().max())


# ------------------------------------------------------------------ tests


def test_a_reference_raptor_becomes_a_stage2_run(
    tmp_path, tiny_teacher, digits_shards, config_file, capsys
):
    blocks, modules = make_blocks(2)
    ckpt = save(
        modules[1].Raptor(blocks, [2]),
        tmp_path / "final_raptor2_x_start_0_end_4_step_9.pt",
        modules,
    )
    out = tmp_path / "imported"
    opts = overrides(tiny_teacher, digits_shards, **{"phases.boundaries": "null"})
    assert run_import([ckpt], config_file, opts, out) == 0, capsys.readouterr().err

    model, ckpts, _ = load_raptor(out)
    hp = ckpts[0]["hyper_parameters"]
    assert (hp["stage"], hp["blocks"], model.boundaries) == (2, [1, 2], [2])
    assert hp["config"]["phases"]["boundaries"] == [2] and hp["config"]["train"]["stage"] == 2
    assert_matches_reference(model, blocks, [2])

    # what `raptor eval` reads: a stage-2 checkpoint whose stored config loads as this run's
    stored = load_config(None, [], stored=hp["config"])
    assert (stored.train.stage, stored.run_dir, stored.model.k) == (2, str(out), 2)

    # train.init_from: stage 2 of this config starts from exactly these weights
    fresh = Raptor(LAYERS, [2], DIM, HEADS)
    assert load_blocks(fresh, str(out)) == [1, 2]
    for (name, a), b in zip(fresh.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a.double(), b), name

    # export takes the run as it takes a `raptor fit` run
    assert cli_main(["export", str(out), "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "kind", [dict(swiglu=True, t_scale=True), dict(swiglu=False, t_scale=False, layer_scale=False)]
)
def test_stage1_block_files_become_a_stage1_run(
    tmp_path, tiny_teacher, digits_shards, config_file, kind, capsys
):
    """The phases come from the files' names (given out of order); a GELU block without
    depth scaling and without LayerScale maps too."""
    blocks, modules = make_blocks(3, seed=2, **kind)
    spans = [(0, 1), (1, 3), (3, 4)]
    files = [
        save(
            b,
            tmp_path / f"final_weighted_False_t_scale_True_start_{s}_end_{e}_lr_0.0003_step_5.pt",
            modules,
        )
        for b, (s, e) in zip(blocks, spans)
    ]
    out = tmp_path / "imported"
    model_opts = (
        {} if kind["swiglu"] else {"model.mlp": "gelu", "model.depth_conditioning": "false"}
    )
    opts = overrides(
        tiny_teacher, digits_shards, **{"model.k": 3, "phases.boundaries": "[1,3]", **model_opts}
    )
    assert run_import(files[::-1], config_file, opts, out) == 0, capsys.readouterr().err
    model, ckpts, _ = load_raptor(out)
    assert (ckpts[0]["hyper_parameters"]["stage"], model.boundaries) == (1, [1, 3])
    assert_matches_reference(model, blocks, [1, 3])


def test_options_and_partitions_that_differ_are_refused(
    tmp_path, tiny_teacher, digits_shards, config_file, capsys
):
    blocks, modules = make_blocks(2)
    ckpt = save(modules[1].Raptor(blocks, [2]), tmp_path / "raptor.pt", modules)
    cases = {
        "model.mlp": {"model.mlp": "gelu"},
        "phases.boundaries=[2]": {"phases.boundaries": "[1]"},
        "model.k=2": {"model.k": 3, "phases.boundaries": "null"},
    }
    for i, (named, extra) in enumerate(cases.items()):
        out = tmp_path / f"out{i}"
        assert (
            run_import([ckpt], config_file, overrides(tiny_teacher, digits_shards, **extra), out)
            == 2
        )
        err = capsys.readouterr().err.strip()
        assert named in err and "\n" not in err
        assert not (out / "checkpoints").exists()


class Payload:
    """Unpickling this runs `func(arg)`; `func` is pickled as a global."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize(
    "func, spelled", [("system", "posix.system"), ("eval", "__builtin__.eval")]
)
def test_any_other_global_is_refused_before_it_runs(
    tmp_path, tiny_teacher, digits_shards, config_file, func, spelled, capsys
):
    marker = tmp_path / "ran"
    import builtins
    import os

    payload = (
        Payload(os.system, f"touch {marker}")
        if func == "system"
        else Payload(builtins.eval, f"open({str(marker)!r}, 'w').close()")
    )
    blocks, modules = make_blocks(2)
    blocks[0].norm1.extra = payload  # deep inside an otherwise genuine reference Raptor
    ckpt = save(modules[1].Raptor(blocks, [2]), tmp_path / "evil.pt", modules)
    out = tmp_path / "imported"
    assert run_import([ckpt], config_file, overrides(tiny_teacher, digits_shards), out) == 2
    err = capsys.readouterr().err.strip()
    assert f"refused to unpickle the global {spelled}" in err and "\n" not in err
    assert not marker.exists() and not out.exists()
    # the payload is real: unpickled the ordinary way, with the stand-ins importable, it runs
    with registered(*modules):
        torch.load(ckpt, weights_only=False)
    assert marker.exists()
