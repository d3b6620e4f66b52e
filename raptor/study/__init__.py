"""Studies: many pipelines as one experiment (`raptor study STUDY.yaml`, docs/STUDIES.md).

- `spec`: the study file, its cells and derived values;
- `share`: the steps cells have in common (shards, teachers, phases), computed once;
- `execute`: one cell, all cells locally N at a time, or a SLURM array job;
- `aggregate`: study.json, study.md and plots, mean and std over seeds.
"""
