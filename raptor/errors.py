"""The two kinds of expected failure every `raptor` command reports without a traceback.

- `UserError`: bad input the user can fix (config, file, shard, checkpoint, path,
  disk full, permission denied). The CLI prints one message and exits 2.
- `RunFailed`: a run that started and could not finish (non-finite loss, too many bad
  samples). The CLI prints the message and exits 1.

The traceback is shown only with `raptor --debug ...` or `RAPTOR_DEBUG=1`. Any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class UserError(ValueError):
    """Bad input: the message names the thing and what was expected (exit 2)."""


class RunFailed(RuntimeError):
    """A run that could not finish: the message says where it stopped (exit 1)."""


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """The parsed contents of the JSON file `path`; a file that is not valid JSON (cut
    short, overwritten) raises UserError naming it and what to do."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(
            f"{what} {path} is not valid JSON ({exc}); delete it to have it written again, "
            "or restore it"
        ) from None


__all__ = ["RunFailed", "UserError", "read_json"]
