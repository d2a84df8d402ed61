"""leaf-ray: LeaF causal attention distillation on Ray."""

__version__ = "0.1.0"
