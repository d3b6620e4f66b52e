"""Probes: task heads trained on a backbone's frozen features (`raptor probe`)."""
