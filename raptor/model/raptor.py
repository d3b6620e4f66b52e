"""The Raptor surrogate: k weight-tied transformer blocks applied recurrently over depth.

A teacher with L blocks produces hidden states a_0 .. a_L (a_0 enters block 1,
a_l is block l's output). A Raptor replaces the L blocks with k `RecurrentBlock`s
and a phase partition of layers 1..L into k contiguous segments, given by
a `Partition` (`raptor.model.partition`; boundaries [7, 10] with L = 12 mean
block 1 produces layers 1-7, block 2 layers 8-10, block 3 layers 11-12).
Layer l is produced as a_l = block_{j(l)}(a_{l-1}, l), j(l) the phase of l.

Shapes: x and a are (B, T, D): B images, T tokens, D features.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raptor.model.partition import ArchitectureError, Partition

LayerIndex = Union[int, Tensor]


DEPTH_FORMULA = (
    "s = W2 silu(W1 t + b1) + b2 + 1, t = 1-based index of the layer produced (float); "
    "(s1, s2, s3) = D-wide chunks of s; x <- x + s1 * LS1(Attn(LN1(x))); "
    "x <- x + s2 * LS2(MLP(LN2(x))); output s3 * x"
)


class LayerScale(nn.Module):
    """Per-channel scale gamma (D,), initialised to `init` everywhere."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class SelfAttention(nn.Module):
    """Multi-head self-attention through `F.scaled_dot_product_attention`.

    qkv: Linear(D, 3D) laid out [q; k; v], each split into `num_heads` heads of
    width D / num_heads; proj: Linear(D, D). Initialised like
    `nn.MultiheadAttention` (the reference's attention): Xavier-uniform qkv
    weight, zero qkv and proj biases, proj weight with Linear's default init.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ArchitectureError(
                f"attention: dim={dim} is not divisible by num_heads={num_heads}; "
                f"set model.num_heads to a divisor of {dim}"
            )
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.qkv.weight)
        if qkv_bias:
            nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = (
            self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        )
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, D/heads)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    """Feed-forward branch with hidden width H = int(mlp_ratio * D).

    `swiglu`: fc1 = Linear(D, 2H) whose output is [gate ; value] (gate first),
    silu(gate) * value -> fc2 = Linear(H, D). `gelu`: fc2(gelu(fc1(x))) with
    fc1 = Linear(D, H). Linear's default initialisation.
    """

    def __init__(self, dim: int, mlp: str = "swiglu", mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if mlp not in ("swiglu", "gelu"):
            raise ArchitectureError(f"mlp must be 'swiglu' or 'gelu', got '{mlp}' (model.mlp)")
        self.kind = mlp
        self.hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, self.hidden * (2 if mlp == "swiglu" else 1))
        self.fc2 = nn.Linear(self.hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        if self.kind == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        else:
            h = F.gelu(h)
        return self.fc2(h)


class RecurrentBlock(nn.Module):
    """A pre-norm transformer block that can be applied at any depth.

    Without depth conditioning:
        x <- x + LS1(Attn(LN1(x)));  x <- x + LS2(MLP(LN2(x)));  output x.
    With depth conditioning (the Raptor reference's depth scaling), for the
    1-based index t of the layer being produced, taken as a float:
        s = W2 silu(W1 t + b1) + b2 + 1            (W1: 1 -> depth_hidden, W2: depth_hidden -> 3D)
        (s1, s2, s3) = s[:D], s[D:2D], s[2D:]
        x <- x + s1 * LS1(Attn(LN1(x)))
        x <- x + s2 * LS2(MLP(LN2(x)))
        output s3 * x
    W2 and b2 start as N(0, depth_init_std^2) (W1, b1 with Linear's default
    init, as in the reference), so s ~ 1 and the block starts close to its
    unconditioned form: every s_i - 1 has std depth_init_std *
    sqrt(1 + |silu(W1 t + b1)|^2), which grows with t (with the defaults about
    2e-4 at t = 1 and 2e-3 at t = 12).

    LN: LayerNorm(eps=ln_eps); LS: LayerScale initialised to `layerscale_init`;
    Attn: `SelfAttention`; MLP: `Mlp` (swiglu or gelu, hidden mlp_ratio * D).

    forward(x (B, T, D), t) -> (B, T, D); t is an int (same layer for the whole
    batch) or a LongTensor (B,) (one layer per row, so teacher forcing can
    batch several layers in one call). t is ignored without depth conditioning.

    `checkpoint_activations` (a run-time switch, not part of the architecture):
    when True and gradients are on, the block keeps only its input and recomputes
    its activations in the backward pass (`torch.utils.checkpoint`), trading about
    one more forward for memory.
    """

    checkpoint_activations: bool = False

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp: str = "swiglu",
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ln_eps: float = 1e-5,
        layerscale_init: float = 1e-5,
        depth_conditioning: bool = True,
        depth_hidden: int = 16,
        depth_init_std: float = 1e-4,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attn = SelfAttention(dim, num_heads, qkv_bias)
        self.ls1 = LayerScale(dim, layerscale_init)
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        self.mlp = Mlp(dim, mlp, mlp_ratio)
        self.ls2 = LayerScale(dim, layerscale_init)
        self.depth_conditioning = depth_conditioning
        if depth_conditioning:
            self.depth_in = nn.Linear(1, depth_hidden)  # W1, b1
            self.depth_out = nn.Linear(depth_hidden, 3 * dim)  # W2, b2
            nn.init.normal_(self.depth_out.weight, std=depth_init_std)
            nn.init.normal_(self.depth_out.bias, std=depth_init_std)

    def depth_scales(
        self, t: LayerIndex, batch: int, like: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(s1, s2, s3), each (B, 1, D), for layer index t (int or (B,) tensor)."""
        t = torch.as_tensor(t, device=like.device).to(self.depth_out.weight.dtype)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(
                f"layer index t must be an int or a tensor of shape ({batch},), got {tuple(t.shape)}"
            )
        s = self.depth_out(F.silu(self.depth_in(t[:, None]))) + 1.0
        return tuple(s[:, None, :].chunk(3, dim=-1))  # type: ignore[return-value]

    def forward(self, x: Tensor, t: LayerIndex | None = None) -> Tensor:
        if self.checkpoint_activations and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self._forward, x, t, use_reentrant=False)
        return self._forward(x, t)

    def _forward(self, x: Tensor, t: LayerIndex | None) -> Tensor:
        if not self.depth_conditioning:
            x = x + self.ls1(self.attn(self.norm1(x)))
            return x + self.ls2(self.mlp(self.norm2(x)))
        if t is None:
            raise ValueError("RecurrentBlock with depth conditioning needs the layer index t")
        s1, s2, s3 = self.depth_scales(t, x.shape[0], x)
        x = x + s1 * self.ls1(self.attn(self.norm1(x)))
        x = x + s2 * self.ls2(self.mlp(self.norm2(x)))
        return s3 * x


