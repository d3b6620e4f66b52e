"""Raptor: distil ViTs into block-recurrent surrogates and fit DMD baselines along depth.

Layout: `raptor.model` (the networks), `raptor.data` (shards and streaming),
`raptor.train` (Lightning training, losses, checkpoints, runs), `raptor.eval`
(fidelity, phases, DMD baselines, summaries), `raptor.bench` (benchmarks),
`raptor.commands` (one module per `raptor` subcommand).

The public API is imported on first use, so `import raptor` stays torch-free.
"""

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute or None for the module itself)
_LAZY = {
    "Raptor": ("raptor.model.raptor", "Raptor"),
    "RecurrentBlock": ("raptor.model.raptor", "RecurrentBlock"),
    "Partition": ("raptor.model.partition", "Partition"),
    "Teacher": ("raptor.model.teacher", "Teacher"),
    "RaptorBackbone": ("raptor.model.backbone", "RaptorBackbone"),
    "losses": ("raptor.train.losses", None),
}


def __getattr__(name: str):
    """Import a public name from `_LAZY` the first time it is used."""
    if name not in _LAZY:
        raise AttributeError(f"module 'raptor' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    return value if attr is None else getattr(value, attr)
