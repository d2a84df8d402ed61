"""Stage 2: causal attention distillation. ``losses`` (divergences, the LeaF mix), ``loop``
(the one training loop), ``variants`` (which students, with their rules)."""
