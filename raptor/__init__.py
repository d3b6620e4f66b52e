__version__ = "0.1.0"


def __getattr__(name: str):
    """`raptor.RaptorBackbone` is imported on first use, so `import raptor` stays light."""
    if name == "RaptorBackbone":
        from raptor.backbone import RaptorBackbone

        return RaptorBackbone
    raise AttributeError(f"module 'raptor' has no attribute {name!r}")
