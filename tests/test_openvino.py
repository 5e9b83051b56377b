"""The OpenVINO runtime's checks (tests/openvino_checks.py), each reported here as a test.

They run in one pytest process of their own: a process that has loaded OpenVINO's runtime may crash
on SIGTERM, and tests/test_train.py sends SIGTERM to its own process. Skipped without openvino.
"""
from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest.importorskip("openvino")

HERE = Path(__file__).resolve().parent
CHECKS = [
    "test_receptive_radius_matches_the_model",
    "test_fp32_graph_equals_pytorch_fp32",
    "test_bits_equal_the_float_reference_and_output_as_close_as_int8",
    "test_mixed_bit_windows_equal_the_integer_sum_over_bit_widths",
    "test_carn_receptive_radius_and_fp32_graph_equal_the_pytorch_model",
    "test_carn_bits_equal_the_float_reference_and_output_as_close_as_int8",
    "test_carn_on_the_signed_grid_equals_the_pytorch_model",
    "test_learned_input_shifts_run_as_the_pytorch_model_runs_them",
    "test_outputs_are_deterministic_across_runs_and_thread_counts",
    "test_later_models_import_the_exported_graphs",
    "test_carn_scales_share_their_cached_graphs_without_the_tail",
    "test_carn_weights_that_cannot_run_are_one_line_errors",
    "test_the_last_graph_is_prefetched_and_a_wrong_guess_dropped",
    "test_a_prefetch_is_keyed_by_what_decides_the_graph",
    "test_alternating_requests_each_find_their_graph",
    "test_an_image_of_several_tiles_prefetches_its_first_graph",
    "test_a_command_that_fails_while_its_prefetch_runs_exits_cleanly",
    "test_images_of_new_sizes_compile_no_graph",
    "test_free_size_and_one_geometry_graphs_give_the_same_bytes",
    "test_default_upscale_runs_on_openvino_where_it_serves",
    "test_eval_on_the_runtime_scores_the_runtime_upscale_uses",
    "test_bf16_tail_keeps_bits_and_stays_close",
    "test_tail_in_strips_equals_the_tail_in_one_piece",
    "test_a_big_image_keeps_few_graphs_alive",
    "test_bits_only_graph_gives_the_full_graphs_report",
    "test_an_unwritable_cache_is_no_cache",
    "test_unsupported_requests_are_one_line_errors",
    "test_a_damaged_weights_file_is_refused_at_load",
    "test_a_damaged_shipped_file_says_reinstall",
    "test_tiles_are_placed_clamped_and_rounded_as_the_pytorch_engine",
]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[str, str]]]:
    """Run the checks once; per check name, (outcome, message) of each of its cases."""
    xml = tmp_path_factory.mktemp("ov") / "junit.xml"
    env = dict(os.environ, PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", str(HERE / "openvino_checks.py")],
        capture_output=True, text=True, env=env, cwd=HERE.parent, timeout=1800,
    )
    if not xml.is_file():
        pytest.fail(f"the OpenVINO checks did not run (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out: dict[str, list[tuple[str, str]]] = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = case.get("name", "").split("[")[0]
        bad = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        outcome = "passed" if bad is None else bad.tag
        out.setdefault(name, []).append((outcome, "" if bad is None else (bad.get("message") or "") + "\n" + (bad.text or "")))
    return out


@pytest.mark.parametrize("name", CHECKS)
def test_openvino(results: dict[str, list[tuple[str, str]]], name: str) -> None:
    assert name in results, f"{name} did not run"
    for outcome, msg in results[name]:
        if outcome == "skipped":
            pytest.skip(msg.strip().splitlines()[0] if msg.strip() else "skipped")
        assert outcome == "passed", msg[-4000:]


def test_every_check_is_reported() -> None:
    import ast

    tree = ast.parse((HERE / "openvino_checks.py").read_text())
    defined = [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
    assert sorted(defined) == sorted(CHECKS)
