"""Training recipes as data: ``cadyq train --recipe FILE`` runs one TOML file end to end.

A recipe (``recipes/<model>.toml``, one per shipped model) holds every setting of every stage as
the model was trained, and the runner goes through them: fp → pams → cadyq → pick on validation →
eval → export. Each ``[[stages]]`` entry is one invocation of :func:`~cadyq_cli.train.loop.train_stage`
on a run folder ``<run-dir>/<run>``; a later entry naming the same run resumes it with other settings
(a longer schedule, a stronger bit loss: logged as a ``config_change``), and ``continue = "RUN"`` starts
a run as a copy of another one (the lineage's continuation). Keys::

    name, arch, scale       the model the recipe exports (manifest name), its architecture and scale
    data_root, data         training folders (data_root/<name>; ``--data`` replaces them)
    start                   "backbone" (default where a stage names one) or "scratch"
    notes                   recorded in the exported manifest entry
    [defaults]              settings shared by every stage (any TrainConfig field)
    [[stages]]              run, stage (fp/pams/cadyq), init (an earlier run), continue, backbone,
                            and TrainConfig fields: steps, stop_at, batch, lr, bit_weight_max, ...
    [pick]                  runs (the lineage's runs), max_gap, max_fab: select's rule
    [eval]                  root, sets ([{name, limit}]), modes, bicubic, tiling
    [export]                name (default: name), storage ("float32" default, or "float16": half the file)

``backbone = "NAME"`` on an fp stage says that its result is the shipped backbone NAME
(``weights/backbones/``; a path to a .safetensors file also works): starting from the backbone
skips that stage and every one before it. The runner's state is ``<run-dir>/recipe.json``: rerunning
the same command continues where the time budget (``--minutes``) stopped it; a run folder started
from another (or an edited) recipe is refused. Exports go to ``<run-dir>/export/`` (never over the
shipped weights), with a note whether the sha256 equals the shipped model's.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from ..errors import CadyqError
from ..models import get_arch
from .config import STAGES, TrainConfig, check_config

__all__ = ["Recipe", "Segment", "load_recipe", "resolve_recipe", "recipes_dir", "run_recipe", "RecipeResult"]

#: TrainConfig fields a stage may not set: where and how long this invocation runs (the runner's and the CLI's)
_RUNTIME = {"run_dir", "data", "init", "teacher", "minutes", "threads", "device", "data_id", "wip", "wip_lean"}
_STAGE_KEYS = ({f.name for f in dataclasses.fields(TrainConfig)} - _RUNTIME) | {"run", "init", "continue", "backbone"}
_TOP_KEYS = {"name", "arch", "scale", "data_root", "data", "start", "notes", "defaults", "stages", "pick", "eval", "export"}
_PICK_KEYS = {"runs", "max_gap", "max_fab"}
_EVAL_KEYS = {"root", "sets", "modes", "bicubic", "tiling"}


@dataclass
class Segment:
    """One ``[[stages]]`` entry: a train_stage call on run ``run``."""

    run: str
    settings: dict  # TrainConfig fields
    init: str | None = None  # an earlier run (its last.pt, or the backbone file when it was skipped)
    cont: str | None = None  # start this run as a copy of that run
    backbone: str | None = None  # this run's result is that shipped backbone

    @property
    def target(self) -> int:
        """The step this segment trains to."""
        return int(self.settings.get("stop_at") or self.settings["steps"])


@dataclass
class Recipe:
    """A parsed, checked recipe."""

    path: Path
    sha256: str
    name: str
    arch: str
    scale: int
    data: list[str]
    segments: list[Segment]
    pick: dict
    eval: dict = field(default_factory=dict)
    export_name: str = ""
    start: str = "scratch"
    notes: str = ""
    scales: list[int] = field(default_factory=list)  # a multi-scale model's scales (its picked runs'), else empty
    storage: str = "float32"  # how the exported file stores the weights (the evaluation runs on that file)

    @property
    def backbone(self) -> str | None:
        """The backbone the lineage starts from (the last one a stage names)."""
        names = [s.backbone for s in self.segments if s.backbone]
        return names[-1] if names else None


def recipes_dir() -> Path:
    """Folder of the shipped recipes: the installed copy, or the source tree's ``recipes/``."""
    try:
        import cadyq_recipes  # installed by `pip install .` from recipes/

        return Path(cadyq_recipes.__file__).parent
    except ImportError:
        return Path(__file__).resolve().parents[2] / "recipes"


