"""Evaluation: fidelity of a student, the teacher's phases, DMD baselines, run summaries."""