_BLOCK_KEYS = (
    "mlp",
    "mlp_ratio",
    "qkv_bias",
    "ln_eps",
    "layerscale_init",
    "depth_conditioning",
    "depth_hidden",
    "depth_init_std",
)


class Raptor(nn.Module):
    """k `RecurrentBlock`s over a phase partition of layers 1..L.

    Block j (0-based) produces exactly the layers of phase j, `phases[j]` =
    (first, last), 1-based inclusive; its input is the state after layer
    first - 1. All block options (`RecurrentBlock`'s keywords) are shared.
    `partition` is the `Partition`; `boundaries`, `phases` and `block_of` read it.
    """

    def __init__(
        self,
        num_layers: int,
        boundaries: Sequence[int],
        dim: int,
        num_heads: int,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        unknown = set(block_kwargs) - set(_BLOCK_KEYS)
        if unknown:
            raise ArchitectureError(
                f"Raptor: unknown block option(s) {sorted(unknown)}; expected some of {list(_BLOCK_KEYS)}"
            )
        if num_layers < 1:
            raise ArchitectureError(f"Raptor: num_layers must be >= 1, got {num_layers}")
        self.partition = Partition(num_layers, boundaries)
        self.num_layers = self.partition.num_layers
        self.dim = int(dim)
        self.num_heads = int(num_heads)
        defaults = inspect.signature(RecurrentBlock.__init__).parameters
        self.block_options = {
            key: block_kwargs.get(key, defaults[key].default) for key in _BLOCK_KEYS
        }
        self.blocks = nn.ModuleList(
            RecurrentBlock(self.dim, self.num_heads, **self.block_options)
            for _ in range(self.partition.k)
        )

    @classmethod
    def from_config(cls, model_cfg: Any, teacher: Any, partition: Partition) -> Raptor:
        """Build from the `model` config section and a teacher (uses only its
        `num_layers`, `embed_dim` and `num_heads`); `partition` must split the
        teacher's layers into model.k phases."""
        if partition.num_layers != int(teacher.num_layers):
            raise ArchitectureError(
                f"the phase partition covers {partition.num_layers} layers, the teacher has "
                f"{teacher.num_layers}; fix phases.boundaries or phases.file"
            )
        partition.with_k(int(model_cfg.k))
        return cls(
            partition.num_layers,
            partition.boundaries,
            int(teacher.embed_dim),
            int(model_cfg.num_heads or teacher.num_heads),
            **{key: getattr(model_cfg, key) for key in _BLOCK_KEYS},
        )

    def arch_config(self) -> dict[str, Any]:
        """Plain dict that rebuilds this model with `Raptor.from_arch` (no weights)."""
        return {
            "num_layers": self.num_layers,
            "boundaries": list(self.boundaries),
            "dim": self.dim,
            "num_heads": self.num_heads,
            **self.block_options,
            "depth_formula": DEPTH_FORMULA,
        }

    @classmethod
    def from_arch(cls, arch: dict[str, Any]) -> Raptor:
        """Inverse of `arch_config` (freshly initialised weights)."""
        arch = dict(arch)
        arch.pop("depth_formula", None)
        try:
            return cls(
                arch.pop("num_layers"),
                arch.pop("boundaries"),
                arch.pop("dim"),
                arch.pop("num_heads"),
                **arch,
            )
        except KeyError as exc:
            raise ArchitectureError(
                f"Raptor arch config lacks the key {exc}: not written by `raptor fit`/`raptor export`"
            ) from None

    @property
    def k(self) -> int:
        return len(self.blocks)

    @property
    def boundaries(self) -> list[int]:
        return list(self.partition.boundaries)

    @property
    def phases(self) -> list[tuple[int, int]]:
        """(first, last) layer of every phase, 1-based inclusive."""
        return self.partition.phases

    def block_of(self, layer: int) -> int:
        """0-based index of the block that produces `layer` (1..L)."""
        return self.partition.block_of(layer)

    def step(self, a: Tensor, layer: LayerIndex) -> Tensor:
        """a_{l-1} (B, T, D) -> a_l. `layer` is an int or a LongTensor (B,) of
        1-based layers; rows are routed to the block of their own phase."""
        if not torch.is_tensor(layer) or layer.ndim == 0:
            return self.blocks[self.block_of(int(layer))](a, int(layer))
        if layer.shape != (a.shape[0],):
            raise ValueError(
                f"layer indices must have shape ({a.shape[0]},), got {tuple(layer.shape)}"
            )
        if int(layer.min()) < 1 or int(layer.max()) > self.num_layers:
            raise ValueError(f"layer indices must lie in 1..{self.num_layers}")
        which = torch.bucketize(
            layer, torch.tensor(self.boundaries, device=layer.device, dtype=layer.dtype)
        )
        out = torch.empty_like(a)
        for j in torch.unique(which).tolist():
            rows = which == j
            out[rows] = self.blocks[j](a[rows], layer[rows]).to(out.dtype)
        return out

    def rollout(self, a: Tensor, start_layer: int, end_layer: int) -> Tensor:
        """From a = a_start (B, T, D), produce layers start+1..end recurrently:
        returns (B, end - start, T, D)."""
        if not 0 <= start_layer < end_layer <= self.num_layers:
            raise ValueError(
                f"rollout needs 0 <= start_layer < end_layer <= {self.num_layers}, got {start_layer}, {end_layer}"
            )
        states = []
        for layer in range(start_layer + 1, end_layer + 1):
            a = self.step(a, layer)
            states.append(a)
        return torch.stack(states, dim=1)

    def forward(self, a0: Tensor) -> Tensor:
        """a_0 (B, T, D) -> the whole trajectory a_1..a_L, (B, L, T, D)."""
        return self.rollout(a0, 0, self.num_layers)
