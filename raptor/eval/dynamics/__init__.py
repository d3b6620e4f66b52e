"""Dynamical interpretability (the Raptor paper's Section 4, Appendices C and D): ViT depth
as an iterated map on token directions, measured for a teacher and its Raptors on the
same images.

- `moments.py`: streamed per-layer mean and spread (sums in float64);
- `directions.py`: unit states, feature norms, directional convergence gamma_l, angular
  speed s_l, class-averaged normalised paths (the PCA view);
- `updates.py`: stable and effective rank of the angular update matrix, coherence kappa_l;
- `sensitivity.py`: the perturbation protocol (eps * u injected at layer l, run on);
- `spectra.py`: exact DMD (`dmd.exact`) of group-averaged, l2-normalised states;
- `accumulate.py`: `Dynamics`, every statistic of one model, updated batch by batch;
- `models.py`: the analysed models (teacher, Raptor run or checkpoint, export);
- `plots.py`, `report.py`: figures, analysis.json, CSV tables, analysis.md;
- `run.py`: `analyze`, streaming validation images through every model.
"""
