"""The ``cadyq`` command line: parse, build configs, call the library, report, exit code.

Exit codes: 0 all good, 1 some inputs failed, 2 usage error, 130 interrupted (143 on SIGTERM).
Stdout carries machine output only (``--json -``); messages, progress and tables go to stderr.
"""
from __future__ import annotations

import json
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import CadyqError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    help="Upscale images with content-aware dynamically quantized super-resolution networks (CADyQ).",
)
err = Console(stderr=True, highlight=False)


class Mode(str, Enum):
    dynamic = "dynamic"
    fp32 = "fp32"
    w8a8 = "w8a8"
    w8a6 = "w8a6"
    w8a4 = "w8a4"


class Tiling(str, Enum):
    seamless = "seamless"
    paper = "paper"


class Interrupted(BaseException):  # not Exception: library code that catches Exception must not swallow it
    """Raised from the signal handler so that cleanup runs and the summary prints."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _on_signal(signum: int, frame: object) -> None:
    raise Interrupted(143 if signum == signal.SIGTERM else 130)


def _fail(msg: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(msg)}", soft_wrap=True)
    return typer.Exit(code)


ModelOpt = Annotated[Optional[str], typer.Option("--model", help="shipped model (see `cadyq models`); default edsr-baseline")]
WeightsOpt = Annotated[Optional[Path], typer.Option("--weights", help="checkpoint file (ours or official) instead of --model")]
ArchOpt = Annotated[Optional[str], typer.Option("--arch", help="architecture of --weights: edsr, carn, srresnet, idn")]
ScaleOpt = Annotated[int, typer.Option("--scale", help="upscaling factor: 2, 3 or 4")]
ModeOpt = Annotated[Mode, typer.Option("--mode", help="dynamic (CADyQ), fp32, or fixed w8a8/w8a6/w8a4")]
TilingOpt = Annotated[Tiling, typer.Option("--tiling", help="seamless (big tiles, bits per --region) or paper (96/90 patches)")]
TileOpt = Annotated[Optional[int], typer.Option("--tile", help="tile size in input px (seamless default 384, paper 96)")]
OverlapOpt = Annotated[int, typer.Option("--overlap", help="paper tiling: overlap in input px")]
RegionOpt = Annotated[int, typer.Option("--region", help="seamless tiling: bits are chosen per REGION x REGION input px")]
ThreadsOpt = Annotated[int, typer.Option("--threads", help="CPU threads (0: torch default)")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu or cuda")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress or report on stderr")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="show tracebacks")]
KernelsOpt = Annotated[str, typer.Option("--kernels", help="quantized convs: auto (int8 where exact), int8, or float (reference)")]
MaxPxOpt = Annotated[int, typer.Option("--max-pixels", help="refuse inputs larger than this many pixels (0: no limit)")]


def _load(model: str | None, weights: Path | None, arch: str | None, scale: int, mode: str, device: str, threads: int,  # noqa: ANN202
          kernels: str = "auto"):
    import torch

    from .weights import load_model

    if threads:
        torch.set_num_threads(threads)
    if weights is None and arch is not None:
        raise CadyqError("--arch goes with --weights")
    if weights is not None and model is not None:
        raise CadyqError("give --model or --weights, not both")
    return load_model(model=model, weights=weights, arch=arch, scale=scale, mode=mode, device=device, kernels=kernels)


def _model_label(model: str | None, weights: Path | None, scale: int) -> str:
    if weights is not None:
        return str(weights)
    return f"{model or 'edsr-baseline'}-x{scale}" if model is None or not model.endswith(f"-x{scale}") else model


def _print_report(rec: dict, fab_map: list[list[float]]) -> None:
    t = Table(box=None, show_header=False, pad_edge=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")  # long paths wrap instead of being cut with "…"
    hist = rec["bits_histogram"]
    n = max(1, sum(hist.values()))
    pct = 100.0 * rec["bitops_g"] / max(rec["bitops_fp32_g"], 1e-12)
    mp = rec["width"] * rec["height"] * rec["scale"] ** 2 / 1e6
    t.add_row("image", escape(f"{rec['input']} → {rec['output']}"))
    t.add_row("size", f"{rec['width']}x{rec['height']} → {rec['width'] * rec['scale']}x{rec['height'] * rec['scale']}")
    t.add_row("FAB", f"{rec['fab']:.2f} bits  ({rec['mode']}, {rec['tiling']})")
    t.add_row("bits", "  ".join(f"{b}-bit {100 * hist[b] / n:.0f}%" for b in ("4", "6", "8")))
    t.add_row("BitOPs", f"{rec['bitops_g']:.1f} G = {pct:.1f}% of FP32 ({rec['bitops_fp32_g']:.1f} G)")
    t.add_row("time", f"{rec['seconds']:.2f} s, {mp / max(rec['seconds'], 1e-9):.2f} output MP/s")
    err.print(t)
    if fab_map and rec["mode"] != "fp32":
        colors = {4: "blue", 6: "yellow", 8: "red"}
        rows = fab_map[:12]
        err.print("[dim]mean bits per region:[/dim]")
        for row in rows:
            cells = [f"[{colors[min((4, 6, 8), key=lambda b: abs(b - v))]}]{v:3.1f}[/]" for v in row[:16]]
            err.print(" ".join(cells) + (" …" if len(row) > 16 else ""))
        if len(fab_map) > 12:
            err.print("…")


@app.callback()
def _root() -> None:
    """Upscale images with content-aware dynamically quantized super-resolution networks (CADyQ)."""


@app.command()
def upscale(
    input: Annotated[Path, typer.Argument(help="image file or folder")],
    output: Annotated[Path, typer.Argument(help="output file, or folder for a folder input")],
    scale: ScaleOpt = 4, model: ModelOpt = None, weights: WeightsOpt = None, arch: ArchOpt = None,
    mode: ModeOpt = Mode.dynamic, tiling: TilingOpt = Tiling.seamless, tile: TileOpt = None,
    overlap: OverlapOpt = 6, region: RegionOpt = 96,
    json_out: Annotated[Optional[str], typer.Option("--json", help="write one JSON line per image to PATH, or - for stdout")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace existing outputs")] = False,
    skip_existing: Annotated[bool, typer.Option("--skip-existing", help="leave existing outputs alone (resume a batch)")] = False,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="descend into sub-folders")] = False,
    suffix: Annotated[str, typer.Option("--suffix", help="added to output file names")] = "",
    ext: Annotated[Optional[str], typer.Option("--ext", help="output format: png, jpg, webp, tif, bmp")] = None,
    threads: ThreadsOpt = 0, device: DeviceOpt = "cpu", kernels: KernelsOpt = "auto", max_pixels: MaxPxOpt = 64_000_000,
    quiet: QuietOpt = False, debug: DebugOpt = False,
) -> None:
    """Upscale an image, or every image of a folder, and report bits and BitOPs per region."""
    from .engine import TilingConfig
    from .pipeline import plan_jobs, upscale_file
    from .report import json_record

    if overwrite and skip_existing:
        raise _fail("--overwrite and --skip-existing exclude each other")
    cfg = TilingConfig(tiling=tiling.value, tile=tile, overlap=overlap, region=region)
    try:
        cfg.validate()
        jobs = plan_jobs(input, output, recursive, suffix, ext)
        net = _load(model, weights, arch, scale, mode.value, device, threads, kernels)
    except (CadyqError, ValueError) as e:
        if debug:
            raise
        raise _fail(str(e)) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if not jobs:
        raise _fail(f"{input}: no images found" + ("" if recursive else " (use --recursive for sub-folders)"))
    if input.is_dir():
        try:
            output.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _fail(f"cannot create the output folder {output}: {(e.strerror or str(e)).lower()}") from None
    label = _model_label(model, weights, scale)
    try:
        sink = sys.stdout if json_out == "-" else (open(json_out, "a") if json_out else None)
    except OSError as e:
        raise _fail(f"--json {json_out}: cannot open ({(e.strerror or str(e)).lower()})") from None
    failures: list[tuple[Path, str]] = []
    done = skipped = 0
    code = 0
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err, transient=True, redirect_stdout=False, redirect_stderr=False, disable=quiet)
    try:
        with progress:
            files_task = progress.add_task("files", total=len(jobs), visible=len(jobs) > 1)
            tiles_task = progress.add_task("tiles", total=1)
            for job in jobs:
                if job.dst.exists() and skip_existing:
                    skipped += 1
                    progress.advance(files_task)
                    continue
                progress.update(tiles_task, completed=0, description=f"{job.src.name}")
                try:
                    rep, warns = upscale_file(net, job, cfg, overwrite, max_pixels or None,
                                              lambda d, t: progress.update(tiles_task, completed=d, total=t))
                except CadyqError as e:
                    if debug:
                        raise
                    failures.append((job.src, str(e)))
                    if not quiet:
                        progress.console.print(f"[red]failed:[/red] {escape(str(e))}", soft_wrap=True)
                    progress.advance(files_task)
                    continue
                done += 1
                rec = json_record(rep, str(job.src), str(job.dst), label)
                if sink is not None:
                    sink.write(json.dumps(rec) + "\n")
                    sink.flush()
                if not quiet:
                    for w in warns:
                        progress.console.print(f"[yellow]warning:[/yellow] {escape(f'{job.src}: {w}')}", soft_wrap=True)
                    _print_report(rec, rep.region_fab_map().round(2).tolist() if rep.regions else [])
                progress.advance(files_task)
    except Interrupted as e:
        code = e.code
    except KeyboardInterrupt:
        code = 130
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if sink is not None and sink is not sys.stdout:
            sink.close()
    if not quiet:
        summary = f"{done} upscaled, {skipped} skipped, {len(failures)} failed"
        if code:
            summary += " — interrupted"
        err.print(summary)
    for src, msg in failures:  # failures are listed even with --quiet
        err.print(f"  [red]✗[/red] {escape(msg)}", soft_wrap=True)
    if code:
        raise typer.Exit(code)
    if failures:
        raise typer.Exit(1)


@app.command()
def bitmap(
    input: Annotated[Path, typer.Argument(help="image file")],
    output: Annotated[Path, typer.Argument(help="heatmap PNG to write")],
    scale: ScaleOpt = 4, model: ModelOpt = None, weights: WeightsOpt = None, arch: ArchOpt = None,
    mode: ModeOpt = Mode.dynamic, tiling: TilingOpt = Tiling.seamless, tile: TileOpt = None,
    overlap: OverlapOpt = 6, region: RegionOpt = 96,
    layer: Annotated[Optional[int], typer.Option("--layer", help="show selector K instead of the mean over layers")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing file")] = False,
    threads: ThreadsOpt = 0, device: DeviceOpt = "cpu", kernels: KernelsOpt = "auto", max_pixels: MaxPxOpt = 64_000_000,
    quiet: QuietOpt = False, debug: DebugOpt = False,
) -> None:
    """Save the bit-allocation heatmap of an image: mean selected bits per region."""
    from .engine import TilingConfig, upscale_array
    from .io import read_image, write_image
    from .report import bit_heatmap

    try:
        if mode == Mode.fp32:
            raise CadyqError("--mode fp32 selects no bits; use dynamic or w8aK")
        cfg = TilingConfig(tiling=tiling.value, tile=tile, overlap=overlap, region=region)
        cfg.validate()
        if output.exists() and not overwrite:
            raise CadyqError(f"{output}: exists (use --overwrite)")
        net = _load(model, weights, arch, scale, mode.value, device, threads, kernels)
        if layer is not None and not 0 <= layer < net.n_selectors:
            raise CadyqError(f"--layer must be between 0 and {net.n_selectors - 1} for {net.arch}")
        img = read_image(input, max_pixels=max_pixels or None)
        _, rep = upscale_array(net, img.rgb, cfg)
        pic = bit_heatmap(img.rgb, rep, layer)
        write_image(output, pic.astype("float32"), overwrite=overwrite)
    except (CadyqError, ValueError) as e:
        if debug:
            raise
        code = 2 if isinstance(e, ValueError) or "--" in str(e) else 1
        raise _fail(str(e), code) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if not quiet:
        err.print(escape(f"{output}: FAB {rep.fab:.2f}, {rep.grid[0]}x{rep.grid[1]} regions"))


@app.command()
def models(
    json_out: Annotated[bool, typer.Option("--json", help="print the manifest entries as JSON")] = False,
) -> None:
    """List the shipped checkpoints with their measured quality and cost."""
    from .weights import list_weights, weights_dir

    entries = list_weights()
    if json_out:
        typer.echo(json.dumps([e.__dict__ for e in entries], indent=1))
        return
    if not entries:
        err.print(escape(f"no shipped weights found in {weights_dir()}"))
        raise typer.Exit(1)
    t = Table(title="shipped models")
    for c in ("name", "arch", "scale", "params", "Set5 fp32", "Set5 dynamic", "FAB"):
        t.add_column(c, justify="right" if c not in ("name", "arch") else "left", no_wrap=c == "name")  # names stay whole
    for e in entries:
        s5 = e.metrics.get("Set5", {})
        fp, dy = s5.get("fp32", {}), s5.get("dynamic", {})
        t.add_row(e.name, e.arch, f"x{e.scale}", f"{e.params / 1e6:.2f}M",
                  f"{fp.get('psnr', float('nan')):.2f}", f"{dy.get('psnr', float('nan')):.2f}", f"{dy.get('fab', float('nan')):.2f}")
    Console().print(t)


@app.command("eval")
def eval_cmd(
    data_dirs: Annotated[list[Path], typer.Argument(help="dataset folders of HR images (e.g. Set5 B100)")],
    scale: ScaleOpt = 4, model: ModelOpt = None, weights: WeightsOpt = None, arch: ArchOpt = None,
    modes: Annotated[Optional[str], typer.Option("--modes", help="comma list of fp32,w8a8,w8a6,w8a4,dynamic (default fp32,w8a8,dynamic)")] = None,
    bicubic: Annotated[bool, typer.Option("--bicubic", help="also score MATLAB bicubic (alone when no model is given)")] = False,
    tiling: Annotated[str, typer.Option("--tiling", help="paper (official 96/90 patches), seamless or whole")] = "paper",
    json_out: Annotated[Optional[str], typer.Option("--json", help="write the results as JSON to PATH, or - for stdout")] = None,
    csv_out: Annotated[Optional[Path], typer.Option("--csv", help="write one row per image and mode to PATH")] = None,
    limit: Annotated[int, typer.Option("--limit", help="only the first N images (by name) of each folder; 0: all")] = 0,
    matlab_y: Annotated[bool, typer.Option("--matlab-y", help="round Y to 8 bits before PSNR/SSIM, as MATLAB's rgb2ycbcr does")] = False,
    threads: ThreadsOpt = 0, device: DeviceOpt = "cpu", kernels: KernelsOpt = "auto", quiet: QuietOpt = False, debug: DebugOpt = False,
) -> None:
    """Benchmark protocol: PSNR/SSIM on Y (MATLAB bicubic LR, shave = scale), FAB and BitOPs per dataset."""
    from .evaluate import EvalInputError, evaluate, results_to_json, write_csv

    mode_list = [m.strip() for m in (modes or "fp32,w8a8,dynamic").split(",") if m.strip()]
    bicubic_only = bicubic and model is None and weights is None
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err, transient=True, redirect_stdout=False, redirect_stderr=False,
                        disable=quiet or not err.is_terminal)  # off a terminal rich would leave a blank line
    try:
        net = None if bicubic_only else _load(model, weights, arch, scale, "fp32", device, threads, kernels)
        with progress:
            task = progress.add_task("eval", total=None)
            res = evaluate(data_dirs, scale, net, mode_list, bicubic, tiling,
                           lambda d, t, label: progress.update(task, completed=d, total=t, description=label),
                           model_name=None if net is None else _model_label(model, weights, scale),
                           limit=limit, round_y=matlab_y)
        if json_out is not None:
            text = json.dumps(results_to_json(res), indent=1)
            typer.echo(text) if json_out == "-" else Path(json_out).write_text(text + "\n")
        if csv_out is not None:
            write_csv(res, csv_out)
    except (CadyqError, ValueError, OSError) as e:
        if debug:
            raise
        usage = isinstance(e, (EvalInputError, ValueError)) or "--" in str(e)
        raise _fail(str(e).splitlines()[0] if str(e) else type(e).__name__, 2 if usage else 1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if not quiet:
        t = Table(title=f"x{scale} {res.model} ({tiling} tiling)" if res.model else f"x{scale} bicubic")
        for c in ("dataset", "mode", "images", "PSNR", "SSIM", "FAB", "BitOPs (G)"):
            t.add_column(c, justify="left" if c in ("dataset", "mode") else "right")
        for r in res.results:
            t.add_row(r.dataset, r.mode, str(len(r.images)), f"{r.psnr:.2f}", f"{r.ssim:.4f}",
                      "-" if r.fab is None else f"{r.fab:.2f}", "-" if r.bitops is None else f"{r.bitops / 1e9:.1f}")
        err.print(t)


@app.command()
def train(
    stage: Annotated[str, typer.Argument(help="fp, pams or cadyq")],
    data: Annotated[list[Path], typer.Option("--data", help="HR image folder (repeatable)")],
    run_dir: Annotated[Path, typer.Option("--run", help="run folder; resumes from its last.pt")],
    arch: Annotated[str, typer.Option(help="architecture")] = "edsr_baseline",
    scale: Annotated[int, typer.Option(help="upscaling factor")] = 4,
    init: Annotated[Optional[Path], typer.Option(help="previous stage checkpoint (fp: warm start from matching tensors, e.g. another scale)")] = None,
    teacher: Annotated[Optional[Path], typer.Option(help="teacher checkpoint (default: --init)")] = None,
    minutes: Annotated[float, typer.Option(help="time budget; stops cleanly and saves")] = 60.0,
    steps: Annotated[int, typer.Option(help="schedule length in steps")] = 300_000,
    stop_at: Annotated[Optional[int], typer.Option(help="stop this invocation at this step (the schedule still spans --steps)")] = None,
    batch: Annotated[int, typer.Option(help="batch size")] = 16,
    lr: Annotated[float, typer.Option(help="learning rate")] = 2e-4,
    lr_patch: Annotated[int, typer.Option(help="LR crop size")] = 48,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    bf16: Annotated[str, typer.Option(help="bf16 autocast on CPU: auto (measured at start: on where it is faster), on, off")] = "auto",
    threads: Annotated[int, typer.Option(help="torch threads (0: default)")] = 0,
    device: Annotated[str, typer.Option(help="torch device: cpu, or cuda on an accelerator machine (bf16 auto: on)")] = "cpu",
    val_every: Annotated[int, typer.Option(help="validate (and with --keep-val keep a checkpoint) every N steps")] = 250,
    keep_val: Annotated[bool, typer.Option(help="keep <run>/step<N>.pt at every validation (pick one later with python -m cadyq_cli.train.select)")] = False,
    bit_weight: Annotated[float, typer.Option(help="cadyq: weight of the bit loss (reached after --bit-ramp steps)")] = 0.5,
    bit_ramp: Annotated[int, typer.Option(help="cadyq: steps over which the bit-loss weight rises from 0")] = 100,
    selector_lr: Annotated[float, typer.Option(help="cadyq: learning rate of the bit selectors")] = 1e-3,
    selector_norm: Annotated[bool, typer.Option(help="cadyq: train selectors on standardized features")] = True,
    clip_init: Annotated[str, typer.Option(help="cadyq: 4/6-bit clips: mse (calibrated) or copy (official)")] = "mse",
    act_grid: Annotated[Optional[str], typer.Option(help="pams/cadyq: activation grid: signed (official) or relu-unsigned (ReLU outputs on the unsigned grid); default: --init's")] = None,
    skip: Annotated[Optional[str], typer.Option(help="pams/cadyq: residual skip: official (adds the quantized block input) or fp (EDSR: the unquantized one); default: --init's")] = None,
) -> None:
    """Train one stage (fp → pams → cadyq); resumable, stops at the time budget."""
    from .train.loop import TrainConfig, TrainingStopped, bf16_helps, oversubscribed, train_stage

    if bf16 not in ("auto", "on", "off"):
        raise typer.BadParameter("--bf16 must be auto, on or off")
    on_cpu = device == "cpu"
    if on_cpu and (crowded := oversubscribed(threads)):
        typer.echo(crowded, err=True)
    use_bf16 = bf16 == "on" or (bf16 == "auto" and (not on_cpu or bf16_helps(threads)))
    if bf16 == "auto":
        why = "measured on this CPU" if on_cpu else f"on {device}"
        typer.echo(f"bf16 autocast: {'on' if use_bf16 else 'off'} ({why})", err=True)
    cfg = TrainConfig(
        stage=stage, arch=arch, scale=scale, data=[str(d) for d in data], run_dir=str(run_dir),
        init=str(init) if init else None, teacher=str(teacher) if teacher else None, minutes=minutes,
        steps=steps, stop_at=stop_at, batch=batch, lr=lr, lr_patch=lr_patch, seed=seed, bf16=use_bf16, threads=threads, device=device,
        val_every=val_every, keep_val=keep_val, bit_weight_max=bit_weight, bit_ramp_steps=bit_ramp, selector_lr=selector_lr,
        selector_norm=selector_norm, clip_init=clip_init, act_grid=act_grid, skip=skip,
    )
    try:
        train_stage(cfg, log=lambda s: typer.echo(s, err=True))
    except TrainingStopped as e:  # saved; a script must still see that the stage did not finish
        typer.echo(f"cadyq train: {e}", err=True)
        raise typer.Exit(128 + e.signum) from None
    except SystemExit as e:  # refused settings or data: one line, nothing written
        if isinstance(e.code, str):
            raise _fail(e.code, 2) from None
        raise
    except CadyqError as e:  # e.g. an --init checkpoint that cannot be read
        raise _fail(str(e).splitlines()[0], 1) from None


def main() -> None:
    """Console-script entry point."""
    app()
