"""The ``cadyq`` command line: parse, build configs, call the library, report, exit code.

Exit codes: 0 all good, 1 some inputs failed, 2 usage error, 130 interrupted (143 on SIGTERM).
Stdout carries machine output only (``--json -``); messages, progress and tables go to stderr.
"""
from __future__ import annotations

import json
import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Callable, Optional, TypeVar

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__
from .errors import CadyqError, ImageReadError, ImageWriteError
from .loading import model_label
from .tiling import PAPER_OVERLAP, PAPER_PATCH


class _FlagsCommand(typer.core.TyperCommand):
    """Help shows boolean flags without a ``<bool>`` value."""

    def get_params(self, ctx: typer.Context) -> list:  # noqa: D102
        return _no_bool_metavar(super().get_params(ctx))


class _FlagsGroup(typer.core.TyperGroup):
    """The same for the root options (``--version``, ``--install-completion``, ``--help``)."""

    def get_params(self, ctx: typer.Context) -> list:  # noqa: D102
        return _no_bool_metavar(super().get_params(ctx))


def _no_bool_metavar(params: list) -> list:
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    return params


class _App(typer.Typer):
    """Every command of this app is a :class:`_FlagsCommand`."""

    def command(self, *args, cls: type = _FlagsCommand, **kwargs):  # noqa: ANN002, ANN003, ANN201, D102
        return super().command(*args, cls=cls, **kwargs)


app = _App(
    cls=_FlagsGroup,
    no_args_is_help=True,
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


class FpLayers(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


class EngineKind(str, Enum):
    local = "local"
    ray = "ray"


#: Exit status of an error that stops a command, by type (first match wins): a failed image read
#: or write is a failed input (1); anything else refused before work started is a usage error (2).
#: Batches go on past failed inputs and exit 1 at the end; signals give 128 + the signal (130, 143).
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (ImageReadError, 1),
    (ImageWriteError, 1),
    (OSError, 1),
    (CadyqError, 2),
    (ValueError, 2),
)


def _exit_code(e: BaseException) -> int:
    return next(code for kind, code in EXIT_CODES if isinstance(e, kind))


def _fail(msg: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(msg)}", soft_wrap=True)
    return typer.Exit(code)


_T = TypeVar("_T")


def _comma_list(text: str | None, kind: Callable[[str], _T], refusal: str) -> list[_T]:
    """An option's comma-separated values (empty where it is not given); ``refusal`` (one line, exit 2) where one
    is not a ``kind``."""
    try:
        return [kind(v) for v in text.split(",")] if text else []
    except ValueError:
        raise _fail(refusal) from None


def _fail_on(e: BaseException) -> typer.Exit:
    """:func:`_fail` with the first line of ``e`` and the status :data:`EXIT_CODES` gives it."""
    return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__, _exit_code(e))


ModelOpt = Annotated[Optional[str], typer.Option("--model", help="shipped model (see `cadyq models`); default edsr-baseline")]
WeightsOpt = Annotated[Optional[Path], typer.Option("--weights", help="checkpoint file (ours or official) instead of --model")]
ArchOpt = Annotated[Optional[str], typer.Option("--arch", help="architecture of --weights: edsr, carn, srresnet, idn")]
ScaleOpt = Annotated[int, typer.Option("--scale", help="upscaling factor: 2, 3 or 4")]
ModeOpt = Annotated[Mode, typer.Option("--mode", help="dynamic (CADyQ), fp32, or fixed w8a8/w8a6/w8a4")]
TilingOpt = Annotated[Tiling, typer.Option("--tiling", help="seamless (big tiles, bits per --region) or paper (96/90 patches)")]
TileOpt = Annotated[Optional[int], typer.Option("--tile", help="tile size in input px (seamless default 384, paper 96); "
                                                "quantized seamless modes take only sizes that keep the default plan")]
