"""The frozen teacher: a timm VisionTransformer read as a trajectory along depth.

Conventions (DESIGN.md): `a_0 = embed(images)` is the token sequence entering
block 1 (patch embedding, position embedding, prefix tokens, `norm_pre`);
`a_l = step(a_{l-1}, l)` is block l's output, l = 1..L (1-based). Tokens are
`[cls, reg_1..reg_R, patch_1..patch_P]`, T = 1 + R + P, every tensor (B, T, D).
`finish` applies the remaining blocks and the final norm; the pooled feature is
`[cls ; mean(patch)]` of the normed tokens (registers excluded), shape (B, 2D),
the input DINOv2's published linear heads take.

Weights (`Teacher.from_config(cfg.teacher)`):
- `weights=PATH`, a file written by `raptor teacher` (`teacher.safetensors`
  whose metadata carries the architecture), rebuilt from the file alone;
- `weights=PATH`, a timm state dict (.pth/.bin/.safetensors) or the official
  DINOv2 torch.hub `.pth` (converted by timm's own `checkpoint_filter_fn`),
  loaded into `timm.create_model(name, **architecture keys)`;
- `pretrained=True`: timm's hub weights for `name`;
- `init=random`: random weights, only when asked for by name (benchmarks, tests).
With none of these there is nothing to load: a TeacherLoadError names `raptor teacher`.
Files are read with `torch.load(weights_only=True)` or safetensors, never unpickled.

Image size: the teacher (and so a Raptor, which embeds with it) takes images of any size
divisible by the patch size: timm's `dynamic_img_size`, the position embedding resampled
(bicubic) to the image's patch grid; at the training size it is used as stored, so the
numbers there are those of the plain model. `num_tokens` is the count at the training size.

Numerics: on CUDA the forward runs under bf16 autocast (`precision="bf16"`, the default)
or in float32 with any outer autocast switched off (`precision="fp32"`, config key
`teacher.precision`); float32 on CPU either way; every output is float32.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

from raptor.config import TEACHER_PRECISIONS as PRECISIONS
from raptor.config import ConfigError
from raptor.model.tokens import token_groups

# cfg.teacher keys passed to timm.create_model when set (override the defaults of `name`)
ARCH_KEYS = (
    "img_size",
    "patch_size",
    "in_chans",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "reg_tokens",
    "num_classes",
    "drop_path_rate",
    "init_values",
)
# keys that change the computation of a built model (and so must match a stored file);
# stochastic depth is off in a frozen teacher and LayerScale values live in the weights
_SHAPE_KEYS = tuple(k for k in ARCH_KEYS if k not in ("drop_path_rate", "init_values"))
FILE_FORMAT = "raptor-teacher"


class TeacherLoadError(ConfigError):
    """A teacher weights/head file is missing, unreadable or does not fit the model."""


def _few(items, n: int = 5) -> str:
    items = sorted(items)
    more = f", ... ({len(items)} in all)" if len(items) > n else ""
    return "[" + ", ".join(items[:n]) + more + "]"


def _jsonable(value: Any) -> Any:
    """Tuples -> lists, a square (s, s) size -> s, so an arch dict round-trips through JSON."""
    if isinstance(value, (tuple, list)):
        value = [_jsonable(v) for v in value]
        return value[0] if len(value) == 2 and value[0] == value[1] else value
    return value


class Teacher(nn.Module):
    """A frozen timm VisionTransformer exposing its depth trajectory.

    `Teacher(vit, arch=None, head=None, data_config=None, precision="bf16")`: `arch` is
    the plain dict `{"name": timm name, "kwargs": create_model kwargs}` that rebuilds `vit`
    (default: read from the timm model); `head` an optional linear classifier on
    the pooled (B, 2D) features that replaces the model's own head; `data_config`
    timm's preprocessing dict (default: resolved from the model, at its image size);
    `precision` the compute precision on CUDA ("bf16" or "fp32", see `compute_dtype`).
    The module stays in eval mode and holds no trainable parameter.
    """

    def __init__(
        self,
        vit: nn.Module,
        arch: Optional[Dict[str, Any]] = None,
        head: Optional[nn.Linear] = None,
        data_config: Optional[Dict[str, Any]] = None,
        precision: str = "bf16",
    ):
        super().__init__()
        if precision not in PRECISIONS:
            raise ConfigError(
                f"teacher.precision={precision!r} is not a valid choice: expected one of "
                f"{', '.join(PRECISIONS)}"
            )
        self.precision = precision
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(vit, VisionTransformer):
            raise TeacherLoadError(
                f"Teacher expects a timm VisionTransformer, got {type(vit).__name__}; "
                "set teacher.name to a timm ViT (vit_*)"
            )
        if not vit.has_class_token:
            raise TeacherLoadError(
                "Teacher needs a ViT with a class token (class_token=True); "
                "set teacher.name to a ViT with one"
            )
        self.vit = vit
        self.head = head
        self.num_layers = len(vit.blocks)
        self.embed_dim = int(vit.embed_dim)
        self.num_heads = int(vit.blocks[0].attn.num_heads)
        self.num_reg_tokens = int(vit.num_reg_tokens)
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        self.num_tokens = int(vit.patch_embed.num_patches) + self.num_prefix_tokens
        self.num_classes = int(head.out_features) if head is not None else int(vit.num_classes)
        self.arch = arch if arch is not None else arch_of(vit)
        self.data_config = dict(data_config) if data_config else default_data_config(vit)
        self.requires_grad_(False)
        self.eval()

    # ------------------------------------------------------------------ structure

    @property
    def groups(self) -> Dict[str, slice]:
        """Token-group slices along T: cls, reg (only when R > 0), patch."""
        return token_groups(self.num_reg_tokens)

    def train(self, mode: bool = True) -> Teacher:
        """The teacher is frozen: always eval (no dropout, no stochastic depth)."""
        return super().train(False)

    def compute_dtype(self, device: torch.device | str) -> torch.dtype:
        """The dtype of the forward's products on `device`: bfloat16 on CUDA with
        precision "bf16", float32 otherwise."""
        bf16 = torch.device(device).type == "cuda" and self.precision == "bf16"
        return torch.bfloat16 if bf16 else torch.float32

    def autocast(self, device: torch.device | str):
        """The forward's autocast context on `device`: bf16 autocast where `compute_dtype`
        is bfloat16; on CUDA and CPU otherwise autocast off (float32 also inside an outer
        autocast, e.g. the student's bf16-mixed training)."""
        device = torch.device(device)
        if self.compute_dtype(device) == torch.bfloat16:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        if device.type in ("cuda", "cpu"):
            return torch.autocast(device.type, enabled=False)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ forward

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalized images -> a_0 (B, T, D); H, W multiples of the patch."""
        v = self.vit
        (h, w), (ph, pw) = images.shape[-2:], v.patch_embed.patch_size
        if h % ph or w % pw:
            raise ConfigError(
                f"images of {h}x{w} px do not split into the teacher's {ph}x{pw} patches: set "
                f"data.transform.input_size to a multiple of {ph}"
            )
        native = (h, w) == tuple(v.patch_embed.img_size)
        with self.autocast(images.device), contextlib.nullcontext() if native else _dynamic_size(v):
            x = v.patch_embed(images)
            x = v._pos_embed(x)
            x = v.patch_drop(x)
            x = v.norm_pre(x)
        return x.float()

    def step(self, a: torch.Tensor, layer: int) -> torch.Tensor:
        """a_{l-1} (B, T, D) -> a_l = block l (1-based) applied to it."""
        if not 1 <= layer <= self.num_layers:
            raise IndexError(f"layer must be in 1..{self.num_layers}, got {layer}")
        with self.autocast(a.device):
            out = self.vit.blocks[layer - 1](a)
        return out.float()

    def step_mlp(self, a: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """a_{l-1} -> (a_l, m_l): block l's output and its MLP output m_l, the branch it
        adds to the residual stream after attention (timm's pre-norm `Block`:
        a_l = y_l + m_l, y_l = a_{l-1} + attention branch, m_l = ls2(mlp(norm2(y_l))))."""
        if not 1 <= layer <= self.num_layers:
            raise IndexError(f"layer must be in 1..{self.num_layers}, got {layer}")
        from timm.models.vision_transformer import Block

        blk = self.vit.blocks[layer - 1]
        if type(blk) is not Block:
            raise ConfigError(
                f"the teacher's blocks are {type(blk).__name__}, not timm's pre-norm Block: "
                "their MLP output (for the replaceme DMD selection) is not defined here"
            )
        with self.autocast(a.device):
            y = a + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(a))))
            m = blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(y))))
            out = y + m
        return out.float(), m.float()

    @torch.no_grad()
    def trajectory(
        self, images: torch.Tensor, upto: Optional[int] = None, mlp_out: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> (B, upto+1, T, D): a_0 .. a_upto (default upto = L), no grad.

        With `mlp_out`, (trajectory, mlp): mlp (B, upto, T, D) holds every block's MLP
        output (block l at index l - 1, `step_mlp`)."""
        upto = self.num_layers if upto is None else int(upto)
        if not 0 <= upto <= self.num_layers:
            raise IndexError(f"upto must be in 0..{self.num_layers}, got {upto}")
        a = self.embed(images)
        out = a.new_empty((a.shape[0], upto + 1) + tuple(a.shape[1:]))
        out[:, 0] = a
        mlp = a.new_empty((a.shape[0], upto) + tuple(a.shape[1:])) if mlp_out else None
        for layer in range(1, upto + 1):
            if mlp_out:
                a, mlp[:, layer - 1] = self.step_mlp(a, layer)
            else:
                a = self.step(a, layer)
            out[:, layer] = a
        return (out, mlp) if mlp_out else out

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The ViT's final norm on a_L (B, T, D) (identity for fc_norm models)."""
        with self.autocast(x.device):
            out = self.vit.norm(x)
        return out.float()

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, D) normed tokens -> [cls ; mean(patch)] (B, 2D), registers excluded."""
        patch = tokens[:, self.num_prefix_tokens :]
        return torch.cat([tokens[:, 0], patch.mean(dim=1)], dim=-1)

    def logits_from_tokens(self, tokens: torch.Tensor) -> Optional[torch.Tensor]:
        """Class logits (B, C) from final-normed tokens, or None without a head.

        The separate linear head (if any) reads the pooled features; otherwise the
        ViT's own head (timm `forward_head`: its global_pool and fc_norm)."""
        if self.head is None and self.vit.num_classes == 0:
            return None
        with self.autocast(tokens.device):
            if self.head is not None:
                out = self.head(self.pooled(tokens))
            else:
                out = self.vit.forward_head(tokens)
        return out.float()

    def finish(self, a: torch.Tensor, from_layer: int) -> Dict[str, Optional[torch.Tensor]]:
        """Blocks from_layer+1..L on a = a_{from_layer}, then the final norm.

        Returns {"tokens": (B, T, D) normed, "pooled": (B, 2D), "logits": (B, C) or None}."""
        if not 0 <= from_layer <= self.num_layers:
            raise IndexError(f"from_layer must be in 0..{self.num_layers}, got {from_layer}")
        for layer in range(from_layer + 1, self.num_layers + 1):
            a = self.step(a, layer)
        tokens = self.final_norm(a)
        return {
            "tokens": tokens,
            "pooled": self.pooled(tokens),
            "logits": self.logits_from_tokens(tokens),
        }

    # ------------------------------------------------------------------ files

    def save(self, path: str | Path) -> Path:
        """Write the ViT as a `raptor teacher` safetensors file (arch + data config in
        its metadata). A separate `head` is not included (it has its own file)."""
        return save_teacher_file(path, self.vit, self.arch, self.data_config)

    @classmethod
    def from_config(cls, cfg: Any) -> Teacher:
        """Build from a `teacher` config section (see the module docstring)."""
        overrides = arch_overrides(cfg)
        data_config = None
        if cfg.get("init") == "random" and (cfg.weights or cfg.pretrained):
            raise TeacherLoadError(
                "teacher.init=random with teacher.weights or teacher.pretrained set: "
                "choose random weights or the ones to load"
            )
        if cfg.weights:
            path = Path(str(cfg.weights)).expanduser()
            if not path.is_file():
                raise TeacherLoadError(f"teacher.weights: file not found: {path}")
            stored = read_teacher_file(path)
            if stored is not None:
                arch, state, data_config = stored
                vit = _create(arch["name"], arch["kwargs"])
                _check_arch(vit, overrides, path)
                _load_checked(vit, state, path, arch["name"], arch["kwargs"])
            else:
                vit, arch = create_vit(cfg)
                state = _convert(read_state_dict(path), vit, path)
                _load_checked(vit, state, path, arch["name"], overrides)
        elif cfg.pretrained or cfg.get("init") == "random":
            vit, arch = create_vit(cfg, pretrained=bool(cfg.pretrained))
        else:
            raise TeacherLoadError(
                f"teacher '{cfg.name}' has no weights to load: train them with "
                "`raptor teacher CONFIG` (then teacher.weights=PATH to its teacher.safetensors), "
                "or set teacher.pretrained=true for the hub's, or teacher.init=random to use "
                "random weights on purpose"
            )
        head = load_linear_head(cfg.head, 2 * int(vit.embed_dim)) if cfg.get("head") else None
        precision = str(cfg.get("precision") or "bf16")
        return cls(vit, arch=arch, head=head, data_config=data_config, precision=precision)