def resolve_recipe(spec: str | Path) -> Path:
    """A recipe file: ``spec`` itself, or the shipped recipe of that name (``edsr-baseline-x4``)."""
    p = Path(spec)
    if p.is_file():
        return p
    shipped = recipes_dir() / f"{spec}.toml"
    if shipped.is_file():
        return shipped
    known = sorted(q.stem for q in recipes_dir().glob("*.toml"))
    raise SystemExit(f"recipe {spec}: no such file or shipped recipe (shipped: {', '.join(known) or 'none'})")


def _check_type(where: str, key: str, value: object) -> None:
    """Refuse a TrainConfig setting whose value has the wrong type (its range: :func:`check_config`, once the
    stage's settings are merged)."""
    f = {f.name: f for f in dataclasses.fields(TrainConfig)}[key]
    default = f.default if f.default is not dataclasses.MISSING else None
    want: tuple = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(type(default), ())
    if key == "bf16":
        want = (bool, str)
    elif key == "stop_at":
        want = (int,)
    elif key in ("act_grid", "skip"):
        want = (str,)
    elif key == "act_shift":
        want = (bool,)
    elif key == "bit_target":
        want = (int, float)
    if want and (not isinstance(value, want) or (bool not in want and isinstance(value, bool))):
        raise SystemExit(f"{where}: {key} = {value!r} must be {' or '.join(t.__name__ for t in want)}")
    if key == "bf16" and isinstance(value, str) and value not in ("auto", "on", "off"):
        raise SystemExit(f"{where}: bf16 = {value!r} must be true, false, \"auto\", \"on\" or \"off\"")
    if key == "scales" and not (isinstance(value, list) and all(type(v) is int for v in value)):
        raise SystemExit(f"{where}: scales = {value!r} must be a list of scales, e.g. [2, 3, 4]")
    if key == "scale_aug" and not (isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                                   for v in value)):
        raise SystemExit(f"{where}: scale_aug = {value!r} must be a list of factors in (0, 1), e.g. [0.9, 0.8]")


def _unknown(where: str, table: dict, allowed: set) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise SystemExit(f"{where}: unknown key {extra[0]!r} (known: {', '.join(sorted(allowed))})")


