"""The README and docs as a user reads them: short, generated tables up to date, every `cadyq`
command line in them parses, and the quick start runs as written."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cadyq_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
# shell variables the docs' command blocks use, as the shell would expand them
SHELL_VARS = {"$DATA": "--data D/T91 --data D/BSD200 --data D/BSDS500test", "$B": "B", "$D": "D"}


def _manifest_table():
    spec = importlib.util.spec_from_file_location("manifest_table", ROOT / "bench" / "manifest_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _blocks(path: Path, after: str | None = None) -> list[str]:
    """The bash code blocks of a markdown file (only the first after heading ``after``, if given)."""
    text = path.read_text()
    if after is not None:
        text = text.split(after, 1)[1]
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    return blocks[:1] if after is not None else blocks


def _cadyq_commands(block: str) -> list[list[str]]:
    """Every `cadyq ...` command of a bash block as argv (continuations joined, comments and
    other commands chained with && or ; dropped)."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        for var, value in SHELL_VARS.items():
            line = line.replace(var, value)
        for part in re.split(r"&&|;", line):
            words = shlex.split(part, comments=True)
            if words and words[0] == "cadyq":
                out.append(words[1:])
    return out


def test_readme_is_short() -> None:
    assert len(README.read_text().splitlines()) <= 220


def test_ci_runs_the_readme_test_command() -> None:
    line = 'pip install torch==2.13.0 && pip install -e ".[test,ray,openvino]" && python -m pytest -q -n 2 --dist loadgroup'
    assert line in README.read_text() and line in (ROOT / ".ci" / "run").read_text()


def test_generated_tables_are_up_to_date() -> None:
    mt = _manifest_table()
    manifest = json.loads((ROOT / "weights" / "manifest.json").read_text())
    assert (ROOT / "docs" / "results.md").read_text() == mt.results_doc(manifest), \
        "docs/results.md is stale: python bench/manifest_table.py --doc"
    assert mt._replace_readme(README.read_text(), mt.readme_table(manifest)) == README.read_text(), \
        "the README's models table is stale: python bench/manifest_table.py --readme"
    for m in manifest["models"]:  # the table shows every shipped model
        assert f"`{m['name']}`" in README.read_text()


def _commands() -> list[tuple[str, list[str]]]:
    cmds = [(p.name, argv) for p in DOCS for b in _blocks(p) for argv in _cadyq_commands(b)]
    assert len(cmds) >= 20  # the extraction works (README alone has about 15)
    return cmds


@pytest.mark.parametrize("where, argv", _commands(), ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_every_documented_command_parses(where: str, argv: list[str]) -> None:
    """Each `cadyq ...` line parses as the CLI would parse it (options, types, choices), without running."""
    group = typer.main.get_command(app)
    if argv == ["--version"]:
        return  # eager option: handled (and tested) below
    assert argv and argv[0] in group.commands, f"{where}: cadyq {' '.join(argv)}: no such command"
    try:
        group.commands[argv[0]].make_context(argv[0], list(argv[1:]))
    except Exception as e:  # typer's (vendored) click raises its own UsageError / BadParameter
        pytest.fail(f"{where}: cadyq {' '.join(argv)}: {getattr(e, 'format_message', e.__str__)()}")


def test_version() -> None:
    from cadyq_cli import __version__

    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"cadyq {__version__}"


def test_quick_start_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cmds = _cadyq_commands(_blocks(README, after="## Quick start")[0])
    assert [c[0] for c in cmds] == ["upscale", "bitmap", "upscale", "models"]
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    for argv in cmds:
        r = CliRunner().invoke(app, argv)
        assert r.exit_code == 0, (argv, r.output)
    outs = {p.name for p in tmp_path.iterdir()}
    assert {"scene_x4.png", "scene_bits.png", "scene_x2.png", "scene.jsonl"} <= outs
    rec = json.loads((tmp_path / "scene.jsonl").read_text().splitlines()[0])
    assert rec["scale"] == 2 and rec["output"].endswith("scene_x2.png") and 4 <= rec["fab"] <= 8


def test_links_in_the_docs_point_at_files() -> None:
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" not in target:
                assert (path.parent / target).exists(), f"{path.name}: broken link {target}"


def test_no_tracked_file_over_1_mb_outside_weights() -> None:
    import subprocess

    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    big = [f for f in files.decode().split("\0") if f and not f.startswith("weights/")
           and os.path.getsize(ROOT / f) > 1 << 20]
    assert not big, big
