"""A fitted linear operator along depth and its exact-DMD spectrum.

Column convention: a hidden state x is a column vector and y ~ K x + b; for
tokens stored as rows (..., D) one application is x @ K^T + b. One application
advances `stride` layers (1 for span/anchor/identity fits, p for an endpoint
or ReplaceMe map over a span of length p). A ReplaceMe map (`mlp_input`) reads
the MLP output m_i of the block that produced x_i: x_{i+p} ~ x_i - m_i + K m_i + b.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor


@dataclass
class LinearOperator:
    """y ~ K x + b.

    K: (D, D) float64. b: (D,) or None (uncentred fit). stride: layers advanced
    per application. basis: orthonormal (D, r) basis of K's row space when K
    has rank r < D (exact DMD reads the spectrum there), else None.
    info: how it was fitted (selection, solver, span, rank, alpha, ...).
    mlp_input: K maps the MLP output m of the input layer's block, added to the
    residual stream x - m (ReplaceMe), one application only; else K maps x.
    """

    K: Tensor
    b: Optional[Tensor] = None
    stride: int = 1
    basis: Optional[Tensor] = None
    info: dict[str, Any] = field(default_factory=dict)
    mlp_input: bool = False

    @property
    def dim(self) -> int:
        return self.K.shape[0]

    def predict(self, x: Tensor, steps: int, mlp: Optional[Tensor] = None) -> Tensor:
        """x (..., D) -> (..., steps, D): [K x + b, K (K x + b) + b, ...], every step kept;
        with mlp_input, mlp (..., D) the MLP output in x and steps = 1: x - m + K m + b.

        Computed in x's dtype promoted to at least float32 (bf16 inputs come back
        float32), on x's device."""
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"LinearOperator.predict: last dim must be {self.dim}, got {tuple(x.shape)}"
            )
        if steps < 1:
            raise ValueError(f"LinearOperator.predict: steps must be >= 1, got {steps}")
        dtype = torch.promote_types(x.dtype, torch.float32)
        Kt = self.K.to(device=x.device, dtype=dtype).T
        b = None if self.b is None else self.b.to(device=x.device, dtype=dtype)
        if self.mlp_input:
            if mlp is None or mlp.shape != x.shape or steps != 1:
                raise ValueError(
                    "LinearOperator.predict: a ReplaceMe map takes one step and the MLP output "
                    f"of x's shape {tuple(x.shape)}, got steps={steps}, "
                    f"mlp {None if mlp is None else tuple(mlp.shape)}"
                )
            m = mlp.to(dtype)
            out = x.to(dtype) - m + m @ Kt
            return (out if b is None else out + b).unsqueeze(-2)
        out, cur = [], x.to(dtype)
        for _ in range(steps):
            cur = cur @ Kt if b is None else cur @ Kt + b
            out.append(cur)
        return torch.stack(out, dim=-2)

    def _reduced(self) -> tuple[Tensor, Optional[Tensor]]:
        """The matrix whose eigenvalues are K's (non-zero) spectrum, and the basis it lives in."""
        if self.basis is None:
            return self.K, None
        Q = self.basis.to(self.K)
        return Q.T @ self.K @ Q, Q

    def eigenvalues(self) -> Tensor:
        """Eigenvalues (complex128), largest modulus first: all D of K, or, when K has
        rank r, the r of its reduction Q^T K Q to the row-space basis Q (K's non-zero
        eigenvalues, as exact DMD computes them)."""
        A, _ = self._reduced()
        lam = torch.linalg.eigvals(A.to(torch.float64))
        return lam[torch.argsort(lam.abs(), descending=True)]

    def modes(self) -> tuple[Tensor, Tensor]:
        """(eigenvalues (r,), modes (D, r)), complex128, largest modulus first.

        Modes are unit-norm eigenvectors of K: at full rank those of K itself; at
        rank r the exact-DMD modes K Q w (Tu et al. 2014) of the reduced
        eigenvectors w, which satisfy K phi = lambda phi."""
        A, Q = self._reduced()
        lam, w = torch.linalg.eig(A.to(torch.float64))
        if Q is not None:
            w = self.K.to(torch.complex128) @ (Q.to(torch.complex128) @ w)
        order = torch.argsort(lam.abs(), descending=True)
        w = w[:, order]
        return lam[order], w / torch.linalg.vector_norm(w, dim=0).clamp_min(1e-300)

    def to(self, device: torch.device | str) -> LinearOperator:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return LinearOperator(
            move(self.K),
            move(self.b),
            self.stride,
            move(self.basis),
            dict(self.info),
            self.mlp_input,
        )


def identity(dim: int, device: Optional[torch.device | str] = None, **info: Any) -> LinearOperator:
    """The identity baseline: every later layer predicted as the input layer."""
    return LinearOperator(torch.eye(dim, dtype=torch.float64, device=device), info=dict(info))