def load_recipe(path: str | Path) -> Recipe:
    """Parse and check a recipe file; anything wrong is refused in one line (SystemExit with a message)."""
    path = resolve_recipe(path)
    raw = path.read_bytes()
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"recipe {path}: not valid TOML ({str(e).splitlines()[0]})") from None
    where = f"recipe {path}"
    _unknown(where, doc, _TOP_KEYS)
    for key in ("name", "scale", "data", "stages", "pick"):
        if key not in doc:
            raise SystemExit(f"{where}: missing {key!r}")
    if not isinstance(doc["scale"], int) or isinstance(doc["scale"], bool) or doc["scale"] not in (2, 3, 4):
        raise SystemExit(f"{where}: scale must be 2, 3 or 4, not {doc['scale']!r}")
    try:
        get_arch(str(doc.get("arch", "edsr_baseline")))
    except CadyqError as e:
        raise SystemExit(f"{where}: {e}") from None
    if not isinstance(doc["data"], list) or not doc["data"] or not all(isinstance(d, str) for d in doc["data"]):
        raise SystemExit(f"{where}: data must be a list of folder names")
    defaults = doc.get("defaults", {})
    if not isinstance(defaults, dict):
        raise SystemExit(f"{where}: [defaults] must be a table")
    if not isinstance(doc["stages"], list) or not doc["stages"]:
        raise SystemExit(f"{where}: [[stages]] must list at least one stage")
    segments: list[Segment] = []
    runs_seen: dict[str, str] = {}  # run -> its stage
    for i, st in enumerate(doc["stages"], 1):
        w = f"{where}, stage {i}"
        if not isinstance(st, dict):
            raise SystemExit(f"{w}: must be a table")
        merged = {**defaults, **st}
        _unknown(w, merged, _STAGE_KEYS)
        run = merged.pop("run", None)
        if not isinstance(run, str) or not run or "/" in run or run in (".", "..", "pick", "eval", "export"):
            raise SystemExit(f"{w}: run must name a run folder (a plain name), not {run!r}")
        init, cont, backbone = merged.pop("init", None), merged.pop("continue", None), merged.pop("backbone", None)
        for key, value in merged.items():
            _check_type(w, key, value)
        if run not in runs_seen and "stage" not in merged:
            raise SystemExit(f"{w}: missing 'stage' (fp, pams or cadyq) on run {run!r}'s first stage")
        stage = merged.setdefault("stage", runs_seen.get(run))
        if stage not in STAGES:
            raise SystemExit(f"{w}: stage must be one of {', '.join(STAGES)}, not {stage!r}")
        merged.setdefault("arch", doc.get("arch", "edsr_baseline"))
        merged.setdefault("scale", doc["scale"])
        if "steps" not in merged:
            raise SystemExit(f"{w}: missing 'steps' (the schedule length)")
        try:
            check_config(TrainConfig(**merged), spell=str)
        except SystemExit as e:
            raise SystemExit(f"{w}: {e}") from None
        for ref, what in ((init, "init"), (cont, "continue")):
            if ref is not None and ref not in runs_seen:
                raise SystemExit(f"{w}: {what} = {ref!r} names no earlier run")
        if run in runs_seen:
            if init is not None or cont is not None:
                raise SystemExit(f"{w}: run {run!r} already exists: init/continue only on its first stage")
            if runs_seen[run] != stage:
                raise SystemExit(f"{w}: run {run!r} is a {runs_seen[run]} run, not {stage}")
        elif cont is not None:
            if runs_seen[cont] != stage:
                raise SystemExit(f"{w}: continue = {cont!r} is a {runs_seen[cont]} run, not {stage}")
        elif init is None and stage != "fp":
            raise SystemExit(f"{w}: a {stage} run starts from an earlier run: set init")
        if backbone is not None and (stage != "fp" or not isinstance(backbone, str)):
            raise SystemExit(f"{w}: backbone names the shipped backbone an fp run ends in")
        runs_seen.setdefault(run, stage)
        segments.append(Segment(run, merged, init, cont, backbone))
    pick = doc["pick"]
    if not isinstance(pick, dict):
        raise SystemExit(f"{where}: [pick] must be a table")
    _unknown(f"{where}, [pick]", pick, _PICK_KEYS)
    if not isinstance(pick.get("runs"), list) or not pick["runs"] or any(r not in runs_seen for r in pick["runs"]):
        raise SystemExit(f"{where}, [pick]: runs must list runs of the recipe")
    if any(runs_seen[r] != "cadyq" for r in pick["runs"]):
        raise SystemExit(f"{where}, [pick]: runs must be cadyq runs")
    for key in ("max_gap", "max_fab"):
        if key in pick and (not isinstance(pick[key], (int, float)) or isinstance(pick[key], bool)):
            raise SystemExit(f"{where}, [pick]: {key} must be a number")
    if "max_gap" not in pick:
        raise SystemExit(f"{where}, [pick]: missing 'max_gap'")
    kept = {s.run for s in segments if s.settings.get("keep_val")}
    if missing := [r for r in pick["runs"] if r not in kept]:
        raise SystemExit(f"{where}, [pick]: run {missing[0]!r} keeps no checkpoints to pick from (keep_val = true)")
    picked_scales = {tuple(s.settings.get("scales") or ()) for s in segments if s.run in pick["runs"]}
    if len(picked_scales) > 1:
        raise SystemExit(f"{where}, [pick]: the runs to pick from must train the same scales")
    ev = doc.get("eval", {})
    _unknown(f"{where}, [eval]", ev, _EVAL_KEYS)
    if ev and (not isinstance(ev.get("sets"), list) or not all(isinstance(s, dict) and isinstance(s.get("name"), str)
                                                            for s in ev["sets"])):
        raise SystemExit(f"{where}, [eval]: sets must be a list of {{name = ..., limit = N}} tables")
    start = doc.get("start", "backbone" if any(s.backbone for s in segments) else "scratch")
    if start not in ("backbone", "scratch") or (start == "backbone" and not any(s.backbone for s in segments)):
        raise SystemExit(f"{where}: start must be \"scratch\", or \"backbone\" when an fp stage names a backbone")
    export = doc.get("export", {})
    _unknown(f"{where}, [export]", export, {"name", "storage"})
    from ..checkpoint import STORAGE_DTYPES

    storage = export.get("storage", "float32")
    if not isinstance(storage, str) or storage not in STORAGE_DTYPES:
        raise SystemExit(f"{where}, [export]: storage must be one of {', '.join(STORAGE_DTYPES)}, not {storage!r}")
    root = str(doc.get("data_root", ""))
    return Recipe(path=path, sha256=hashlib.sha256(raw).hexdigest(), name=str(doc["name"]),
                  arch=str(doc.get("arch", "edsr_baseline")), scale=doc["scale"],
                  data=[str(Path(root) / d) if root else d for d in doc["data"]], segments=segments, pick=pick, eval=ev,
                  export_name=str(export.get("name", doc["name"])), start=start, notes=str(doc.get("notes", "")),
                  scales=list(picked_scales.pop()), storage=storage)


