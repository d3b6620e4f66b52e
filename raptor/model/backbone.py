"""An exported Raptor as a standalone image backbone (`raptor export` writes it).

A backbone folder is a model repository: `config.json`, `model.safetensors` and a
`README.md` model card (`raptor.model.card`), with the card's plot beside them. It holds the teacher's stem
(patch embedding, position embedding, class and register tokens, optional
pre-norm), the k recurrent blocks over their phase partition, and the teacher's
final norm. `RaptorBackbone.from_pretrained(DIR)` rebuilds it with torch,
safetensors and `raptor.model.raptor` only (no timm, Lightning, W&B or OmegaConf),
and never unpickles anything. Through huggingface_hub's `PyTorchModelHubMixin`,
`save_pretrained(DIR)` writes the folder and `push_to_hub(REPO_ID)` uploads it (only
when called); `from_pretrained` also takes a hub repo id "owner/name" that is not a
local path.

Integrity: config.json records `weights_sha256` (of the tensors in model.safetensors:
names, dtypes, shapes and bytes in name order, as safetensors writes its header's keys
in no fixed order) and
`self_test`: the final-normed tokens at a few (token, feature) positions for a fixed
seeded input (float32 on CPU, values printed in float64), with the computation's
config fields they were computed with. Loading checks the hash (naming the weights
file), then those fields (naming an edited one), then reruns the self-test.

Shapes: images (B, C, H, W), normalized with `config["preprocessing"]` and of the
fixed size `config["stem"]["img_size"]`; tokens (B, T, D) laid out
[cls, reg_1..reg_R, patch_1..patch_P] (patches row-major over the grid);
trajectory (B, L+1, T, D) holding a_0..a_L (a_0 enters block 1).

    model = RaptorBackbone.from_pretrained("exports/dinov2_vitb14_reg_k3")
    tokens = model.forward_features(images)   # (B, T, D), final-normed
    pooled = model(images)                    # (B, 2D) = [cls ; mean(patch)]
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from huggingface_hub import ModelCard, PyTorchModelHubMixin
from torch import Tensor, nn

from raptor.errors import UserError
from raptor.model.card import model_card
from raptor.model.raptor import Raptor
from raptor.model.tokens import token_groups

FORMAT = "raptor-backbone"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ONNX_NAME = "model.onnx"
CARD_NAME = "README.md"
SELF_TEST_SEED = 0
SELF_TEST_TOLERANCE = 1e-4  # |got - recorded| <= tol * (1 + |recorded|), float32 on CPU
# the config sections that define the computation (recorded with the self-test)
COMPUTATION = ("architecture", "phases", "depth_conditioning", "tokens", "stem", "final_norm")


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


class RaptorBackbone(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="raptor",
    tags=["raptor", "block-recurrent", "vision-transformer"],
    pipeline_tag="image-feature-extraction",
    repo_url="https://github.com/KempnerInstitute/raptor",
):
    """Teacher stem -> Raptor (k recurrent blocks over L layers) -> teacher final norm.

    Build with `from_pretrained(DIR or REPO_ID)` (or `RaptorBackbone(config)` for fresh
    weights). forward_features(images) (B, C, H, W) -> final-normed tokens (B, T, D);
    forward(images) -> pooled [cls ; mean(patch)] (B, 2D), registers excluded;
    trajectory(images) -> a_0..a_L (B, L+1, T, D) before the final norm.
    `files` maps names to bytes saved beside the weights (the card's plot).
    """

    def __init__(self, config: Dict[str, Any]):
        super().__init__()
        check_config(config)
        self.config = config
        self.files: Dict[str, bytes] = {}
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

    def _save_pretrained(self, save_directory: Path) -> None:
        """The mixin's hook (`save_pretrained(DIR)`, `push_to_hub`): write model.safetensors,
        config.json with its sha256 and a fresh self-test, and `files`; the mixin then writes
        README.md from `generate_model_card` unless one is there."""
        from safetensors.torch import save_file

        out = Path(save_directory)
        state = {
            k: v.detach().to("cpu", torch.float32).contiguous()
            for k, v in self.state_dict().items()
        }
        save_file(
            state,
            str(out / WEIGHTS_NAME),
            metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)},
        )
        _default_permissions(out / WEIGHTS_NAME)
        self.config = {
            **self.config,
            "weights_sha256": weights_sha256(state),
            "self_test": self._self_test_record(),
        }
        (out / CONFIG_NAME).write_text(json.dumps(self.config, indent=2) + "\n")
        for name, data in self.files.items():
            (out / name).write_bytes(data)

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        """README.md: the model card `raptor.model.card.model_card` renders from the config."""
        return ModelCard(model_card(self.config))

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        map_location: str | torch.device = "cpu",
        *,
        revision: Optional[str] = None,
        cache_dir: Optional[str | Path] = None,
        force_download: bool = False,
        token: Optional[str | bool] = None,
        local_files_only: bool = False,
    ) -> RaptorBackbone:
        """Load a folder written by `raptor export` (or `save_pretrained`), or a hub repo id
        "owner/name" that is no local path (the hub arguments apply to it); eval mode.

        Raises BackboneFormatError naming the file and the problem when a file is
        missing, unreadable, of an unknown format version, does not fit the config, or
        fails the integrity checks (weights' sha256, recorded fields, self-test)."""
        folder = Path(path)
        if not folder.exists() and _HUB_ID.fullmatch(str(path)):
            folder = _download(
                str(path),
                revision=revision,
                cache_dir=cache_dir,
                force_download=force_download,
                token=token,
                local_files_only=local_files_only,
            )
        try:
            if not folder.is_dir():
                raise BackboneFormatError("not a folder (expected a raptor export folder)")
            model = cls(read_config(folder / CONFIG_NAME))
            state = read_weights(folder / WEIGHTS_NAME)
            check_state(state, model.state_dict())
            check_weights_hash(state, model.config)
            check_recorded_fields(model.config)
            model.load_state_dict(state, strict=True)
            model.eval()
            check_self_test(model)
        except BackboneFormatError as exc:
            raise BackboneFormatError(
                f"{folder}: {exc} (export it again with `raptor export`)"
            ) from None
        plot = (model.config.get("evaluation") or {}).get("plot")
        if plot and (folder / plot).is_file():
            model.files[plot] = (folder / plot).read_bytes()
        return model.to(map_location)

    # ------------------------------------------------------------------ self-test

    def _self_test_input(self) -> Tensor:
        g = torch.Generator().manual_seed(SELF_TEST_SEED)
        return torch.randn(1, self.stem.in_chans, *self.stem.img_size, generator=g)

    def _self_test_positions(self) -> List[Tuple[int, int]]:
        """(token, feature) pairs: the class token, the first and middle patch, the last token."""
        t, d = self.stem.num_tokens, self.embed_dim
        tokens = (0, self.num_prefix_tokens, (self.num_prefix_tokens + t) // 2, t - 1)
        features = (0, d // 3, (2 * d) // 3, d - 1)
        return list(zip(tokens, features))

    @torch.no_grad()
    def self_test_values(self) -> List[float]:
        """forward_features on the fixed seeded input at the self-test positions (float32, CPU)."""
        on_cpu = all(
            p.device.type == "cpu" and p.dtype == torch.float32
            for p in itertools.chain(self.parameters(), self.buffers())
        )
        model = self if on_cpu else copy.deepcopy(self).to("cpu", torch.float32)
        tokens = model.eval().forward_features(self._self_test_input())[0].double()
        return [float(tokens[t, f]) for t, f in self._self_test_positions()]

    def _self_test_record(self) -> Dict[str, Any]:
        input_shape = [1, self.stem.in_chans, *self.stem.img_size]
        return {
            "input": f"torch.randn({input_shape}, generator=torch.Generator().manual_seed("
            f"{SELF_TEST_SEED})), float32 on CPU",
            "output": "forward_features(input)[0, token, feature]",
            "positions": [list(p) for p in self._self_test_positions()],
            "values": self.self_test_values(),
            "tolerance": SELF_TEST_TOLERANCE,
            "fields": computation_fields(self.config),
        }


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _download(repo_id: str, **hub: Any) -> Path:
    """The hub repository's config, weights and card plot in the local cache; its folder."""
    from huggingface_hub import hf_hub_download

    try:
        config = Path(hf_hub_download(repo_id, CONFIG_NAME, **hub))
        hf_hub_download(repo_id, WEIGHTS_NAME, **hub)
        plot = (json.loads(config.read_text()).get("evaluation") or {}).get("plot")
        if plot:
            hf_hub_download(repo_id, plot, **hub)
    except Exception as exc:  # the hub's errors: offline, no such repo or file, no access
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise BackboneFormatError(
            f"{repo_id}: not a local folder, and fetching it from the Hugging Face Hub failed "
            f"({type(exc).__name__}: {first})"
        ) from None
    return config.parent


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


# ---------------------------------------------------------------------- integrity


def weights_sha256(state: Dict[str, Tensor]) -> str:
    """sha256 of the tensors' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _flatten(value: Any, prefix: str) -> Iterator[Tuple[str, Any]]:
    if isinstance(value, dict):
        for key, sub in value.items():
            yield from _flatten(sub, f"{prefix}.{key}")
    else:
        yield prefix, value


def computation_fields(config: Dict[str, Any]) -> Dict[str, Any]:
    """The fields of the COMPUTATION sections, flattened to dotted names."""
    return {k: v for section in COMPUTATION for k, v in _flatten(config.get(section), section)}


def check_weights_hash(state: Dict[str, Tensor], config: Dict[str, Any]) -> None:
    """The weights are those config.json was written with."""
    recorded = _need(config, "weights_sha256", CONFIG_NAME)
    actual = weights_sha256(state)
    if actual != recorded:
        raise BackboneFormatError(
            f"{WEIGHTS_NAME}: sha256 {actual[:12]}... differs from the weights_sha256 "
            f"{str(recorded)[:12]}... that {CONFIG_NAME} records (the weights file was replaced "
            "or modified)"
        )


def check_recorded_fields(config: Dict[str, Any]) -> None:
    """No computation field differs from the values the self-test was recorded with."""
    recorded = _need(_need(config, "self_test", CONFIG_NAME), "fields", f"{CONFIG_NAME} self_test")
    now = computation_fields(config)
    changed = [
        f"{k} is {now.get(k, '(missing)')!r}, exported with {recorded.get(k, '(missing)')!r}"
        for k in sorted(set(recorded) | set(now))
        if now.get(k, "(missing)") != recorded.get(k, "(missing)")
    ]
    if changed:
        raise BackboneFormatError(f"{CONFIG_NAME}: edited after export: " + "; ".join(changed[:5]))


def check_self_test(model: RaptorBackbone) -> None:
    """forward_features at the recorded positions gives the recorded values."""
    where = f"{CONFIG_NAME} self_test"
    record = _need(model.config, "self_test", CONFIG_NAME)
    positions = [tuple(p) for p in _need(record, "positions", where)]
    if positions != model._self_test_positions():
        raise BackboneFormatError(f"{where}: positions {positions} are not this format's")
    want = torch.tensor(_need(record, "values", where), dtype=torch.float64)
    got = torch.tensor(model.self_test_values(), dtype=torch.float64)
    err = (got - want).abs() / (1 + want.abs())
    if not bool((err <= SELF_TEST_TOLERANCE).all()):
        i = int(err.argmax())
        raise BackboneFormatError(
            f"{where}: output at (token, feature) {positions[i]} is {float(got[i]):.6g}, "
            f"recorded {float(want[i]):.6g} (relative error {float(err[i]):.2g} > "
            f"{SELF_TEST_TOLERANCE:g}): this raptor computes the backbone differently from "
            f"raptor {model.config.get('raptor_version', '?')} that exported it"
        )
