"""Shared fixtures: a tiny random-weight x2 checkpoint, image factories, one torch thread.

The checkpoint is a full EDSR-baseline x2 (32 bit selectors) with random selector heads and
clip values of 30, so that the dynamic mode really picks 4, 6 and 8 bits. Images are small
(tens of pixels) so that every test stays cheap on a loaded CPU.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner, Result

from cadyq_cli.checkpoint import save_weights
from cadyq_cli.cli import app
from cadyq_cli.models import create_model
from cadyq_cli.models._base import SRModel
from cadyq_cli.quant.modules import ActQuantizer, set_quant_mode


def _randomize(model: SRModel, seed: int = 0) -> SRModel:
    """Random selector heads and 'calibrated' clip values, so bits vary with the content."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for sel in model.selectors:
            torch.nn.init.normal_(sel.net_small[0].weight, std=0.05)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, ActQuantizer):
                    m.alpha.fill_(30.0)
                    m.max_val.fill_(30.0)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.eval()


#: Modules whose module-scoped fixtures are costly (a training run, a fuzz batch, a subprocess of checks): under
#: pytest-xdist each runs on one worker, so the fixture is built once. Tests that share the session Ray cluster
#: (``ray_cluster``) go with test_fuzz.py to the "ray" group: one cluster.
_ONE_WORKER = {"test_openvino": "openvino", "test_fuzz": "ray", "test_train": "train", "test_recipe": "recipe",
               "test_eval": "eval", "test_official_reference": "official_reference"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``-n 2 --dist loadgroup``, the README's command: 2 cores kept busy, where one process
    left one mostly idle) keep on one worker the tests that share something costly (:data:`_ONE_WORKER`, the Ray
    cluster); the rest spread over the workers."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        module = getattr(getattr(item, "module", None), "__name__", "").rsplit(".", 1)[-1]
        group = _ONE_WORKER.get(module) or ("ray" if "ray_cluster" in getattr(item, "fixturenames", ()) else None)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session", autouse=True)
def own_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Compiled graphs and other cache files go to this test run's own folder (each xdist worker its own), never
    the user's ``~/.cache/cadyq``; subprocesses inherit it. A test that needs another sets its own."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("CADYQ_CACHE_DIR", str(tmp_path_factory.mktemp("cadyq-cache")))
        yield


@pytest.fixture(scope="session", autouse=True)
def one_thread() -> Iterator[None]:
    """Run torch single-threaded: tiny convolutions are faster so, and CI has 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def weights_x2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a random-weight EDSR-baseline x2 checkpoint (safetensors, ours)."""
    torch.manual_seed(0)
    model = _randomize(create_model("edsr", 2))  # type: ignore[arg-type]
    path = tmp_path_factory.mktemp("weights") / "edsr_x2.safetensors"
    save_weights(model, path)
    return path


@pytest.fixture(scope="session")
def load_x2(weights_x2: Path) -> Callable[[str], SRModel]:
    """``load_x2(mode)``: the checkpoint of :func:`weights_x2` loaded as the CLI loads it."""
    from cadyq_cli.weights import load_model

    cache: dict[str, SRModel] = {}

    def load(mode: str = "dynamic") -> SRModel:
        if mode not in cache:
            cache[mode] = load_model(weights=weights_x2, scale=2, mode=mode)
        return cache[mode]

    return load


@pytest.fixture(scope="session")
def small_model() -> Callable[[str], SRModel]:
    """``small_model(mode)``: a 2-block EDSR x2 (random weights) with a tight receptive radius.

    With only 2 residual blocks the receptive radius is 1 + 4 + 1 + 1 + 1 = 8 LR px, so the
    seamless tiling really cuts images of a few tens of pixels into many tiles.
    """
    torch.manual_seed(1)
    model = _randomize(create_model("edsr", 2, n_resblocks=2, n_feats=16), seed=1)  # type: ignore[arg-type]
    model.receptive_radius = 9  # type: ignore[misc]

    def get(mode: str = "fp32") -> SRModel:
        set_quant_mode(model, mode)
        return model

    return get


def image_array(w: int, h: int, channels: int = 3, seed: int = 0, dtype: type = np.uint8) -> np.ndarray:
    """A smooth pattern plus noise, (h, w, channels) (or (h, w) for one channel)."""
    rng = np.random.default_rng(seed)
    top = 255 if dtype == np.uint8 else 65535
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    base = [np.sin(x / 3.0 + c) * np.cos(y / 4.0 - c) for c in range(channels)]
    arr = (np.stack(base, axis=2) * 0.35 + 0.5 + rng.normal(0, 0.08, (h, w, channels))) * top
    arr = np.clip(np.rint(arr), 0, top).astype(dtype)
    return arr[:, :, 0] if channels == 1 else arr


@pytest.fixture(scope="session")
def pattern() -> Callable[..., np.ndarray]:
    """The :func:`image_array` factory, as a fixture."""
    return image_array


@pytest.fixture()
def make_image(tmp_path: Path) -> Callable[..., Path]:
    """``make_image(name, w=24, h=18, mode="RGB", seed=0, folder=tmp_path, **save_kw)`` -> path.

    Modes: RGB, RGBA, L, LA, P (palette), CMYK; the format follows the extension.
    """

    def make(name: str, w: int = 24, h: int = 18, mode: str = "RGB", seed: int = 0,
             folder: Path | None = None, **save_kw: object) -> Path:
        path = (folder or tmp_path) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2, "P": 3, "CMYK": 4}[mode]
        arr = image_array(w, h, channels, seed)
        if mode == "P":
            im = Image.fromarray(arr, "RGB").quantize(16)
        else:
            im = Image.fromarray(arr, mode)
        im.save(path, **save_kw)
        return path

    return make


# --------------------------------------------------------------------------- the CLI, driven in-process


@pytest.fixture()
def cli(weights_x2: Path) -> Callable[..., Result]:
    """``cli(*args, model=True)``: run the app; ``model`` appends the x2 checkpoint options."""
    runner = CliRunner()

    def run(*args: object, model: bool = True) -> Result:
        argv = [str(a) for a in args]
        if model:
            argv += ["--weights", str(weights_x2), "--scale", "2", "--threads", "1"]
        return runner.invoke(app, argv)

    return run


def _open(path: Path) -> Image.Image:
    """Open and fully decode an image (raises on a truncated file)."""
    with Image.open(path) as im:
        im.load()
    return im


def _ok(res: Result) -> None:
    assert res.exit_code == 0, f"exit {res.exit_code}\nstdout: {res.stdout}\nstderr: {res.stderr}\n{res.exception!r}"


def _error_line(res: Result, *needles: str) -> str:
    """The stderr line holding every needle; asserts there is one and no traceback."""
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [ln for ln in res.stderr.splitlines() if all(n in ln for n in needles)]
    assert lines, f"no stderr line with {needles}: {res.stderr!r}"
    return lines[0]


def _tmp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """One local Ray cluster (2 CPUs, no dashboard) shared by every Ray test; yields its address.

    Skips when Ray is not installed (it is the optional ``ray`` extra).
    """
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    pytest.importorskip("ray.data", reason="the ray extra is not installed")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


def _lose_a_signal(sig: int) -> None:
    """Send ``sig`` to this process and drop whatever its handler raises, as the interpreter does with an
    exception raised inside a weakref callback or ``__del__`` (seen on CI: logging's ``_removeHandlerRef``)."""
    import os
    import signal

    try:
        os.kill(os.getpid(), sig)
        signal.sigtimedwait([], 0.1) if hasattr(signal, "sigtimedwait") else None
    except BaseException:  # noqa: BLE001 - the point
        pass