@dataclass
class RecipeResult:
    """What one invocation did: finished (exported) or stopped (rerun to continue)."""

    finished: bool
    message: str
    export: Path | None = None
    sha256: str | None = None
    shipped_sha256: str | None = None


def _backbone_file(name: str) -> Path:
    """The file of a backbone named by a recipe: a .safetensors path, or a shipped backbone's name."""
    if name.endswith(".safetensors"):
        p = Path(name)
    else:
        from ..weights import list_backbones

        shipped = list_backbones()
        if name not in shipped:
            raise SystemExit(f"backbone {name!r} is not shipped in this install (shipped: {', '.join(shipped) or 'none'}); "
                             f"set start = \"scratch\" to train it")
        p = Path(shipped[name]["path"])
    if not p.is_file():
        raise SystemExit(f"backbone file {p} does not exist")
    return p


class _State:
    """``<run-dir>/recipe.json``: how far the recipe got (written atomically after every step)."""

    def __init__(self, run_dir: Path, recipe: Recipe) -> None:
        self.path = run_dir / "recipe.json"
        self.data: dict = {"recipe": recipe.name, "sha256": recipe.sha256, "segments_done": 0, "eval_done": [],
                           "pick": None, "export": None}
        if self.path.is_file():
            saved = json.loads(self.path.read_text())
            if saved.get("sha256") != recipe.sha256:
                raise SystemExit(f"{run_dir} was started from another recipe (or before {recipe.path} was edited); "
                                 "use another --run-dir")
            self.data = saved

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        os.replace(tmp, self.path)


def _last_step(run: Path) -> int:
    """The step of a run's last checkpoint, from its log's last ``final`` record (0 when none)."""
    from .select import read_log

    finals = [r["step"] for r in read_log(run) if r.get("final")] if (run / "log.jsonl").is_file() else []
    return finals[-1] if finals else 0


def _planned_steps(recipe: Recipe, run: str) -> set[int]:
    """Steps of ``run`` that the recipe validates whatever the time budget: its stages' targets and
    the multiples of their ``val_every``. A stage stopped by the budget also validates (and, with
    ``keep_val``, keeps) the step it stopped at; the pick ignores those, so it does not depend on
    where earlier invocations stopped."""
    steps: set[int] = set()
    for s in recipe.segments:
        if s.run == run:
            every = int(s.settings.get("val_every", TrainConfig.val_every))
            steps |= set(range(every, s.target + 1, every)) | {s.target}
    return steps


