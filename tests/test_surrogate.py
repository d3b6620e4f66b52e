"""RecurrentBlock numerics against explicit float64 formulas; Raptor routing and rollout."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from raptor.config import ModelConfig
from raptor.model.partition import Partition
from raptor.model.raptor import Raptor, RecurrentBlock

D, H, T, B = 16, 4, 5, 3


def _unconditioned_copy(block: RecurrentBlock, **kwargs) -> RecurrentBlock:
    plain = RecurrentBlock(D, H, depth_conditioning=False, **kwargs)
    missing, unexpected = plain.load_state_dict(block.state_dict(), strict=False)
    assert not missing and set(unexpected) == {
        "depth_in.weight",
        "depth_in.bias",
        "depth_out.weight",
        "depth_out.bias",
    }
    return plain


def _explicit_attention(attn, x):
    """softmax(Q K^T / sqrt(d)) V per head, written out."""
    Bx, Tx, Dx = x.shape
    dh = Dx // attn.num_heads
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = qkv[..., :Dx], qkv[..., Dx : 2 * Dx], qkv[..., 2 * Dx :]
    heads = []
    for h in range(attn.num_heads):
        sl = slice(h * dh, (h + 1) * dh)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(dh)
        heads.append(torch.softmax(scores, dim=-1) @ v[..., sl])
    return torch.cat(heads, dim=-1) @ attn.proj.weight.T + attn.proj.bias


def test_attention_equals_explicit_softmax_in_float64():
    torch.manual_seed(0)
    block = RecurrentBlock(D, H).double()
    with torch.no_grad():  # non-zero biases so that they are exercised
        block.attn.qkv.bias.normal_()
        block.attn.proj.bias.normal_()
    x = torch.randn(B, T, D, dtype=torch.float64)
    torch.testing.assert_close(
        block.attn(x), _explicit_attention(block.attn, x), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_block_equals_its_documented_formula(mlp):
    """x <- x + s1*LS1(Attn(LN1 x)); x <- x + s2*LS2(MLP(LN2 x)); out s3*x, with
    s = W2 silu(W1 t + b1) + b2 + 1, checked in float64 with large depth weights."""
    torch.manual_seed(1)
    block = RecurrentBlock(D, H, mlp=mlp, layerscale_init=0.5, ln_eps=1e-6).double()
    with torch.no_grad():
        block.depth_out.weight.normal_(std=0.1)
        block.depth_out.bias.normal_(std=0.1)
    x = torch.randn(B, T, D, dtype=torch.float64)
    t = torch.tensor([1, 5, 12])
    W1, b1 = block.depth_in.weight[:, 0], block.depth_in.bias
    W2, b2 = block.depth_out.weight, block.depth_out.bias
    expected = []
    for i in range(B):
        s = W2 @ F.silu(W1 * float(t[i]) + b1) + b2 + 1
        s1, s2, s3 = s[:D], s[D : 2 * D], s[2 * D :]
        xi = x[i : i + 1]
        ln1 = F.layer_norm(xi, (D,), block.norm1.weight, block.norm1.bias, eps=1e-6)
        xi = xi + s1 * 0.5 * _explicit_attention(block.attn, ln1)
        ln2 = F.layer_norm(xi, (D,), block.norm2.weight, block.norm2.bias, eps=1e-6)
        xi = xi + s2 * 0.5 * block.mlp(ln2)
        expected.append(s3 * xi)
    torch.testing.assert_close(block(x, t), torch.cat(expected), rtol=1e-12, atol=1e-12)
    # an int t applies to every row
    row = block(x, 5)[1]
    torch.testing.assert_close(row, block(x, t)[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layerscale_init", [1e-5, 1.0])
def test_depth_conditioned_block_at_init_is_near_unconditioned(layerscale_init):
    torch.manual_seed(2)
    for _ in range(3):
        block = RecurrentBlock(D, H, layerscale_init=layerscale_init)
        plain = _unconditioned_copy(block, layerscale_init=layerscale_init)
        x = torch.randn(B, T, D)
        ref = plain(x)
        for t in range(1, 5):  # deviation grows with t (see the docstring)
            rel = ((block(x, t) - ref).norm() / ref.norm()).item()
            assert 0 < rel < 1e-3, (t, rel)


@pytest.mark.parametrize(
    "mlp,ratio", [("swiglu", 4.0), ("swiglu", 2.5), ("gelu", 4.0), ("gelu", 3.0)]
)
def test_mlp_shapes_width_and_gate_first(mlp, ratio):
    torch.manual_seed(3)
    block = RecurrentBlock(D, H, mlp=mlp, mlp_ratio=ratio)
    hidden = int(D * ratio)
    fc1, fc2 = block.mlp.fc1, block.mlp.fc2
    assert fc1.weight.shape == ((2 if mlp == "swiglu" else 1) * hidden, D)
    assert fc2.weight.shape == (D, hidden)
    z = torch.randn(B, T, D)
    h = z @ fc1.weight.T + fc1.bias
    if mlp == "swiglu":  # first half is the gate
        act = F.silu(h[..., :hidden]) * h[..., hidden:]
    else:
        act = F.gelu(h)
    torch.testing.assert_close(block.mlp(z), act @ fc2.weight.T + fc2.bias)
    assert block(torch.randn(B, T, D), 3).shape == (B, T, D)


def test_block_options_and_errors():
    plain = RecurrentBlock(D, H, qkv_bias=False, depth_conditioning=False)
    assert plain.attn.qkv.bias is None and not hasattr(plain, "depth_in")
    assert plain(torch.randn(B, T, D)).shape == (B, T, D)
    assert torch.all(plain.ls1.gamma == 1e-5) and plain.norm1.eps == 1e-5
    with pytest.raises(ValueError, match="mlp must be 'swiglu' or 'gelu'"):
        RecurrentBlock(D, H, mlp="relu")
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        RecurrentBlock(D, 3)
    with pytest.raises(ValueError, match="needs the layer index"):
        RecurrentBlock(D, H)(torch.randn(B, T, D))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        RecurrentBlock(D, H)(torch.randn(B, T, D), torch.tensor([1, 2]))


def _partitions(num_layers, k):
    """Every boundary list of k contiguous phases of 1..num_layers."""
    from itertools import combinations

    return [list(c) for c in combinations(range(1, num_layers), k - 1)]


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_raptor_routes_every_layer_to_the_block_of_its_phase(k):
    torch.manual_seed(4)
    L = 6
    for boundaries in _partitions(L, k):
        model = Raptor(L, boundaries, D, H, mlp="gelu", mlp_ratio=1.0)
        seen = {j: [] for j in range(k)}
        hooks = [
            blk.register_forward_pre_hook(
                lambda mod, args, j=j, seen=seen: seen[j].append(int(args[1]))
            )
            for j, blk in enumerate(model.blocks)
        ]
        out = model(torch.randn(2, T, D))
        for h in hooks:
            h.remove()
        assert out.shape == (2, L, T, D)
        edges = [0, *boundaries, L]
        for j in range(k):
            layers = list(range(edges[j] + 1, edges[j + 1] + 1))
            assert seen[j] == layers
            assert model.phases[j] == (layers[0], layers[-1])
            assert all(model.block_of(layer) == j for layer in layers)


def test_step_with_a_tensor_of_layers_routes_each_row():
    torch.manual_seed(5)
    model = Raptor(6, [2, 4], D, H)
    with torch.no_grad():  # make the blocks clearly different
        for blk in model.blocks:
            blk.ls1.gamma.normal_()
            blk.ls2.gamma.normal_()
    a = torch.randn(5, T, D)
    layers = torch.tensor([6, 1, 3, 2, 5])
    out = model.step(a, layers)
    for i, layer in enumerate(layers.tolist()):
        torch.testing.assert_close(out[i : i + 1], model.step(a[i : i + 1], layer))
    with pytest.raises(ValueError, match="1..6"):
        model.step(a, torch.tensor([0, 1, 2, 3, 4]))


def test_rollout_equals_a_loop_of_steps():
    torch.manual_seed(6)
    model = Raptor(7, [3, 5], D, H)
    with torch.no_grad():
        for blk in model.blocks:
            blk.ls1.gamma.fill_(0.3)
            blk.ls2.gamma.fill_(0.3)
    a0 = torch.randn(2, T, D)
    for start, end in [(0, 7), (2, 6), (4, 5)]:
        a, expected = a0, []
        for layer in range(start + 1, end + 1):
            a = model.step(a, layer)
            expected.append(a)
        torch.testing.assert_close(model.rollout(a0, start, end), torch.stack(expected, 1))
    torch.testing.assert_close(model(a0), model.rollout(a0, 0, 7))
    with pytest.raises(ValueError, match="rollout needs"):
        model.rollout(a0, 5, 5)
    with pytest.raises(ValueError, match="outside 1..7"):
        model.block_of(8)


@pytest.mark.parametrize(
    "boundaries,k,message",
    [
        ([7, 7], 3, "strictly increasing"),
        ([10, 7], 3, "strictly increasing"),
        ([0, 7], 3, r"in 1\.\.11"),
        ([7, 12], 3, r"in 1\.\.11"),
        ([7], 3, "k=3 phases need 2 boundaries, got 1"),
        ([4, 7, 10], 3, "k=3 phases need 2 boundaries, got 3"),
    ],
)
def test_invalid_boundaries_fail_clearly(boundaries, k, message):
    teacher = SimpleNamespace(num_layers=12, embed_dim=D, num_heads=H)
    cfg = ModelConfig(k=k)
    with pytest.raises(ValueError, match=message):
        Raptor.from_config(cfg, teacher, Partition(12, boundaries))


def test_from_config_and_arch_round_trip():
    from omegaconf import OmegaConf

    teacher = SimpleNamespace(num_layers=5, embed_dim=D, num_heads=H)
    cfg = OmegaConf.structured(
        ModelConfig(k=2, num_heads=2, mlp="gelu", mlp_ratio=2.0, layerscale_init=0.1)
    )
    model = Raptor.from_config(cfg, teacher, Partition(5, [3]))
    assert model.num_heads == 2 and model.k == 2 and model.phases == [(1, 3), (4, 5)]
    arch = json.loads(json.dumps(model.arch_config()))  # plain JSON
    assert arch["mlp"] == "gelu" and arch["mlp_ratio"] == 2.0 and arch["boundaries"] == [3]
    assert "silu" in arch["depth_formula"]
    clone = Raptor.from_arch(arch)
    clone.load_state_dict(model.state_dict())
    a0 = torch.randn(2, T, D)
    torch.testing.assert_close(clone(a0), model(a0))
    assert Raptor.from_config(ModelConfig(k=2), teacher, Partition(5, [2])).num_heads == H
    with pytest.raises(ValueError, match="covers 6 layers, the teacher has 5"):
        Raptor.from_config(ModelConfig(k=2), teacher, Partition(6, [2]))
    with pytest.raises(ValueError, match="unknown block option"):
        Raptor(5, [3], D, H, mlp_hidden=3)
