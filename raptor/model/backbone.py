"""An exported Raptor as a standalone image backbone (`raptor export` writes it).

A backbone folder holds `config.json` and `model.safetensors`: the teacher's stem
(patch embedding, position embedding, class and register tokens, optional
pre-norm), the k recurrent blocks over their phase partition, and the teacher's
final norm. `RaptorBackbone.from_pretrained(DIR)` rebuilds it with torch,
safetensors and `raptor.model.raptor` only (no timm, Lightning, W&B or OmegaConf),
and never unpickles anything.

Shapes: images (B, C, H, W), normalized with `config["preprocessing"]` and of the
fixed size `config["stem"]["img_size"]`; tokens (B, T, D) laid out
[cls, reg_1..reg_R, patch_1..patch_P] (patches row-major over the grid);
trajectory (B, L+1, T, D) holding a_0..a_L (a_0 enters block 1).

    model = RaptorBackbone.from_pretrained("exports/dinov2_vitb14_reg_k3")
    tokens = model.forward_features(images)   # (B, T, D), final-normed
    pooled = model(images)                    # (B, 2D) = [cls ; mean(patch)]
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from raptor.errors import UserError
from raptor.model.raptor import Raptor
from raptor.model.tokens import token_groups

FORMAT = "raptor-backbone"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ONNX_NAME = "model.onnx"


class BackboneFormatError(UserError):
    """A backbone folder is missing a file, or a file is corrupted or inconsistent."""


# ---------------------------------------------------------------------- config helpers


def _need(section: Dict[str, Any], key: str, where: str) -> Any:
    if not isinstance(section, dict) or key not in section:
        raise BackboneFormatError(f"{where}: missing key '{key}'")
    return section[key]


def _pair(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


def make_norm(spec: Optional[Dict[str, Any]], dim: int, where: str) -> nn.Module:
    """A norm from its config: None or {"type": "identity"} -> Identity;
    {"type": "layernorm", "eps", "affine", "bias"} -> LayerNorm(dim)."""
    if spec is None or spec.get("type") == "identity":
        return nn.Identity()
    if spec.get("type") != "layernorm":
        raise BackboneFormatError(
            f"{where}: norm type {spec.get('type')!r} unknown; expected 'layernorm' or 'identity'"
        )
    return nn.LayerNorm(
        dim,
        eps=float(_need(spec, "eps", where)),
        elementwise_affine=bool(spec.get("affine", True)),
        bias=bool(spec.get("bias", True)),
    )


# ---------------------------------------------------------------------- modules


class PatchStem(nn.Module):
    """The teacher's embedding at a fixed image size: images (B, C, H, W) -> a_0 (B, T, D).

    Conv patch embedding (kernel = stride = patch size) -> flatten row-major ->
    (patch norm) -> position embedding and prefix tokens -> pre-norm. With
    `no_embed_class` the position embedding covers the P patch tokens only and
    is added before the class/register tokens are prepended; otherwise it covers
    all T tokens [cls, reg, patches] and is added after (timm's two layouts).
    """

    def __init__(self, stem: Dict[str, Any]):
        super().__init__()
        where = f"{CONFIG_NAME} stem"
        dim = int(_need(stem, "embed_dim", where))
        self.img_size = _pair(_need(stem, "img_size", where))
        self.patch_size = _pair(_need(stem, "patch_size", where))
        self.in_chans = int(_need(stem, "in_chans", where))
        if any(s % p for s, p in zip(self.img_size, self.patch_size)):
            raise BackboneFormatError(
                f"{where}: img_size {self.img_size} is not a multiple of patch_size {self.patch_size}"
            )
        self.grid = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_reg_tokens = int(_need(stem, "reg_tokens", where))
        self.no_embed_class = bool(_need(stem, "no_embed_class", where))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(
            self.in_chans,
            dim,
            kernel_size=self.patch_size,
            stride=self.patch_size,
            bias=bool(_need(stem, "patch_bias", where)),
        )
        self.patch_embed.norm = make_norm(stem.get("patch_norm"), dim, where + ".patch_norm")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.reg_token = (
            nn.Parameter(torch.zeros(1, self.num_reg_tokens, dim)) if self.num_reg_tokens else None
        )
        if _need(stem, "pos_embed", where) == "learned":
            n = self.num_patches + (0 if self.no_embed_class else 1 + self.num_reg_tokens)
            self.pos_embed = nn.Parameter(torch.zeros(1, n, dim))
        elif stem["pos_embed"] == "none":
            self.pos_embed = None
        else:
            raise BackboneFormatError(
                f"{where}: pos_embed {stem['pos_embed']!r} unknown; expected 'learned' or 'none'"
            )
        self.norm_pre = make_norm(stem.get("norm_pre"), dim, where + ".norm_pre")

    @property
    def num_tokens(self) -> int:
        return 1 + self.num_reg_tokens + self.num_patches

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or tuple(images.shape[1:]) != (self.in_chans, *self.img_size):
            raise ValueError(
                f"images: expected shape (B, {self.in_chans}, {self.img_size[0]}, {self.img_size[1]}) "
                f"(the exported resolution), got {tuple(images.shape)}"
            )
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)  # (B, P, D)
        x = self.patch_embed.norm(x)
        b = x.shape[0]
        prefix = [self.cls_token.expand(b, -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(b, -1, -1))
        if self.pos_embed is not None and self.no_embed_class:
            x = x + self.pos_embed
        x = torch.cat(prefix + [x], dim=1)
        if self.pos_embed is not None and not self.no_embed_class:
            x = x + self.pos_embed
        return self.norm_pre(x)


class RaptorBackbone(nn.Module):
    """Teacher stem -> Raptor (k recurrent blocks over L layers) -> teacher final norm.

    Build with `from_pretrained(DIR)` (or `RaptorBackbone(config)` for fresh weights).
    forward_features(images) (B, C, H, W) -> final-normed tokens (B, T, D);
    forward(images) -> pooled [cls ; mean(patch)] (B, 2D), registers excluded;
    trajectory(images) -> a_0..a_L (B, L+1, T, D) before the final norm.
    """

    def __init__(self, config: Dict[str, Any]):
        super().__init__()
        check_config(config)
        self.config = config
        self.stem = PatchStem(config["stem"])
        try:
            self.raptor = Raptor.from_arch(config["architecture"])
        except (TypeError, ValueError) as exc:
            raise BackboneFormatError(f"{CONFIG_NAME} architecture: {exc}") from None
        dim = int(config["stem"]["embed_dim"])
        if self.raptor.dim != dim:
            raise BackboneFormatError(
                f"{CONFIG_NAME}: architecture.dim={self.raptor.dim} but stem.embed_dim={dim}"
            )
        self.norm = make_norm(config["final_norm"], dim, f"{CONFIG_NAME} final_norm")
        self.num_prefix_tokens = 1 + self.stem.num_reg_tokens
        tokens = config["tokens"]
        expected = {"cls": 1, "reg": self.stem.num_reg_tokens, "patch": self.stem.num_patches}
        if {k: tokens.get(k) for k in expected} != expected:
            raise BackboneFormatError(
                f"{CONFIG_NAME} tokens: {tokens} does not match the stem, which makes {expected}"
            )

    @property
    def num_layers(self) -> int:
        return self.raptor.num_layers

    @property
    def embed_dim(self) -> int:
        return self.raptor.dim

    @property
    def groups(self) -> Dict[str, slice]:
        """Token-group slices along T: cls, reg (only with registers), patch."""
        return token_groups(self.stem.num_reg_tokens)

    def embed(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> a_0 (B, T, D)."""
        return self.stem(images)

    def trajectory(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> a_0..a_L (B, L+1, T, D), before the final norm."""
        a0 = self.embed(images)
        return torch.cat([a0[:, None], self.raptor(a0)], dim=1)

    def forward_features(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> final-normed tokens of layer L (B, T, D)."""
        a = self.embed(images)
        for layer in range(1, self.num_layers + 1):
            a = self.raptor.step(a, layer)
        return self.norm(a)

    def pool(self, tokens: Tensor) -> Tensor:
        """(B, T, D) -> [cls ; mean(patch)] (B, 2D)."""
        return torch.cat([tokens[:, 0], tokens[:, self.num_prefix_tokens :].mean(dim=1)], dim=-1)

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> pooled features [cls ; mean(patch)] (B, 2D)."""
        return self.pool(self.forward_features(images))

    # ------------------------------------------------------------------ files

    def save_pretrained(self, out: str | Path) -> Path:
        """Write `config.json` and `model.safetensors` into `out` (created if needed)."""
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        state = {
            k: v.detach().to("cpu", torch.float32).contiguous()
            for k, v in self.state_dict().items()
        }
        save_file(
            state,
            str(out / WEIGHTS_NAME),
            metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)},
        )
        (out / CONFIG_NAME).write_text(json.dumps(self.config, indent=2) + "\n")
        _default_permissions(out / WEIGHTS_NAME)
        return out

    @classmethod
    def from_pretrained(
        cls, path: str | Path, map_location: str | torch.device = "cpu"
    ) -> RaptorBackbone:
        """Load a folder written by `raptor export` (or `save_pretrained`); eval mode.

        Raises BackboneFormatError naming the file and the problem when a file is
        missing, unreadable, of an unknown format version, or does not fit the config."""
        folder = Path(path)
        try:
            if not folder.is_dir():
                raise BackboneFormatError("not a folder (expected a raptor export folder)")
            model = cls(read_config(folder / CONFIG_NAME))
            state = read_weights(folder / WEIGHTS_NAME)
            check_state(state, model.state_dict())
        except BackboneFormatError as exc:
            raise BackboneFormatError(
                f"{folder}: {exc} (export it again with `raptor export`)"
            ) from None
        model.load_state_dict(state, strict=True)
        return model.to(map_location).eval()


def _default_permissions(path: Path) -> None:
    """safetensors writes owner-only files; give the file the user's usual permissions."""
    mask = os.umask(0)
    os.umask(mask)
    path.chmod(0o666 & ~mask)


# ---------------------------------------------------------------------- reading and checking

_SECTIONS = ("architecture", "phases", "tokens", "stem", "final_norm", "preprocessing")


def check_config(config: Any) -> None:
    """Format, version and required sections of a backbone config dict."""
    if not isinstance(config, dict):
        raise BackboneFormatError(
            f"{CONFIG_NAME}: expected a JSON object, got {type(config).__name__}"
        )
    if config.get("format") != FORMAT:
        raise BackboneFormatError(
            f"{CONFIG_NAME}: 'format' is {config.get('format')!r}, expected {FORMAT!r} "
            "(not a raptor backbone export)"
        )
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise BackboneFormatError(
            f"{CONFIG_NAME}: format_version {version!r} is not one this raptor reads "
            f"({FORMAT_VERSION}); export it again, or use the raptor version that wrote it"
        )
    for key in _SECTIONS:
        _need(config, key, CONFIG_NAME)
    arch, phases = config["architecture"], config["phases"]
    for key in ("num_layers", "boundaries"):
        if _need(phases, key, f"{CONFIG_NAME} phases") != _need(
            arch, key, f"{CONFIG_NAME} architecture"
        ):
            raise BackboneFormatError(
                f"{CONFIG_NAME}: phases.{key}={phases[key]} disagrees with architecture.{key}={arch[key]}"
            )


def _missing(path: Path) -> BackboneFormatError:
    return BackboneFormatError(
        f"{path.name}: file not found (a raptor export has {CONFIG_NAME} and {WEIGHTS_NAME})"
    )


def read_config(path: Path) -> Dict[str, Any]:
    """The checked config dict of `path` (a backbone's config.json)."""
    if not path.is_file():
        raise _missing(path)
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BackboneFormatError(f"{path.name}: not valid JSON: {exc}") from None
    check_config(config)
    return config


def read_weights(path: Path) -> Dict[str, Tensor]:
    """Tensors of a safetensors file (never a pickle)."""
    from safetensors import safe_open

    if not path.is_file():
        raise _missing(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types for bad headers/data
        raise BackboneFormatError(
            f"{path.name}: not a readable safetensors file (corrupted or truncated?): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    if meta.get("format") != FORMAT or meta.get("format_version") != str(FORMAT_VERSION):
        raise BackboneFormatError(
            f"{path.name}: metadata says format {meta.get('format')!r} version {meta.get('format_version')!r}; "
            f"expected {FORMAT!r} version {FORMAT_VERSION}"
        )
    return state


def _few(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")


def check_state(state: Dict[str, Tensor], expected: Dict[str, Tensor]) -> None:
    """Same tensor names and shapes as the model built from config.json, floating point."""
    problems = []
    missing = set(expected) - set(state)
    extra = set(state) - set(expected)
    if missing:
        problems.append(f"missing tensors [{_few(missing)}]")
    if extra:
        problems.append(f"unexpected tensors [{_few(extra)}]")
    shapes = [
        f"{k}: file {tuple(state[k].shape)}, config {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if shapes:
        problems.append(
            "wrong shapes [" + "; ".join(shapes[:5]) + (" ..." if len(shapes) > 5 else "") + "]"
        )
    dtypes = [k for k, v in state.items() if not v.is_floating_point()]
    if dtypes:
        problems.append(f"non-float tensors [{_few(dtypes)}]")
    if problems:
        raise BackboneFormatError(
            f"{WEIGHTS_NAME} does not match {CONFIG_NAME}: " + "; ".join(problems)
        )