def run_recipe(recipe: Recipe, run_dir: Path, minutes: float = 60.0, data: list[str] | None = None,
               bf16: str = "auto", threads: int = 0, device: str = "cpu",
               log: Callable[[str], None] = lambda s: None) -> RecipeResult:
    """Run (or continue) ``recipe`` in ``run_dir`` for at most ``minutes``: train every stage, pick on
    validation, evaluate, export. ``data`` replaces the recipe's training folders; ``bf16`` ``on``/``off``
    overrides the recipe's setting (``auto``: the recipe's, where that is ``auto`` measured on this CPU)."""
    from .host import bf16_helps
    from .loop import train_stage

    deadline = time.time() + minutes * 60
    folders = [str(d) for d in (data or recipe.data)]
    for d in folders:
        if not Path(d).is_dir():
            raise SystemExit(f"training data folder {d} does not exist (recipe data, or pass --data)")
    state = _State(run_dir, recipe)
    if recipe.eval and (missing := [s["name"] for s in recipe.eval["sets"] if not (Path(recipe.eval.get("root", "")) / s["name"]).is_dir()]):
        log(f"warning: no benchmark folder {', '.join(missing)} under {recipe.eval.get('root', '.')}: the export will lack those metrics")
    first = 0
    backbone_file: Path | None = None
    if recipe.start == "backbone":
        first = max(i for i, s in enumerate(recipe.segments) if s.backbone) + 1
        backbone_file = _backbone_file(recipe.backbone or "")
        skipped = {s.run for s in recipe.segments[:first]}
        via = recipe.segments[first - 1].run
        for s in recipe.segments[first:]:
            if (s.init in skipped and s.init != via) or s.cont in skipped:
                raise SystemExit(f"recipe {recipe.path}: run {s.run} needs {s.init or s.cont}, which the backbone replaces")
        if state.data["segments_done"] < first:
            log(f"starting from backbone {recipe.backbone} ({backbone_file}): stages 1-{first} are what made it")
            state.data["segments_done"] = first
    state.save()
    measured: dict[str, bool] = {}

    def use_bf16(setting: object) -> bool:
        if bf16 in ("on", "off"):
            return bf16 == "on"
        if setting in ("auto", None):
            if "auto" not in measured:
                measured["auto"] = device != "cpu" or bf16_helps(threads)
                log(f"bf16 autocast: {'on' if measured['auto'] else 'off'} ({'measured on this CPU' if device == 'cpu' else device})")
            return measured["auto"]
        return setting in (True, "on")

    def stopped(what: str) -> RecipeResult:
        msg = f"{what}; rerun the same command to continue"
        log(msg)
        return RecipeResult(False, msg)

    def init_of(name: str) -> str:
        if backbone_file is not None and name == recipe.segments[first - 1].run:
            return str(backbone_file)
        return str(run_dir / name / "last.pt")

    seen: set[str] = {s.run for s in recipe.segments[:state.data["segments_done"]]}
    for i in range(state.data["segments_done"], len(recipe.segments)):
        seg = recipe.segments[i]
        left = deadline - time.time()
        if left <= 0:
            return stopped(f"time budget spent before stage {i + 1} ({seg.run})")
        run = run_dir / seg.run
        if seg.cont is not None and not (run / "last.pt").exists():
            run.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run_dir / seg.cont / "log.jsonl", run / "log.jsonl")  # the log first: last.pt marks it done
            shutil.copyfile(run_dir / seg.cont / "last.pt", run / "last.pt.tmp")
            os.replace(run / "last.pt.tmp", run / "last.pt")
        settings = dict(seg.settings)
        settings["bf16"] = use_bf16(settings.get("bf16", "auto"))
        cfg = TrainConfig(**settings, run_dir=str(run), data=folders, minutes=left / 60, threads=threads, device=device,
                          init=init_of(seg.init) if seg.init is not None and seg.run not in seen else None)
        log(f"stage {i + 1}/{len(recipe.segments)}: {seg.settings['stage']} {seg.run} to step {seg.target}")
        train_stage(cfg, log=log)
        seen.add(seg.run)
        step = _last_step(run)
        if step < seg.target:
            return stopped(f"stopped in stage {i + 1} ({seg.run}) at step {step} of {seg.target}")
        state.data["segments_done"] = i + 1
        state.save()

    from .select import materialize, pick_lineage

    picked = run_dir / "pick"
    if state.data["pick"] is None:
        best, src = pick_lineage([run_dir / r for r in recipe.pick["runs"]], float(recipe.pick["max_gap"]),
                                 recipe.pick.get("max_fab"), show=log,
                                 only={str(run_dir / r): _planned_steps(recipe, r) for r in recipe.pick["runs"]})
        if picked.exists():  # an earlier invocation stopped between copying and recording
            shutil.rmtree(picked)
        materialize(src, best["step"], picked)
        state.data["pick"] = {"run": src.name, "step": best["step"], "val_psnr": best["val_psnr"],
                              "val_psnr_w8a8": best["val_psnr_w8a8"], "val_fab": best["val_fab"]}
        state.save()

    evals = _run_eval(recipe, run_dir, picked / "last.pt", state, deadline, threads, device, log)
    if evals is None:
        return stopped("time budget spent during eval")

    from ..weights import list_weights
    from .export import export

    out = run_dir / "export"
    out.mkdir(exist_ok=True)
    cont_sources = {s.cont for s in recipe.segments if s.cont}
    runs = [run_dir / r for r in dict.fromkeys(s.run for s in recipe.segments[first:])
            if r not in cont_sources and r not in recipe.pick["runs"]] + [picked]
    entry = export(picked / "last.pt", recipe.export_name, out, runs, evals,
                   "; ".join(folders) + " (held out for validation: the seed's split)", recipe.notes,
                   recipe=recipe.path.stem, backbone=recipe.backbone or "", scales=recipe.scales or None,
                   storage=recipe.storage)
    shipped = {w.name: w.sha256 for w in list_weights()}.get(entry["name"])
    state.data["export"] = {"file": str(out / entry["file"]), "sha256": entry["sha256"]}
    state.save()
    same = "" if shipped is None else (" = the shipped model's" if shipped == entry["sha256"] else
                                       f" (the shipped {entry['name']} is {shipped[:12]}…: other machine or settings)")
    msg = f"exported {out / entry['file']}: sha256 {entry['sha256']}{same}"
    log(msg)
    return RecipeResult(True, msg, out / entry["file"], entry["sha256"], shipped)


