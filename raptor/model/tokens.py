"""Token groups along a ViT's token axis T: [cls, registers..., patches...]."""

from __future__ import annotations

from typing import Dict


def token_groups(num_reg_tokens: int) -> Dict[str, slice]:
    """Slices along T of the groups every metric reports: cls (token 0), reg (tokens
    1..R, only when R > 0) and patch (the rest)."""
    groups = {"cls": slice(0, 1)}
    if num_reg_tokens:
        groups["reg"] = slice(1, 1 + num_reg_tokens)
    groups["patch"] = slice(1 + num_reg_tokens, None)
    return groups
