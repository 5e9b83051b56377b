"""Picking a step across the runs of a lineage (``python -m cadyq_cli.train.select RUN [RUN ...]``)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cadyq_cli.train.select import main, read_log


def _run(root: Path, name: str, recs: list[tuple[int, float, float, float]], kept: list[int]) -> Path:
    run = root / name
    run.mkdir()
    lines = [{"step": s, "val_psnr": p, "val_psnr_w8a8": w, "val_fab": f} for s, p, w, f in recs]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    for s in kept:
        (run / f"step{s:05d}.pt").write_bytes(f"{name}:{s}".encode())
    return run


@pytest.fixture
def lineage(tmp_path: Path) -> tuple[Path, Path]:
    a = _run(tmp_path, "a", [(40, 30.0, 30.1, 6.0), (80, 29.98, 30.1, 5.6)], kept=[40, 80])
    # the continuation's log starts with a copy of a's (no checkpoints of those steps here)
    b = _run(tmp_path, "b", [(40, 30.0, 30.1, 6.0), (80, 29.98, 30.1, 5.6), (100, 29.99, 30.1, 5.5), (120, 29.9, 30.1, 5.0)],
             kept=[100, 120])
    return a, b


def test_lowest_fab_within_the_gap_across_runs(lineage: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    a, b = lineage
    main([str(a), str(b), "--max-gap", "0.13", "--into", str(tmp_path / "pick")])
    out = capsys.readouterr().out
    assert f"pick: {b} step 100 (FAB 5.50, gap -0.110 dB)" in out
    assert (tmp_path / "pick" / "last.pt").read_bytes() == b"b:100"
    assert max(r["step"] for r in read_log(tmp_path / "pick")) == 100
    main([str(a), "--max-gap", "0.13"])  # one run: its own kept steps only
    assert "pick: step 80 (FAB 5.60" in capsys.readouterr().out


def test_fab_cap_and_no_step_within_the_gap_are_refused(lineage: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = lineage
    with pytest.raises(SystemExit, match="above --max-fab 5.4"):
        main([str(a), str(b), "--max-gap", "0.13", "--max-fab", "5.4", "--into", str(tmp_path / "no")])
    assert not (tmp_path / "no").exists()
    with pytest.raises(SystemExit, match="no kept step within 0.05 dB"):
        main([str(a), str(b), "--max-gap", "0.05"])


def test_a_folder_without_a_log_is_refused_in_one_line(lineage: tuple[Path, Path], tmp_path: Path) -> None:
    a, _ = lineage
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no log.jsonl"):
        main([str(a), str(tmp_path / "empty"), "--max-gap", "0.13"])
