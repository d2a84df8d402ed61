"""Named detectors: a scoring method and the pruning rule after it, as the leaderboard names them.

``<method>[+<post-step>]``: ``grad_norm`` is the paper's detector; ``occlusion+clause`` scores
by occlusion and grows each flagged unit to its clause; ``grad_norm+best_clause`` also keeps
only the clause of the lowest diff (one per record: it is told how many to cut);
``grad_norm+iterative`` cuts clauses one at a time, scoring the text again after each, until its
stopping rule says the student has no shortcut left (:mod:`leaf_ray.detection.iterative`; it
needs no count and may cut nothing). The same two config sections run them in a pipeline:
``scoring.method`` and ``pruning.threshold`` / ``grow_spans`` / ``max_spans``.
"""

from __future__ import annotations

from leaf_ray.config import PruningConfig, ScoringConfig

METHODS = ("grad_norm", "grad_x_input", "integrated_gradients", "occlusion")
POST_STEPS: dict[str, dict] = {
    "": {},
    "+clause": {"grow_spans": "clause"},
    "+best_clause": {"grow_spans": "clause", "max_spans": 1},
    "+iterative": {"threshold": "iterative", "grow_spans": "clause"},
}
DETECTORS = tuple(method + step for method in METHODS for step in POST_STEPS)


def detector_configs(name: str, scoring: ScoringConfig, pruning: PruningConfig) -> tuple[ScoringConfig, PruningConfig]:
    """``scoring`` and ``pruning`` set up as detector ``name``."""
    method, plus, step = name.partition("+")
    if method not in METHODS or plus + step not in POST_STEPS:
        raise ValueError(f"unknown detector {name!r}; use one of {', '.join(DETECTORS)}")
    return (scoring.model_copy(update={"method": method}),
            PruningConfig.model_validate({**pruning.model_dump(), **POST_STEPS[plus + step]}))