# ---------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _dynamic_size(vit: nn.Module):
    """Within: the ViT in timm's `dynamic_img_size` mode (what the constructor argument
    sets: patches kept as a (B, h, w, D) grid until the position embedding, resampled to
    (h, w), is added); the model's own settings restored after."""
    from timm.layers import Format

    pe = vit.patch_embed
    saved = vit.dynamic_img_size, pe.strict_img_size, pe.flatten, pe.output_fmt
    vit.dynamic_img_size = True
    pe.strict_img_size, pe.flatten, pe.output_fmt = False, False, Format.NHWC
    try:
        yield
    finally:
        vit.dynamic_img_size, pe.strict_img_size, pe.flatten, pe.output_fmt = saved


def _plain(value: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def arch_overrides(cfg: Any) -> Dict[str, Any]:
    """The architecture keys set in a `teacher` config section (timm create_model kwargs)."""
    return {k: _plain(cfg[k]) for k in ARCH_KEYS if cfg.get(k) is not None}


def create_vit(cfg: Any, pretrained: bool = False):
    """(vit, arch): `timm.create_model(cfg.name, **architecture keys)` and the plain
    `{"name", "kwargs"}` dict that rebuilds it."""
    arch = {"name": str(cfg.name), "kwargs": arch_overrides(cfg)}
    return _create(arch["name"], arch["kwargs"], pretrained=pretrained), arch


def arch_of(vit: nn.Module) -> Dict[str, Any]:
    """`{"name", "kwargs"}` that rebuilds a timm ViT: the name and kwargs timm recorded
    in `timm.create_model`; for a ViT constructed directly, timm's generic ViT entry
    point with the shapes read from its modules (pass `arch` for anything more exotic)."""
    name = (getattr(vit, "pretrained_cfg", None) or {}).get("architecture")
    recorded = getattr(vit, "_model_args", None)
    if name and recorded is not None:
        return {"name": name, "kwargs": {k: _jsonable(v) for k, v in recorded.items()}}
    kwargs = arch_values(vit)
    if not isinstance(vit.blocks[0].ls1, nn.Identity):
        kwargs["init_values"] = float(vit.blocks[0].ls1.gamma.detach().abs().mean())
    return {"name": "vit_base_patch16_224", "kwargs": kwargs}


def arch_values(vit: nn.Module) -> Dict[str, Any]:
    """The computation-relevant architecture of a built ViT, read from its modules."""
    blk = vit.blocks[0]
    return {
        "img_size": _jsonable(tuple(vit.patch_embed.img_size)),
        "patch_size": _jsonable(tuple(vit.patch_embed.patch_size)),
        "in_chans": int(vit.patch_embed.proj.in_channels),
        "embed_dim": int(vit.embed_dim),
        "depth": len(vit.blocks),
        "num_heads": int(blk.attn.num_heads),
        "mlp_ratio": blk.mlp.fc1.out_features / vit.embed_dim,
        "reg_tokens": int(vit.num_reg_tokens),
        "num_classes": int(vit.num_classes),
    }


def default_data_config(vit: nn.Module) -> Dict[str, Any]:
    """timm's data config for the model, with input_size set to the model's image size."""
    from timm.data import resolve_model_data_config

    dc = dict(resolve_model_data_config(vit))
    dc["input_size"] = (int(vit.patch_embed.proj.in_channels),) + tuple(vit.patch_embed.img_size)
    return dc


def _create(name: str, kwargs: Mapping[str, Any], pretrained: bool = False) -> nn.Module:
    import timm
    from timm.models.vision_transformer import VisionTransformer

    try:
        vit = timm.create_model(name, pretrained=pretrained, **dict(kwargs))
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise TeacherLoadError(f"teacher.name: '{name}' is not a timm model name") from None
        raise
    except Exception as exc:
        if pretrained:
            raise TeacherLoadError(
                f"teacher: could not get the pretrained weights of '{name}' from the hub "
                f"({type(exc).__name__}: {exc}); set teacher.weights=PATH to a local file"
            ) from None
        raise
    if not isinstance(vit, VisionTransformer):
        raise TeacherLoadError(
            f"teacher.name: '{name}' builds a {type(vit).__name__}, expected a timm VisionTransformer"
        )
    return vit


def read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """A tensor dict from a .safetensors file or a torch file (weights_only=True)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TeacherLoadError(
            f"{path}: cannot read it as a state dict of tensors (safetensors, or a torch file "
            f"loadable with weights_only=True): {type(exc).__name__}: {str(exc).splitlines()[0]}"
        ) from None
    if not isinstance(state, Mapping):
        raise TeacherLoadError(
            f"{path}: expected a dict of tensors, found a {type(state).__name__}"
        )
    return dict(state)


def _convert(state: Dict[str, Any], vit: nn.Module, path: Path) -> Dict[str, Any]:
    """timm's own checkpoint conversion (DINOv2 hub keys, pos-embed resampling, ...)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    try:
        return checkpoint_filter_fn(state, vit)
    except Exception as exc:
        raise TeacherLoadError(
            f"{path}: timm could not convert this checkpoint for the model "
            f"({type(exc).__name__}: {exc}); check the teacher's architecture keys"
        ) from None


def _load_checked(
    vit: nn.Module, state: Mapping[str, Any], path: Path, name: str, kwargs: Mapping
) -> None:
    """load_state_dict with missing, unexpected and wrongly-shaped keys in one message."""
    own = vit.state_dict()
    missing = set(own) - set(state)
    unexpected = set(state) - set(own)
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        if shapes:
            parts.append(
                f"wrong shapes [{'; '.join(shapes[:5])}{' ...' if len(shapes) > 5 else ''}]"
            )
        raise TeacherLoadError(
            f"teacher.weights {path} does not fit timm model '{name}' with {dict(kwargs)}: "
            + "; ".join(parts)
            + ". Set the teacher's architecture keys (teacher.embed_dim, depth, num_heads, "
            "patch_size, img_size, reg_tokens, num_classes, ...) to those of the checkpoint."
        )
    vit.load_state_dict(state, strict=True)


def _check_arch(vit: nn.Module, overrides: Mapping[str, Any], path: Path) -> None:
    """Architecture keys set in the config must agree with a stored teacher file."""
    actual = arch_values(vit)
    bad = [
        f"teacher.{k}={overrides[k]} but the file has {actual[k]}"
        for k in _SHAPE_KEYS
        if k in overrides
        and _jsonable(overrides[k]) != actual[k]
        and not (k == "mlp_ratio" and abs(float(overrides[k]) - actual[k]) < 1e-6)
    ]
    if bad:
        raise TeacherLoadError(
            f"teacher.weights {path}: the config disagrees with the architecture stored in the file: "
            + "; ".join(bad)
            + ". Remove these keys or make them match."
        )


# ---------------------------------------------------------------------- teacher files


def save_teacher_file(
    path: str | Path, vit: nn.Module, arch: Mapping[str, Any], data_config: Optional[Mapping] = None
) -> Path:
    """`teacher.safetensors`: the ViT's state dict, with `arch` (and the data config) as
    JSON in the safetensors metadata, so the file alone rebuilds the model."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in vit.state_dict().items()}
    meta = {
        "format": FILE_FORMAT,
        "arch": json.dumps({"name": arch["name"], "kwargs": _jsonable_kwargs(arch)}),
    }
    if data_config:
        meta["data_config"] = json.dumps(dict(data_config))
    save_file(state, str(path), metadata=meta)
    return path


def _jsonable_kwargs(arch: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: _jsonable(v) for k, v in dict(arch.get("kwargs", {})).items()}


def read_teacher_file(path: Path):
    """(arch, state dict, data_config) of a file written by `save_teacher_file`, or None
    when `path` is not such a file (any other safetensors or torch file)."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != FILE_FORMAT or "arch" not in meta:
                return None
            state = {k: fh.get_tensor(k) for k in fh.keys()}
        arch = json.loads(meta["arch"])
        data_config = json.loads(meta["data_config"]) if "data_config" in meta else None
    except Exception as exc:
        raise TeacherLoadError(
            f"{path}: unreadable teacher file: {type(exc).__name__}: {exc}"
        ) from None
    if data_config:
        data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()}
    return arch, state, data_config


