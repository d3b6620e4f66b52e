"""`Dynamics`: every statistic of one model's trajectories, accumulated batch by batch.

Per token group (the model's cls / reg / patch, and "all"), over images and tokens:
feature norm |x_l| and gamma_l (l = 0..L), angular speed s_l (transition l -> l+1, l =
0..L-1), sensitivity (injection layer l = 0..L); per image: stable rank, effective rank and
coherence of the update matrix of the group's tokens (groups of at least two tokens), and
the exact DMD of the group-averaged unit states (eigenvalues kept, at most rank per image);
per class c < `classes`: the mean over images of the group's mean unit direction (the PCA
view). Every sum is exact whatever the chunking, so streaming equals one pass.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor

from raptor.eval.dynamics import directions, sensitivity, spectra, updates
from raptor.eval.dynamics.moments import Moments


def with_all(groups: Dict[str, slice]) -> Dict[str, slice]:
    """The model's token groups and "all" (every token)."""
    return {**groups, "all": slice(None)}


class Dynamics:
    """Statistics of one model (module docstring). `groups`: the model's token slices;
    `classes`: how many classes get a mean path; `rank`: the DMD rank; `eps`: the
    perturbation size."""

    def __init__(
        self,
        num_layers: int,
        dim: int,
        groups: Dict[str, slice],
        classes: int,
        rank: int,
        eps: float,
    ) -> None:
        L = num_layers
        self.num_layers, self.dim, self.rank, self.eps = L, dim, int(rank), float(eps)
        self.groups = with_all(groups)
        self.classes = int(classes)
        names = list(self.groups)
        self.norm = {g: Moments(L + 1) for g in names}
        self.gamma = {g: Moments(L + 1) for g in names}
        self.speed = {g: Moments(L) for g in names}
        self.sensitivity = {g: Moments(L + 1) for g in names}
        self.stable = {g: Moments(L) for g in names}
        self.effective = {g: Moments(L) for g in names}
        self.coherence = {g: Moments(L) for g in names}
        self.spectrum = {g: Moments(min(L, dim)) for g in names}
        self.eigenvalues: Dict[str, list] = {g: [] for g in names}
        self.radius = {g: Moments(1) for g in names}
        self.paths = {g: torch.zeros(self.classes, L + 1, dim, dtype=torch.float64) for g in names}
        self.path_counts = torch.zeros(self.classes, dtype=torch.float64)
        self.images = 0

    def _tokens(self, x: Tensor, tokens: slice) -> Tensor:
        """(B, K, T, ...) -> (B * tokens, K): one row per token of the group."""
        x = x[:, :, tokens]
        return x.permute(0, 2, 1).reshape(-1, x.shape[1])

    @torch.no_grad()
    def update(
        self,
        traj: Tensor,
        labels: Optional[Tensor] = None,
        step: Optional[sensitivity.Step] = None,
        noise: Optional[Tensor] = None,
    ) -> None:
        """traj (B, L+1, T, D) of valid images; labels (B,) for the class paths; `step` and
        `noise` (B, L+1, T, D) for the sensitivity (none without them)."""
        if traj.ndim != 4 or traj.shape[1] != self.num_layers + 1 or traj.shape[3] != self.dim:
            raise ValueError(
                f"trajectory must be (B, {self.num_layers + 1}, T, {self.dim}), got {tuple(traj.shape)}"
            )
        hat = directions.unit(traj)
        norm = traj.to(torch.float64).norm(dim=-1)
        gamma, speed = directions.convergence(hat), directions.angular_speed(hat)
        sens = None if step is None else sensitivity.sensitivity(step, traj, self.eps, noise)
        for g, tokens in self.groups.items():
            self.norm[g].update(self._tokens(norm, tokens).cpu())
            self.gamma[g].update(self._tokens(gamma, tokens).cpu())
            self.speed[g].update(self._tokens(speed, tokens).cpu())
            if sens is not None:
                self.sensitivity[g].update(self._tokens(sens, tokens).cpu())
            delta = updates.updates(hat[:, :, tokens])
            if delta.shape[2] >= 2:
                stable, effective = updates.ranks(delta)
                self.stable[g].update(stable.cpu())
                self.effective[g].update(effective.cpu())
                self.coherence[g].update(updates.coherence(delta).cpu())
            states = spectra.group_states(traj, tokens).cpu()
            for image in states:
                fit = spectra.image_dmd(image, self.rank)
                s = fit.singular_values
                self.spectrum[g].update((s / s[0].clamp_min(1e-300))[None])
                self.eigenvalues[g].append(fit.eigenvalues)
                rho = fit.eigenvalues.abs().max() if fit.rank else torch.tensor(0.0)
                self.radius[g].update(rho.reshape(1, 1))
            if labels is not None:
                keep = (labels >= 0) & (labels < self.classes)
                idx = labels[keep].cpu()
                self.paths[g].index_add_(0, idx, hat[keep][:, :, tokens].mean(2).cpu())
        if labels is not None:
            keep = (labels >= 0) & (labels < self.classes)
            self.path_counts += torch.bincount(labels[keep].cpu(), minlength=self.classes)
        self.images += traj.shape[0]

    def compute(self) -> Dict[str, Any]:
        """The statistics as JSON-ready lists (see `report.py` for the layout)."""

        def per_group(moments: Dict[str, Moments]) -> Dict[str, Any]:
            return {g: m.to_json() for g, m in moments.items() if m.count}

        eig = {}
        for g, values in self.eigenvalues.items():
            lam = torch.cat(values) if values else torch.zeros(0, dtype=torch.complex128)
            eig[g] = {
                "real": lam.real.tolist(),
                "imag": lam.imag.tolist(),
                "radius_median": float(lam.abs().median()) if lam.numel() else None,
                "angle_mean": float(lam.angle().abs().mean()) if lam.numel() else None,
                "spectral_radius": self.radius[g].to_json(),
                "singular_values": self.spectrum[g].to_json(),
            }
        counts = self.path_counts.clamp_min(1)[:, None, None]
        present = [c for c in range(self.classes) if self.path_counts[c] > 0]
        return {
            "images": self.images,
            "num_layers": self.num_layers,
            "groups": list(self.groups),
            "norm": per_group(self.norm),
            "gamma": per_group(self.gamma),
            "speed": per_group(self.speed),
            "sensitivity": per_group(self.sensitivity),
            "stable_rank": per_group(self.stable),
            "effective_rank": per_group(self.effective),
            "coherence": per_group(self.coherence),
            "dmd": eig,
            "class_paths": {
                "classes": present,
                "paths": {g: (p / counts)[present].tolist() for g, p in self.paths.items()},
            },
        }
