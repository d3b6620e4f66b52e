"""The two kinds of expected failure every `raptor` command reports without a traceback.

- `UserError`: bad input the user can fix (config, file, shard, checkpoint, path,
  disk full, permission denied). The CLI prints one message and exits 2.
- `RunFailed`: a run that started and could not finish (non-finite loss, too many bad
  samples). The CLI prints the message and exits 1.

The traceback is shown only with `raptor --debug ...` or `RAPTOR_DEBUG=1`. Any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: the message names the thing and what was expected (exit 2)."""


class RunFailed(RuntimeError):
    """A run that could not finish: the message says where it stopped (exit 1)."""


__all__ = ["RunFailed", "UserError"]