OverlapOpt = Annotated[int, typer.Option("--overlap", help="paper tiling: overlap in input px")]
RegionOpt = Annotated[int, typer.Option("--region", help="seamless tiling: bits are chosen per REGION x REGION input px")]
ThreadsOpt = Annotated[int, typer.Option("--threads", help="CPU threads (0: torch default)")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress or report on stderr")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="show tracebacks")]
KernelsOpt = Annotated[str, typer.Option("--kernels", help="quantized convs: auto (upscale: OpenVINO for shipped EDSR-baseline "
                                        "and CARN models where it serves, else int8 where exact), int8, float (reference), or "
                                        "openvino (EDSR-baseline or CARN on OpenVINO: upscale and bitmap without PyTorch; eval: "
                                        "fp32 and dynamic modes only)")]
FpLayersOpt = Annotated[FpLayers, typer.Option("--fp-layers", help="full-precision upsampling tail: fp32 (default) or bf16 (faster on CPUs with bf16)")]
BitBiasOpt = Annotated[float, typer.Option("--bit-bias", help="compute dial: > 0 fewer bits, < 0 more, 0 as trained (dynamic mode)")]
MaxPxOpt = Annotated[int, typer.Option("--max-pixels", help="refuse inputs larger than this many pixels (0: no limit)")]
PngLevelOpt = Annotated[Optional[int], typer.Option("--png-level", min=0, max=9, help="zlib level of PNG outputs, 0-9 "
                        "(default 4: 2-3x faster to write than 6 for files 2% larger; 9: smallest)")]


def _png_kw(png_level: int | None) -> dict[str, int]:
    """``--png-level`` as keyword arguments of the batch layer: none when not given (the writer's default,
    io.PNG_LEVEL, which this module does not import at start-up)."""
    return {} if png_level is None else {"png_level": png_level}


def _load(model: str | None, weights: Path | None, arch: str | None, scale: int, mode: str, device: str, threads: int,  # noqa: ANN202
          kernels: str = "auto", fp_layers: str = "fp32", bit_bias: float = 0.0, openvino: bool = False,
          target_fab: float | None = None, quiet: bool = False):
    """:func:`cadyq_cli.loading.load_net`, after warning where ``--fp-layers bf16`` is emulated."""
    from .loading import load_net

    if FpLayers(fp_layers) == FpLayers.bf16 and device.lower() == "cpu" and not quiet:
        from .devices import cpu_has_bf16

        if not cpu_has_bf16():
            err.print("[yellow]warning:[/yellow] this CPU has no native bf16: --fp-layers bf16 is emulated here (no faster "
                      "than fp32; much slower on the PyTorch engine)", soft_wrap=True)
    return load_net(model, weights, arch, scale, mode, device, threads, kernels, FpLayers(fp_layers).value, bit_bias,
                    openvino, target_fab)


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
    if rec.get("target_fab") is not None:
        t.add_row("dial", f"bit bias {rec['bit_bias']:+.3g} fitted to FAB {rec['target_fab']:g} ({rec['probes']} bits-only probes)")
    elif rec.get("bit_bias"):
        t.add_row("dial", f"bit bias {rec['bit_bias']:+.3g}")
    if rec["mode"] != "fp32":
        t.add_row("kernels", {"int8": "int8 (integer convolutions)", "openvino": "openvino (int8 convolutions, no PyTorch)",
                              "openvino-float": "openvino (float convolutions: no int8 dot product on this CPU)"}
                  .get(rec["kernels"], "float (fake-quantized)"))
    if rec.get("fp_layers", "fp32") != "fp32":
        t.add_row("fp layers", f"{rec['fp_layers']} (upsampling tail)")
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


def _progress(quiet: bool) -> Progress:
    """Progress on stderr: files and tiles, with the time spent and an estimate of the time left."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), console=err, transient=True, redirect_stdout=False,
                    redirect_stderr=False, disable=quiet)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"cadyq {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    """Upscale images with content-aware dynamically quantized super-resolution networks (CADyQ)."""


@app.command()
def upscale(
    input: Annotated[str, typer.Argument(help="image file, folder, or - for stdin", metavar="INPUT")],
    output: Annotated[Optional[str], typer.Argument(
        help="output file, folder (existing or ending in /), or - for stdout; default <stem>_x<scale>.png next to the "
        "input (a folder input: <dir>_x<scale>)", metavar="OUTPUT")] = None,
    scale: ScaleOpt = 4, model: ModelOpt = None, weights: WeightsOpt = None, arch: ArchOpt = None,
    mode: ModeOpt = Mode.dynamic, tiling: TilingOpt = Tiling.seamless, tile: TileOpt = None,
    overlap: OverlapOpt = PAPER_OVERLAP, region: RegionOpt = PAPER_PATCH,
    json_out: Annotated[Optional[str], typer.Option("--json", help="write one JSON line per image to PATH, or - for stdout "
                                                    "(stderr when the image goes to stdout)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace existing outputs")] = False,
    skip_existing: Annotated[bool, typer.Option("--skip-existing", help="leave existing outputs alone (resume a batch)")] = False,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="descend into sub-folders")] = False,
    suffix: Annotated[str, typer.Option("--suffix", help="added to output file names (replaces _x<scale> in generated ones)")] = "",
    ext: Annotated[Optional[str], typer.Option("--ext", help="output format: png, jpg, webp, tif, bmp")] = None,
    threads: ThreadsOpt = 0, device: DeviceOpt = "cpu", kernels: KernelsOpt = "auto", fp_layers: FpLayersOpt = FpLayers.fp32,
    bit_bias: BitBiasOpt = 0.0,
    target_fab: Annotated[Optional[float], typer.Option("--target-fab", help="fit the bit bias per image to this FAB (4..8; dynamic mode)")] = None,
    max_pixels: MaxPxOpt = 64_000_000, png_level: PngLevelOpt = None,
    engine: Annotated[EngineKind, typer.Option("--engine", help="local (this process) or ray (a Ray cluster; pip install 'cadyq[ray]')")] = EngineKind.local,
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="ray engine: cluster to join (auto, HOST:PORT); default: start a local one")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="ray engine: model replicas (default: one per CPU, or per --threads CPUs)")] = None,
    quiet: QuietOpt = False, debug: DebugOpt = False,
) -> None:
    """Upscale an image, or every image of a folder, and report bits and BitOPs per region."""
    from .tiling import TilingConfig
    from .paths import check_output, local_path, output_folder, plan_jobs

    if overwrite and skip_existing:
        raise _fail("--overwrite and --skip-existing exclude each other")
    if engine is EngineKind.local and (workers is not None or ray_address is not None):
        raise _fail("--workers and --ray-address go with --engine ray")
    if target_fab is not None and (bit_bias or mode != Mode.dynamic or not 4.0 <= target_fab <= 8.0):
        raise _fail("--target-fab takes a FAB between 4 and 8, in --mode dynamic, without --bit-bias")
    cfg = TilingConfig(tiling=tiling.value, tile=tile, overlap=overlap, region=region)
    png = _png_kw(png_level)
    try:  # everything that can be refused is refused before the model loads
        cfg.validate(quantized=mode != Mode.fp32)
        input, output = local_path(input), None if output is None else local_path(output)  # file:// URIs
        jobs = plan_jobs(input, output, recursive, suffix, ext, scale)
        if not jobs:
            raise CadyqError(f"{input}: no images found" + ("" if recursive else " (use --recursive for sub-folders)"))
        if len(jobs) == 1 and not skip_existing and not Path(input).is_dir():
            check_output(jobs[0], overwrite)
        if engine is EngineKind.ray:
            from .batch_ray import RayOptions, require_ray, run_ray

            require_ray()  # before anything is created: without Ray, one line and nothing written
        net = _load(model, weights, arch, scale, mode.value, device, threads, kernels, fp_layers, bit_bias,
                    openvino=True, quiet=quiet, target_fab=target_fab)
        if engine is EngineKind.local:
            _keep_until_exit(net)
        if not jobs[0].stdin and Path(input).is_dir():
            out_dir = output_folder(input, output, scale)
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise CadyqError(f"cannot create the output folder {out_dir}: {(e.strerror or str(e)).lower()}") from None
        to_stdout = jobs[0].stdout_ext is not None  # the image owns stdout: JSON goes to stderr
        try:
            sink = (sys.stderr if to_stdout else sys.stdout) if json_out == "-" else (open(json_out, "a") if json_out else None)
        except OSError as e:
            raise CadyqError(f"--json {json_out}: cannot open ({(e.strerror or str(e)).lower()})") from None
        if engine is EngineKind.ray:  # the model loaded above checked the options; each worker loads its own, on
            # the engine the local run would use (the same bytes)
            from .runtime.engine import OVModel

            outcomes = run_ray(jobs, RayOptions(
                load=dict(model=model, weights=weights, arch=arch, scale=scale, mode=mode.value, device=device, kernels=kernels,
                          fp_layers=fp_layers.value), bit_bias=bit_bias, target_fab=target_fab,
                openvino=isinstance(net, OVModel),
                cfg=cfg, address=ray_address, workers=workers, threads=threads, overwrite=overwrite,
                skip_existing=skip_existing, max_pixels=max_pixels or None, **png))
    except (CadyqError, ValueError, OSError) as e:
        if debug:
            raise
        raise _fail_on(e) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    from .batch import Interrupted, stop_on_signals, upscale_jobs
    from .report import failure_record, json_record

    label = model_label(model, weights, scale)
    failures: list[tuple[Path, str]] = []
    done = skipped = 0
    code = 0
    progress = _progress(quiet)
    files_task = progress.add_task("files", total=len(jobs), visible=len(jobs) > 1)
    tiles_task = progress.add_task("tiles", total=1, visible=engine is EngineKind.local)
    if engine is EngineKind.local:
        outcomes = upscale_jobs(
            net, jobs, cfg, overwrite=overwrite, skip_existing=skip_existing, max_pixels=max_pixels or None,
            target_fab=target_fab, raise_errors=debug, **png,
            on_start=lambda job: progress.update(tiles_task, completed=0, description=job.src.name),
            tile_progress=lambda d, t: progress.update(tiles_task, completed=d, total=t),
        )
    t0 = time.perf_counter()
    try:
        with stop_on_signals(), progress:
            for out in outcomes:
                job, rep, warns = out.job, out.report, out.warnings
                rate = (done + len(failures) + (not out.skipped)) / max(time.perf_counter() - t0, 1e-9)
                progress.update(files_task, advance=1, description=f"files {rate:.2f}/s")
                if out.skipped:
                    skipped += 1
                    continue
                if out.error is not None:
                    failures.append((job.src, out.error))
                    if sink is not None:
                        sink.write(json.dumps(failure_record(str(job.src), str(job.dst), label, out.error)) + "\n")
                        sink.flush()
                    if not quiet:
                        progress.console.print(f"[red]failed:[/red] {escape(out.error)}", soft_wrap=True)
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
    except Interrupted as e:
        code = e.code
    except KeyboardInterrupt:
        code = 130
    finally:
        outcomes.close()  # the ray engine stops its workers and removes what killed ones left
        if sink is not None and sink not in (sys.stdout, sys.stderr):
            sink.close()
    if not quiet:
        secs = time.perf_counter() - t0
        summary = f"{done} upscaled, {skipped} skipped, {len(failures)} failed in {secs:.1f} s ({done / max(secs, 1e-9):.2f} images/s)"
        if code:
            summary += " — interrupted"
        err.print(summary)
    for _, msg in failures:  # failures are listed even with --quiet
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
    overlap: OverlapOpt = PAPER_OVERLAP, region: RegionOpt = PAPER_PATCH,
    layer: Annotated[Optional[int], typer.Option("--layer", help="show selector K instead of the mean over layers")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing file")] = False,
    threads: ThreadsOpt = 0, device: DeviceOpt = "cpu", kernels: KernelsOpt = "auto", fp_layers: FpLayersOpt = FpLayers.fp32,
    bit_bias: BitBiasOpt = 0.0, max_pixels: MaxPxOpt = 64_000_000, png_level: PngLevelOpt = None,
    quiet: QuietOpt = False, debug: DebugOpt = False,
) -> None:
    """Save the bit-allocation heatmap of an image: mean selected bits per region."""
    from .batch import Interrupted, bitmap_jobs, stop_on_signals
    from .tiling import TilingConfig
    from .paths import Job, check_extension, check_output

    try:
        if mode == Mode.fp32:
            raise CadyqError("--mode fp32 selects no bits; use dynamic or w8aK")
        cfg = TilingConfig(tiling=tiling.value, tile=tile, overlap=overlap, region=region)
        cfg.validate(quantized=True)
        job = Job(input, check_extension(output))
        check_output(job, overwrite)
        net = _load(model, weights, arch, scale, mode.value, device, threads, kernels, fp_layers, bit_bias, openvino=True,
                    quiet=quiet)
        _keep_until_exit(net)
        if layer is not None and not 0 <= layer < net.n_selectors:
            raise CadyqError(f"--layer must be between 0 and {net.n_selectors - 1} for {net.arch}")
        with stop_on_signals():
            out = next(bitmap_jobs(net, [job], cfg, layer=layer, overwrite=overwrite, max_pixels=max_pixels or None,
                                   raise_errors=True, **_png_kw(png_level)))
    except (CadyqError, ValueError, OSError) as e:
        if debug:
            raise
        raise _fail_on(e) from None
    except Interrupted as e:
        raise typer.Exit(e.code) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    rep = out.report
    if not quiet:
        for w in out.warnings:
            err.print(f"[yellow]warning:[/yellow] {escape(f'{input}: {w}')}", soft_wrap=True)
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
    t = Table(title="shipped models (Set5 PSNR in dB)", box=box.SIMPLE_HEAD, pad_edge=False)
    for c in ("name", "arch", "scale", "params", "fp32", "dynamic", "FAB"):
        t.add_column(c, justify="right" if c not in ("name", "arch") else "left", no_wrap=True)  # never cut with "…"
    for e in entries:
        s5 = e.metrics.get("Set5", {})
        fp, dy = s5.get("fp32", {}), s5.get("dynamic", {})
        t.add_row(e.name, e.arch, f"x{e.scale}", f"{e.params / 1e6:.2f}M",
                  f"{fp.get('psnr', float('nan')):.2f}", f"{dy.get('psnr', float('nan')):.2f}", f"{dy.get('fab', float('nan')):.2f}")
    Console(soft_wrap=True).print(t)


@app.command("eval")
def eval_cmd(
    data_dirs: Annotated[list[Path], typer.Argument(help="dataset folders of HR images (e.g. Set5 B100)")],
    scale: ScaleOpt = 4, model: ModelOpt = None, weights: WeightsOpt = None, arch: ArchOpt = None,
    modes: Annotated[Optional[str], typer.Option("--modes", help="comma list of fp32,w8a8,w8a6,w8a4,dynamic (default fp32,w8a8,dynamic; --kernels openvino: fp32,dynamic)")] = None,
    bicubic: Annotated[bool, typer.Option("--bicubic", help="also score MATLAB bicubic (alone when neither a model nor --modes is given)")] = False,
    tiling: Annotated[str, typer.Option("--tiling", help="paper (official 96/90 patches), seamless or whole")] = "paper",
    json_out: Annotated[Optional[str], typer.Option("--json", help="write the results as JSON to PATH, or - for stdout")] = None,
    csv_out: Annotated[Optional[Path], typer.Option("--csv", help="write one row per image and mode to PATH")] = None,
    limit: Annotated[int, typer.Option("--limit", help="only the first N images (by name) of each folder; 0: all")] = 0,
    matlab_y: Annotated[bool, typer.Option("--matlab-y", help="round Y to 8 bits before PSNR/SSIM, as MATLAB's rgb2ycbcr does")] = False,
    threads: ThreadsOpt = 0, device: DeviceOpt = "cpu", kernels: KernelsOpt = "auto", fp_layers: FpLayersOpt = FpLayers.fp32,
    bit_bias: BitBiasOpt = 0.0,
    curve: Annotated[Optional[Path], typer.Option("--curve", help="draw PSNR vs FAB and BitOPs over --biases to this PNG")] = None,
    curve_csv: Annotated[Optional[Path], typer.Option("--curve-csv", help="write the trade-off curve's points as CSV")] = None,
    biases: Annotated[Optional[str], typer.Option("--biases", help="comma list of bit biases for the curve (default -16,-4,-1,0,1,4,16)")] = None,
    quiet: QuietOpt = False, debug: DebugOpt = False,
) -> None:
    """Benchmark protocol: PSNR/SSIM on Y (MATLAB bicubic LR, shave = scale), FAB and BitOPs per dataset."""
    from .curve import DEFAULT_BIASES, curve_modes, curve_rows, plot_curve, require_matplotlib, write_curve_csv
    from .evaluate import evaluate, results_to_json, write_csv

    default_modes = "fp32,dynamic" if kernels == "openvino" else "fp32,w8a8,dynamic"  # the runtime's modes
    mode_list = [m.strip() for m in (modes or default_modes).split(",") if m.strip()]
    curve_on = curve is not None or curve_csv is not None
    if curve_on:
        bias_list = tuple(_comma_list(biases, float, f"--biases {biases}: give numbers separated by commas")) or DEFAULT_BIASES
        mode_list = list(dict.fromkeys(curve_modes(bias_list) + (mode_list if modes else [])))
    # --modes or --curve: the default model
    bicubic_only = bicubic and model is None and weights is None and modes is None and not curve_on
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err, transient=True, redirect_stdout=False, redirect_stderr=False,
                        disable=quiet or not err.is_terminal)  # off a terminal rich would leave a blank line
    try:
        if curve is not None:
            require_matplotlib()  # before a long evaluation, not after it
        runtime = None
        if kernels == "openvino" and not bicubic_only:
            from .loading import openvino_eval_models

            runtime = openvino_eval_models(model, weights, arch, scale, mode_list, device, threads,
                                           FpLayers(fp_layers).value, bit_bias, curve_on)
            kernels = "float"  # the PyTorch model only names the result and digests the weights
        net = None if bicubic_only else _load(model, weights, arch, scale, "fp32", device, threads, kernels, fp_layers, bit_bias)
        with progress:
            task = progress.add_task("eval", total=None)
            res = evaluate(data_dirs, scale, net, mode_list, bicubic, tiling,
                           lambda d, t, label: progress.update(task, completed=d, total=t, description=label),
                           model_name=None if net is None else model_label(model, weights, scale),
                           limit=limit, round_y=matlab_y, runtime=runtime)
        if json_out is not None:
            text = json.dumps(results_to_json(res), indent=1)
            typer.echo(text) if json_out == "-" else Path(json_out).write_text(text + "\n")
        if csv_out is not None:
            write_csv(res, csv_out)
        if curve is not None or curve_csv is not None:
            rows = curve_rows(res)
            if curve_csv is not None:
                write_curve_csv(rows, curve_csv)
            if curve is not None:
                plot_curve(rows, curve, f"{res.model} x{scale}: PSNR against cost as the bit bias turns ({tiling} tiling)")
    except (CadyqError, ValueError, OSError) as e:
        if debug:
            raise
        raise _fail_on(e) from None
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
    ctx: typer.Context,
    stage: Annotated[Optional[str], typer.Argument(help="fp, pams or cadyq (or --recipe)")] = None,
    data: Annotated[Optional[list[Path]], typer.Option("--data", help="HR image folder (repeatable; with --recipe: replaces the recipe's)")] = None,
    run_dir: Annotated[Optional[Path], typer.Option("--run", "--run-dir", help="run folder; resumes from its last.pt (--recipe: default runs/<name>)")] = None,
    recipe: Annotated[Optional[str], typer.Option("--recipe", help="run a recipe end to end: fp → pams → cadyq → pick → eval → export (a .toml file or a shipped recipe's name)")] = None,
    arch: Annotated[str, typer.Option(help="architecture")] = "edsr_baseline",
    scale: Annotated[int, typer.Option(help="upscaling factor")] = 4,
    scales: Annotated[Optional[str], typer.Option("--scales", metavar="2,3,4", help="multi-scale model (carn): train these scales' upsamplers too, a batch each in turn, each validated; --scale is one of them")] = None,
    init: Annotated[Optional[Path], typer.Option(help="previous stage checkpoint, or a .safetensors backbone/model (fp: warm start from matching tensors, e.g. another scale)")] = None,
    teacher: Annotated[Optional[Path], typer.Option(help="teacher checkpoint (default: --init)")] = None,
    minutes: Annotated[float, typer.Option(help="time budget; stops cleanly and saves")] = 60.0,
    steps: Annotated[int, typer.Option(help="schedule length in steps")] = 300_000,
    stop_at: Annotated[Optional[int], typer.Option(help="stop this invocation at this step (the schedule still spans --steps)")] = None,
    batch: Annotated[int, typer.Option(help="batch size")] = 16,
    lr: Annotated[float, typer.Option(help="learning rate")] = 2e-4,
    lr_patch: Annotated[int, typer.Option(help="LR crop size")] = 48,
    scale_aug: Annotated[Optional[str], typer.Option("--scale-aug", metavar="0.9,0.8", help="also train on each training image downscaled by these factors (VDSR's scale augmentation: more content from a small set); validation unchanged")] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    bf16: Annotated[str, typer.Option(help="bf16 autocast on CPU: auto (measured at start: on where it is faster), on, off")] = "auto",
    threads: Annotated[int, typer.Option(help="torch threads (0: default)")] = 0,
    device: Annotated[str, typer.Option(help="torch device: cpu, or cuda[:N] on an accelerator machine (bf16 auto: on)")] = "cpu",
    val_every: Annotated[int, typer.Option(help="validate (and with --keep-val keep a checkpoint) every N steps")] = 250,
    keep_val: Annotated[bool, typer.Option(help="keep <run>/step<N>.pt at every validation (pick one later with python -m cadyq_cli.train.select)")] = False,
    ema: Annotated[float, typer.Option("--ema", metavar="DECAY", help="keep an exponential moving average of the weights (e.g. 0.999; 0: off): validated, saved as the checkpoint's model, exported")] = 0.0,
    wip: Annotated[Optional[Path], typer.Option("--wip", metavar="FILE", help="also keep the run as one small file (weights, step; no optimizer) at every save; with no RUN/last.pt, continue from it")] = None,
    wip_lean: Annotated[bool, typer.Option("--wip-lean", help="keep the --wip file small: float16 (half the size), and with --ema the average only (a quarter; training goes on from it)")] = False,
    bit_weight: Annotated[float, typer.Option(help="cadyq: weight of the bit loss (reached after --bit-ramp steps)")] = 0.5,
    bit_ramp: Annotated[int, typer.Option(help="cadyq: steps over which the bit-loss weight rises from 0")] = 100,
    bit_target: Annotated[Optional[float], typer.Option("--bit-target", metavar="FAB", help="cadyq: a FAB budget: the bit loss counts only expected bits above it (default: every bit counts)")] = None,
    selector_lr: Annotated[float, typer.Option(help="cadyq: learning rate of the bit selectors")] = 1e-3,
    selector_norm: Annotated[bool, typer.Option(help="cadyq: train selectors on standardized features")] = True,
    clip_init: Annotated[str, typer.Option(help="cadyq: 4/6-bit clips: mse (calibrated) or copy (official)")] = "mse",
    act_grid: Annotated[Optional[str], typer.Option(help="pams/cadyq: activation grid: signed (official) or relu-unsigned (ReLU outputs on the unsigned grid); default: --init's")] = None,
    skip: Annotated[Optional[str], typer.Option(help="pams/cadyq: residual skip: official (adds the quantized block input) or fp (EDSR: the unquantized one); default: --init's")] = None,
    act_shift: Annotated[Optional[bool], typer.Option("--act-shift/--no-act-shift", help="pams/cadyq: learn a per-channel shift of each selector's input before it is quantized (QuantSR's redistribution); default: --init's")] = None,
    shift_lr: Annotated[float, typer.Option(help="pams/cadyq: learning rate of the input shifts (--act-shift), in units of each selector's 4-bit step")] = 0.05,
) -> None:
    """Train one stage (fp → pams → cadyq), or a whole --recipe; resumable, stops at the time budget."""
    from .devices import parse_device
    from .train.config import TrainConfig
    from .train.host import bf16_helps, oversubscribed
    from .train.loop import train_stage
    from .train.signals import TrainingStopped

    if bf16 not in ("auto", "on", "off"):
        raise typer.BadParameter("--bf16 must be auto, on or off")
    try:
        device = parse_device(device)
    except CadyqError as e:
        raise _fail(str(e)) from None
    if recipe is not None:
        # the recipe says every stage's settings: a stage option given with it would be ignored
        ignored = [f"--{n.replace('_', '-')}" for n in ctx.params
                   if n not in _RECIPE_OPTIONS and getattr(ctx.get_parameter_source(n), "name", "") == "COMMANDLINE"]
        if ignored:
            raise _fail(f"--recipe sets every stage's settings; leave out {', '.join(ignored)} (or edit the recipe)")
        return _train_recipe(recipe, stage, data, run_dir, minutes, bf16, threads, device)
    if stage is None or not data or run_dir is None:
        raise _fail("cadyq train needs a STAGE with --data and --run, or --recipe FILE")
    scale_list = _comma_list(scales, int, f"--scales takes scales separated by commas (e.g. 2,3,4), not {scales!r}")
    aug_list = _comma_list(scale_aug, float, f"--scale-aug takes factors separated by commas (e.g. 0.9,0.8,0.7,0.6), "
                                             f"not {scale_aug!r}")
    on_cpu = device == "cpu"
    if on_cpu and (crowded := oversubscribed(threads)):
        typer.echo(crowded, err=True)
    use_bf16 = bf16 == "on" or (bf16 == "auto" and (not on_cpu or bf16_helps(threads)))
    if bf16 == "auto":
        why = "measured on this CPU" if on_cpu else f"on {device}"
        typer.echo(f"bf16 autocast: {'on' if use_bf16 else 'off'} ({why})", err=True)
    cfg = TrainConfig(
        stage=stage, arch=arch, scale=scale, scales=scale_list, data=[str(d) for d in data], run_dir=str(run_dir),
        init=str(init) if init else None, teacher=str(teacher) if teacher else None, minutes=minutes,
        steps=steps, stop_at=stop_at, batch=batch, lr=lr, lr_patch=lr_patch, scale_aug=aug_list, seed=seed, bf16=use_bf16, threads=threads, device=device,
        val_every=val_every, keep_val=keep_val, bit_weight_max=bit_weight, bit_ramp_steps=bit_ramp, bit_target=bit_target,
        selector_lr=selector_lr,
        selector_norm=selector_norm, clip_init=clip_init, act_grid=act_grid, skip=skip, act_shift=act_shift,
        shift_lr=shift_lr, ema=ema,
        wip=str(wip) if wip else None,
        wip_lean=wip_lean,
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


#: ``cadyq train`` options that go with ``--recipe`` (the recipe sets every other one).
_RECIPE_OPTIONS = {"stage", "data", "run_dir", "recipe", "minutes", "bf16", "threads", "device"}


def _train_recipe(spec: str, stage: Optional[str], data: Optional[list[Path]], run_dir: Optional[Path], minutes: float,
                  bf16: str, threads: int, device: str) -> None:
    """``cadyq train --recipe``: every stage of a recipe file, then pick, eval and export (train/recipe.py)."""
    from .train.recipe import load_recipe, run_recipe
    from .train.signals import TrainingStopped

    if stage is not None:
        raise _fail(f"give a stage or --recipe, not both (the recipe says every stage; got {stage!r})")
    try:
        rec = load_recipe(spec)
        run_recipe(rec, run_dir or Path("runs") / rec.name, minutes, [str(d) for d in data or []], bf16, threads, device,
                   log=lambda s: typer.echo(s, err=True))
    except TrainingStopped as e:
        typer.echo(f"cadyq train: {e}", err=True)
        raise typer.Exit(128 + e.signum) from None
    except SystemExit as e:
        if isinstance(e.code, str):
            raise _fail(e.code, 2) from None
        raise
    except CadyqError as e:
        raise _fail(str(e).splitlines()[0], 1) from None


#: set by :func:`entry` (the ``cadyq`` program, :mod:`cadyq_cli.program`): the process may end without
#: tearing down the model of the command that ran, kept here until then
_FAST_EXIT = False
_KEPT: list[object] = []


def _keep_until_exit(model: object) -> None:
    """Under :func:`entry`, keep ``model`` alive until the process ends and let it end at once: freeing a
    compiled model and its working memory took 0.1 s, 5-11 % of a one-image ``cadyq upscale`` (bench/peers.py
    compare), and the operating system reclaims it all at exit anyway. Local engine only (Ray's shutdown runs
    at exit). In-process uses of :data:`app` keep nothing."""
    if _FAST_EXIT:
        _KEPT.append(model)


def main() -> None:
    """Run the command line in this process (it raises ``SystemExit`` with the exit code, as any Typer app)."""
    app()


def entry() -> None:
    """The ``cadyq`` program (:func:`cadyq_cli.program.entry`): :func:`main`, then, after ``upscale``
    or ``bitmap`` on the local engine (whose outputs are written and closed by then), stdout and stderr are
    flushed and the process ends with the command's exit code without the interpreter's teardown
    (``os._exit``: no atexit handlers, nothing freed one object at a time)."""
    global _FAST_EXIT
    _FAST_EXIT = True
    try:
        main()
    except SystemExit as e:
        if not _KEPT or not (e.code is None or isinstance(e.code, int)):
            raise
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - e.g. a closed pipe: the usual exit reports it
            raise e from None
        os._exit(e.code or 0)
