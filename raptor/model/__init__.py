"""The networks: the recurrent block and Raptor, the teacher ViT, the exported backbone.

Importable without Lightning or argparse (a test checks it)."""
