"""The ``leaf-ray`` command line. Each subcommand takes a YAML config (see ``configs/``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from leaf_ray.config import (
    ConfigError,
    DistillationConfig,
    EvaluationConfig,
    PipelineConfig,
    PruningConfig,
    ScoringConfig,
    ServingConfig,
    load_config,
)

app = typer.Typer(help="LeaF causal attention distillation on Ray.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, context_settings={"help_option_names": ["-h", "--help"]})


@app.callback()
def main() -> None:
    """LeaF: find the tokens a student leans on and the teacher ignores, and distill around them."""

STAGES = {
    "pipeline": PipelineConfig,
    "scoring": ScoringConfig,
    "pruning": PruningConfig,
    "distillation": DistillationConfig,
    "serving": ServingConfig,
    "evaluation": EvaluationConfig,
}


@app.command()
def validate(
    config: Annotated[Path, typer.Argument(help="YAML config file.")],
    stage: Annotated[str, typer.Option(help=f"Which model the file holds: {', '.join(STAGES)}.")] = "pipeline",
) -> None:
    """Check a config file; print the resolved settings or each bad field."""
    if stage not in STAGES:
        raise typer.BadParameter(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}", param_hint="--stage")
    try:
        loaded = load_config(config, STAGES[stage])
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    typer.echo(loaded.model_dump_json(indent=2))


@app.command()
def demo(config: Annotated[Path, typer.Option(help="Pipeline config.")] = Path("configs/demo.yaml")) -> None:
    """Run the main job on the embedded default."""
    try:
        load_config(config, PipelineConfig)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{config} is valid. The pipeline stages (embedded benchmark, Ray Data scoring, Ray Train "
               "distillation, Ray Serve) are not built yet; see the open issues.")


if __name__ == "__main__":
    app()
