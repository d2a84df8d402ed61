"""The refusals a run can meet before it starts work, as one exception family."""

from __future__ import annotations


class RunRefused(ValueError):
    """An expected refusal: the run cannot go ahead as asked (an impossible resource request, a
    folder another run holds or wrote, tokenizers that cannot be compared, a config that does not
    validate). The message says what to change; the command line and the jobs print it as one
    line, without a traceback, and exit with status 2 (:func:`leaf_ray.cli.refusals_exit_2`)."""