def load_linear_head(path: str | Path, in_features: int) -> nn.Linear:
    """A linear classifier on [cls ; mean(patch)] from a safetensors or torch file
    holding one weight (C, in_features) and optionally one bias (C,) (e.g. DINOv2's
    published `*_linear_head.pth`)."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise TeacherLoadError(f"teacher.head: file not found: {path}")
    state = read_state_dict(path)
    weights = [k for k, v in state.items() if torch.is_tensor(v) and v.ndim == 2]
    biases = [k for k, v in state.items() if torch.is_tensor(v) and v.ndim == 1]
    if len(weights) != 1 or len(biases) > 1:
        raise TeacherLoadError(
            f"teacher.head {path}: expected one 2-D weight and at most one 1-D bias, found "
            f"{ {k: tuple(v.shape) for k, v in state.items() if torch.is_tensor(v)} }"
        )
    w = state[weights[0]]
    b = state[biases[0]] if biases else None
    if w.shape[1] != in_features or (b is not None and b.shape[0] != w.shape[0]):
        raise TeacherLoadError(
            f"teacher.head {path}: weight {tuple(w.shape)}"
            + (f", bias {tuple(b.shape)}" if b is not None else "")
            + f"; expected weight (num_classes, {in_features}) reading [cls ; mean(patch)] "
            f"(2 x embed_dim) and bias (num_classes,)"
        )
    head = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        head.weight.copy_(w)
        if b is not None:
            head.bias.copy_(b)
    return head
