"""The teacher wrapper against timm's own forward, and its three local weight formats."""

from __future__ import annotations

import pytest
import torch
from conftest import make_vit as tiny_vit
from omegaconf import OmegaConf
from safetensors.torch import save_file

from raptor.config import ConfigError, TeacherConfig
from raptor.model.teacher import Teacher, TeacherLoadError

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, init_values=0.1)


def make_vit(reg_tokens=0, num_classes=5, seed=0, name="vit_tiny_patch16_224", **kw):
    args = dict(TINY, reg_tokens=reg_tokens, num_classes=num_classes)
    args.update(kw)
    vit = tiny_vit(seed, name, **args).eval()
    with torch.no_grad():  # non-trivial prefix tokens and position embeddings
        for p in (vit.cls_token, vit.reg_token, vit.pos_embed):
            if p is not None:
                p.normal_()
    return vit


def teacher_cfg(**kw):
    cfg = OmegaConf.structured(TeacherConfig)
    cfg.merge_with(kw)
    return cfg


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(3, 3, 16, 16)


@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_trajectory_matches_timm_forward_features(reg_tokens, images):
    vit = make_vit(reg_tokens)
    t = Teacher(vit)
    traj = t.trajectory(images)
    P = (16 // 4) ** 2
    assert t.num_layers == 3 and t.embed_dim == 32 and t.num_heads == 2
    assert t.num_reg_tokens == reg_tokens and t.num_prefix_tokens == 1 + reg_tokens
    assert t.num_tokens == 1 + reg_tokens + P
    assert traj.shape == (3, 4, t.num_tokens, 32) and traj.dtype == torch.float32
    with torch.no_grad():
        ref = vit.forward_features(images)
    torch.testing.assert_close(t.final_norm(traj[:, -1]), ref, rtol=1e-5, atol=1e-5)
    # token slices: cls and registers come from their own parameters, patches from the image
    g = t.groups
    assert set(g) == ({"cls", "reg", "patch"} if reg_tokens else {"cls", "patch"})
    a0 = traj[:, 0]
    with torch.no_grad():
        patches = vit.patch_embed(images)
        pos = vit.pos_embed[0]
        cls = vit.cls_token[0, 0] + pos[0]
        torch.testing.assert_close(a0[:, g["cls"]], cls.expand(3, 1, 32))
        torch.testing.assert_close(a0[:, g["patch"]], patches + pos[1 + reg_tokens :])
        if reg_tokens:
            torch.testing.assert_close(
                a0[:, g["reg"]], (vit.reg_token[0] + pos[1 : 1 + reg_tokens]).expand(3, -1, -1)
            )
    assert a0[:, g["patch"]].shape[1] == P


def test_step_embed_and_upto_are_consistent(images):
    t = Teacher(make_vit(2))
    traj = t.trajectory(images)
    torch.testing.assert_close(t.embed(images), traj[:, 0])
    for layer in range(1, t.num_layers + 1):
        torch.testing.assert_close(t.step(traj[:, layer - 1], layer), traj[:, layer])
    torch.testing.assert_close(t.trajectory(images, upto=1), traj[:, :2])
    with pytest.raises(IndexError):
        t.step(traj[:, 0], 0)
    with pytest.raises(IndexError):
        t.trajectory(images, upto=4)


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_finish_matches_vit_forward(global_pool, images):
    vit = make_vit(2, global_pool=global_pool)
    t = Teacher(vit)
    traj = t.trajectory(images)
    with torch.no_grad():
        logits = vit(images)
        feats = vit.forward_features(images)
    for layer in range(t.num_layers + 1):
        out = t.finish(traj[:, layer], layer)
        torch.testing.assert_close(out["logits"], logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["tokens"], feats, rtol=1e-5, atol=1e-5)
    # pooled = [cls ; mean of the patch tokens], registers excluded
    expect = torch.cat([feats[:, 0], feats[:, 3:].mean(1)], dim=1)
    torch.testing.assert_close(out["pooled"], expect, rtol=1e-5, atol=1e-5)
    assert Teacher(make_vit(2, num_classes=0)).finish(traj[:, 0], 0)["logits"] is None


def test_frozen_and_eval_even_after_train(images):
    t = Teacher(make_vit(1, drop_path_rate=0.5))
    t.train()
    assert not t.training and not any(m.training for m in t.modules())
    assert not any(p.requires_grad for p in t.parameters())
    torch.testing.assert_close(t.trajectory(images), t.trajectory(images))  # no stochastic depth


def test_float32_on_cpu_inside_outer_autocast(images):
    t = Teacher(make_vit(1))
    ref = t.trajectory(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        traj = t.trajectory(images)
        logits = t.finish(traj[:, 1], 1)["logits"]
    assert traj.dtype == logits.dtype == torch.float32
    torch.testing.assert_close(traj, ref)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_precision_from_config_selects_the_compute_dtype(precision, images):
    """teacher.precision reaches the forward's autocast choice: bf16 only on CUDA and only
    when asked; CPU stays float32 (also inside an outer bf16 autocast)."""
    t = Teacher.from_config(teacher_cfg(name="vit_tiny_patch16_224", init="random", **TINY))
    assert t.precision == "bf16"  # the default
    t = Teacher.from_config(
        teacher_cfg(name="vit_tiny_patch16_224", init="random", precision=precision, **TINY)
    )
    assert t.precision == precision
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    assert t.compute_dtype("cuda") == t.compute_dtype(torch.device("cuda", 0)) == want
    assert t.compute_dtype("cpu") == torch.float32
    ref = Teacher(t.vit).trajectory(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(t.trajectory(images), ref, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="teacher.precision='fp16'"):
        Teacher(t.vit, precision="fp16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_precision_on_cuda(precision, images):
    """bf16: close to the float32 CPU forward, not identical; fp32: float32 products even
    inside the student's outer bf16 autocast (what bf16-mixed training wraps it in)."""
    t = Teacher(make_vit(2), precision=precision)
    ref = t.trajectory(images)
    t.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        traj = t.trajectory(images.cuda()).cpu()
    assert traj.dtype == torch.float32
    err = float((traj - ref).norm() / ref.norm())
    if precision == "bf16":
        assert 1e-4 < err < 5e-2  # bf16 matmuls: close to float32, not identical
    else:
        assert err < 1e-5


# ------------------------------------------------------------------------ loading


def assert_same_outputs(a: Teacher, b: Teacher, images, atol=0.0):
    tol = dict(rtol=0, atol=atol)
    torch.testing.assert_close(a.trajectory(images), b.trajectory(images), **tol)
    la, lb = a.finish(a.embed(images), 0)["logits"], b.finish(b.embed(images), 0)["logits"]
    if la is not None or lb is not None:
        torch.testing.assert_close(la, lb, **tol)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_state_dict_reloads(tmp_path, images, suffix):
    vit = make_vit(2)
    path = tmp_path / f"vit{suffix}"
    if suffix == ".pth":
        torch.save(vit.state_dict(), path)
    else:
        save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    cfg = teacher_cfg(
        name="vit_tiny_patch16_224", weights=str(path), reg_tokens=2, num_classes=5, **TINY
    )
    assert_same_outputs(Teacher(vit), Teacher.from_config(cfg), images)


def dinov2_hub_state(vit) -> dict:
    """The official DINOv2 torch.hub layout of a timm DINOv2 model, written by hand:
    a `mask_token`; with registers, `register_tokens`, a position embedding that
    covers the class token (which timm folds into `cls_token`)."""
    sd = {k: v.clone() for k, v in vit.state_dict().items()}
    dim = sd["cls_token"].shape[-1]
    sd["mask_token"] = torch.zeros(1, dim)
    if vit.num_reg_tokens:
        pos_cls = torch.randn(1, 1, dim)
        sd["register_tokens"] = sd.pop("reg_token")
        sd["cls_token"] = sd["cls_token"] - pos_cls
        sd["pos_embed"] = torch.cat([pos_cls, sd["pos_embed"]], dim=1)
    return sd


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_dinov2_hub_checkpoint_reloads(tmp_path, name):
    arch = dict(img_size=28, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    vit = make_vit(
        name=name,
        **{**arch, "patch_size": 14, "init_values": 0.1, "reg_tokens": 4 if "reg" in name else 0},
    )
    sd = dinov2_hub_state(vit)
    assert "blocks.0.ls1.gamma" in sd and "mask_token" in sd
    path = tmp_path / "dinov2_hub.pth"
    torch.save(sd, path)
    loaded = Teacher.from_config(teacher_cfg(name=name, weights=str(path), **arch))
    torch.manual_seed(2)
    # exact up to the rounding of (cls - pos_cls) + pos_cls
    assert_same_outputs(Teacher(vit), loaded, torch.randn(2, 3, 28, 28), atol=1e-5)
    assert loaded.num_reg_tokens == (4 if "reg" in name else 0)


def test_raptor_teacher_file_rebuilds_from_the_file_alone(tmp_path, images):
    dc = {
        "input_size": (3, 16, 16),
        "mean": (0.1, 0.1, 0.1),
        "std": (0.2, 0.2, 0.2),
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    t = Teacher(make_vit(2), data_config=dc)
    path = t.save(tmp_path / "teacher.safetensors")
    loaded = Teacher.from_config(teacher_cfg(weights=str(path)))  # default name: ignored
    assert_same_outputs(t, loaded, images)
    assert loaded.arch == t.arch and loaded.data_config == dc
    # arch keys that agree are fine, disagreeing ones fail naming the key
    Teacher.from_config(teacher_cfg(weights=str(path), depth=3, embed_dim=32))
    with pytest.raises(TeacherLoadError, match=r"teacher\.depth=4 but the file has 3"):
        Teacher.from_config(teacher_cfg(weights=str(path), depth=4))


def test_directly_built_vit_saves_and_rebuilds(tmp_path, images):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(4)
    vit = VisionTransformer(num_classes=5, reg_tokens=2, **TINY).eval()
    t = Teacher(vit)
    loaded = Teacher.from_config(teacher_cfg(weights=str(t.save(tmp_path / "t.safetensors"))))
    assert_same_outputs(t, loaded, images)


def test_separate_linear_head(tmp_path, images):
    t = Teacher(make_vit(2, num_classes=0))
    torch.manual_seed(3)
    w, b = torch.randn(7, 64), torch.randn(7)
    save_file({"weight": w, "bias": b}, str(tmp_path / "head.safetensors"))
    torch.save({"weight": w, "bias": b}, tmp_path / "head.pth")
    t.save(tmp_path / "teacher.safetensors")
    for head in ("head.safetensors", "head.pth"):
        loaded = Teacher.from_config(
            teacher_cfg(weights=str(tmp_path / "teacher.safetensors"), head=str(tmp_path / head))
        )
        assert loaded.num_classes == 7
        out = loaded.finish(loaded.embed(images), 0)
        torch.testing.assert_close(out["logits"], out["pooled"] @ w.T + b)
    save_file({"weight": torch.randn(7, 32)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(TeacherLoadError, match=r"expected weight \(num_classes, 64\)"):
        Teacher.from_config(
            teacher_cfg(
                weights=str(tmp_path / "teacher.safetensors"),
                head=str(tmp_path / "bad.safetensors"),
            )
        )


def test_clear_errors(tmp_path):
    with pytest.raises(TeacherLoadError, match="file not found"):
        Teacher.from_config(teacher_cfg(weights=str(tmp_path / "nope.pth")))
    path = tmp_path / "vit.pth"
    torch.save(make_vit(2).state_dict(), path)
    base = dict(name="vit_tiny_patch16_224", weights=str(path), reg_tokens=2, num_classes=5)
    with pytest.raises(
        TeacherLoadError, match=r"wrong shapes \[.*blocks\.0\.attn\.qkv\.weight: file \(96, 32\)"
    ):
        Teacher.from_config(teacher_cfg(**{**base, **TINY, "embed_dim": 64}))
    with pytest.raises(TeacherLoadError, match=r"unexpected keys \[blocks\.2\."):
        Teacher.from_config(teacher_cfg(**{**base, **TINY, "depth": 2}))
    with pytest.raises(TeacherLoadError, match=r"unexpected keys \[head\.bias, head\.weight\]"):
        Teacher.from_config(teacher_cfg(**{**base, **TINY, "num_classes": 0}))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(TeacherLoadError, match="weights_only=True"):
        Teacher.from_config(teacher_cfg(**{**base, **TINY, "weights": str(tmp_path / "junk.pth")}))
    with pytest.raises(TeacherLoadError, match="not a timm model name"):
        Teacher.from_config(teacher_cfg(name="no_such_vit", init="random"))


def test_no_random_teacher_unless_asked_by_name(tmp_path):
    """Nothing to load (no weights file, not pretrained) is an error naming the command that
    writes the file and the keys; random weights only with teacher.init=random."""
    tiny = dict(name="vit_tiny_patch16_224", **TINY)
    with pytest.raises(TeacherLoadError) as err:
        Teacher.from_config(teacher_cfg(**tiny))
    for name in (
        "`raptor teacher CONFIG`",
        "teacher.weights=",
        "teacher.pretrained",
        "init=random",
    ):
        assert name in str(err.value)
    first = Teacher.from_config(teacher_cfg(**tiny, init="random"))
    assert first.num_layers == TINY["depth"]
    path = tmp_path / "t.safetensors"
    first.save(path)
    loaded = Teacher.from_config(teacher_cfg(name=tiny["name"], weights=str(path)))
    assert_same_outputs(first, loaded, torch.randn(2, 3, 16, 16))
    with pytest.raises(TeacherLoadError, match="choose random weights or the ones to load"):
        Teacher.from_config(teacher_cfg(**tiny, init="random", weights=str(path)))
