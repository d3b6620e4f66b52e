"""Distillation losses: token-group weighted MSE, teacher forcing (TF) and autoregression (AR).

Shapes: a state is (B, T, D) (tokens `[cls, reg.., patch..]`); a stretch of a
trajectory is (B, n, T, D). `block(x, t)` is one `RecurrentBlock` call with t the
1-based index of the layer it produces (an int, or a LongTensor (B,) per row).
Input noise (`noise_sigma`) is N(0, sigma^2) added to every block input, drawn
from `generator` so a run can make it reproducible independently of the global
RNG.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Optional

import torch
from torch import Tensor

# (pred, target) (..., T, D) -> loss per state (...); every state has T*D elements, so the
# mean of per-state losses over any batch equals the loss of the whole batch.
LossFn = Callable[[Tensor, Tensor], Tensor]


def mse(pred: Tensor, target: Tensor) -> Tensor:
    """Plain MSE per state: mean of (pred - target)^2 over (T, D); returns (...)."""
    return (pred - target).square().mean(dim=(-2, -1))


def group_weighted_mse(
    pred: Tensor, target: Tensor, groups: Mapping[str, slice], weights: Mapping[str, float]
) -> Tensor:
    """sum_g weights[g] * mean over group g's elements of (pred - target)^2, per state.

    pred, target (..., T, D) -> (...); `groups` slices the token axis (-2). A group
    absent from `groups` (e.g. "reg" for a teacher without registers) adds nothing;
    the weights are not renormalised.
    """
    err = (pred - target).square()
    return sum(float(weights[g]) * err[..., sl, :].mean(dim=(-2, -1)) for g, sl in groups.items())


def make_loss(
    kind: str,
    groups: Mapping[str, slice],
    weights: Mapping[str, float],
    final_phase: bool = True,
) -> LossFn:
    """`weighted` -> `group_weighted_mse` with `weights` {group: w}; `mse` -> `mse`;
    `weighted_final` -> weighted for the block whose phase ends at the last layer
    (`final_phase`), plain MSE for the others: the reference's stage-1 recipe.
    The returned function gives one loss per state; training takes its mean."""
    if kind == "weighted_final":
        kind = "weighted" if final_phase else "mse"
    if kind == "mse":
        return mse
    if kind == "weighted":
        missing = set(groups) - set(weights)
        if missing:
            raise ValueError(f"loss weights missing for token group(s) {sorted(missing)}")
        return lambda pred, target: group_weighted_mse(pred, target, groups, weights)
    raise ValueError(f"loss must be 'weighted', 'weighted_final' or 'mse', got '{kind}'")


def add_noise(x: Tensor, sigma: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """x + N(0, sigma^2) noise (x itself when sigma is 0)."""
    if not sigma:
        return x
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + sigma * noise


def teacher_forcing_loss(
    block: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    first_layer: int,
    loss_fn: LossFn,
    noise_sigma: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Every layer of a phase predicted in one step from the teacher's previous layer.

    inputs (B, n, T, D) = a_{f-1} .. a_{f+n-2}, targets (B, n, T, D) = a_f .. a_{f+n-1},
    f = first_layer. All n layers go through the block in one call on (B*n, T, D)
    with per-row layer indices; since every layer has as many elements, the loss
    equals the mean over layers of loss_fn(block(a_{l-1}, l), a_l).
    """
    B, n = inputs.shape[:2]
    layers = torch.arange(first_layer, first_layer + n, device=inputs.device).repeat(B)
    x = add_noise(inputs.flatten(0, 1), noise_sigma, generator)
    return loss_fn(block(x, layers), targets.flatten(0, 1)).mean()


def autoregressive_loss(
    block: Callable[[Tensor, int], Tensor],
    start: Tensor,
    targets: Tensor,
    first_layer: int,
    loss_fn: LossFn,
    noise_sigma: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, Tensor]:
    """The block rolled out from the phase input, gradients through the whole rollout.

    start (B, T, D) = a_{f-1}; targets (B, n, T, D) = a_f .. a_{f+n-1}. Step i feeds
    its own previous output (plus noise) back as x <- block(x, f + i). Returns
    (mean over the n steps of loss_fn(x_i, a_i), the predictions (B, n, T, D)).
    """
    n = targets.shape[1]
    x, loss, preds = start, 0.0, []
    for i in range(n):
        x = block(add_noise(x, noise_sigma, generator), first_layer + i)
        loss = loss + loss_fn(x, targets[:, i]).mean()
        preds.append(x)
    return loss / n, torch.stack(preds, dim=1)
