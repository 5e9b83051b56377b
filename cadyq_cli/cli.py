"""The ``cadyq`` command line: parse, build configs, call the library, report, exit code."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    help="Upscale images with content-aware dynamically quantized super-resolution networks (CADyQ).",
)


@app.callback()
def _root() -> None:
    """Upscale images with content-aware dynamically quantized super-resolution networks (CADyQ)."""


@app.command()
def train(
    stage: Annotated[str, typer.Argument(help="fp, pams or cadyq")],
    data: Annotated[list[Path], typer.Option("--data", help="HR image folder (repeatable)")],
    run_dir: Annotated[Path, typer.Option("--run", help="run folder; resumes from its last.pt")],
    arch: Annotated[str, typer.Option(help="architecture")] = "edsr_baseline",
    scale: Annotated[int, typer.Option(help="upscaling factor")] = 4,
    init: Annotated[Optional[Path], typer.Option(help="previous stage checkpoint")] = None,
    teacher: Annotated[Optional[Path], typer.Option(help="teacher checkpoint (default: --init)")] = None,
    minutes: Annotated[float, typer.Option(help="time budget; stops cleanly and saves")] = 60.0,
    steps: Annotated[int, typer.Option(help="schedule length in steps")] = 300_000,
    batch: Annotated[int, typer.Option(help="batch size")] = 16,
    lr: Annotated[float, typer.Option(help="learning rate")] = 2e-4,
    lr_patch: Annotated[int, typer.Option(help="LR crop size")] = 48,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    bf16: Annotated[bool, typer.Option(help="bf16 autocast on CPU")] = True,
    threads: Annotated[int, typer.Option(help="torch threads (0: default)")] = 0,
    val_every: Annotated[int, typer.Option(help="validate every N steps")] = 250,
) -> None:
    """Train one stage (fp → pams → cadyq); resumable, stops at the time budget."""
    from .train.loop import TrainConfig, train_stage

    cfg = TrainConfig(
        stage=stage, arch=arch, scale=scale, data=[str(d) for d in data], run_dir=str(run_dir),
        init=str(init) if init else None, teacher=str(teacher) if teacher else None, minutes=minutes,
        steps=steps, batch=batch, lr=lr, lr_patch=lr_patch, seed=seed, bf16=bf16, threads=threads,
        val_every=val_every,
    )
    train_stage(cfg, log=lambda s: typer.echo(s, err=True))


def main() -> None:
    """Console-script entry point."""
    app()