def _run_eval(recipe: Recipe, run_dir: Path, ckpt: Path, state: _State, deadline: float, threads: int, device: str,
              log: Callable[[str], None]) -> list[Path] | None:
    """Evaluate the pick on each ``[eval]`` set not yet done (``<run-dir>/eval/<set>.json``); the JSON
    files, or None when the time budget ran out first. A missing benchmark folder is skipped with a warning.
    A multi-scale model is evaluated at each of its scales (``<set>_x<s>.json``). What is evaluated is the
    pick as the export stores it (``<run-dir>/eval/stored.safetensors``: the recipe's ``storage``)."""
    ev = recipe.eval
    if not ev:
        return []
    from ..evaluate import evaluate, results_to_json
    from ..weights import load_model

    root = Path(ev.get("root", ""))
    folder = run_dir / "eval"
    folder.mkdir(exist_ok=True)
    from ..checkpoint import load_model_file
    from .export import model_entry_name, write_weights

    stored = folder / "stored.safetensors"  # written again by every invocation: always the pick's
    write_weights(load_model_file(ckpt), ckpt, stored, recipe.storage)
    net, net_scale = None, None
    done_now = 0
    for scale in recipe.scales or [recipe.scale]:
        for s in ev["sets"]:
            name = s["name"]
            key = f"{name}_x{scale}" if recipe.scales else name
            if key in state.data["eval_done"]:
                continue
            if not (root / name).is_dir():
                log(f"warning: benchmark folder {root / name} does not exist: {name} not evaluated")
                continue
            if time.time() >= deadline and done_now:  # at least one set per invocation: progress whatever the budget
                return None
            if net_scale != scale:
                import torch

                if threads:
                    torch.set_num_threads(threads)
                net, net_scale = load_model(weights=stored, scale=scale, mode="fp32", device=device), scale
            log(f"eval {name}" + (f" at x{scale}" if recipe.scales else "")
                + (f" (first {s['limit']} images)" if s.get("limit") else ""))
            res = evaluate([root / name], scale, net, list(ev.get("modes", ["fp32", "w8a8", "dynamic"])),
                           bool(ev.get("bicubic", False)), str(ev.get("tiling", "paper")),
                           model_name=model_entry_name(recipe.export_name, scale, bool(recipe.scales)),
                           limit=int(s.get("limit", 0)))
            out = folder / f"{key}.json"
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(results_to_json(res), indent=1) + "\n")
            os.replace(tmp, out)
            state.data["eval_done"].append(key)
            state.save()
            done_now += 1
    return [folder / f"{n}.json" for n in state.data["eval_done"]]
