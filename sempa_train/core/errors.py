"""Errors shared across stages and runners."""

from __future__ import annotations


class RecordedFailure(RuntimeError):
    """A stage failed for a reason that running it again with the same inputs would not change (no checkpoint
    passed the selection gate, say): the executor writes it beside the stage's folder and a resumed run reports it
    instead of repeating the work."""
