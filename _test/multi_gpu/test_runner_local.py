"""The multi-GPU runner's local path: submitit local executor, 2 tasks, gloo."""

import os
import time

import pytest

pytest.importorskip("submitit")

from _test.multi_gpu.run_multi_gpu_tests import discover_modules, main, module_name

SAMPLE = "_test.multi_gpu._sample_dist_tests"


@pytest.fixture(autouse=True)
def _restore_pythonpath(monkeypatch):
    """main() prepends the repo to PYTHONPATH for the tasks; undo it afterwards."""
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))


def test_runner_reports_pass_and_fail_for_every_rank(tmp_path, capsys):
    start = time.monotonic()
    status = main(["--tests", SAMPLE, "--tasks-per-node", "2", "--time", "2",
                   "--folder", str(tmp_path)])
    elapsed = time.monotonic() - start
    out = capsys.readouterr().out
    assert status == 1, out  # one test fails on purpose
    for rank in (0, 1):
        assert f"PASS {SAMPLE}::all_reduce_sums_ranks rank={rank}" in out, out
        assert (f"FAIL {SAMPLE}::deliberately_fails rank={rank}: "
                f"AssertionError: expected -1, all_reduce gave 2.0") in out, out
    # A failure on one rank mid-collective fails its peer, not the whole run.
    assert (f"FAIL {SAMPLE}::fails_on_rank_0_before_a_collective rank=0: "
            "RuntimeError: rank 0 gives up before the all_reduce") in out, out
    assert f"FAIL {SAMPLE}::fails_on_rank_0_before_a_collective rank=1: RuntimeError" in out
    for rank in (0, 1):
        assert f"PASS {SAMPLE}::still_passes_after_a_desync rank={rank}" in out, out
    assert "other_world_size_is_skipped" not in out
    assert "4 passed, 4 failed" in out
    assert elapsed < 60, f"runner took {elapsed:.1f}s"


def test_keyword_filter_selects_only_matching_tests(tmp_path, capsys):
    status = main(["--tests", SAMPLE, "-k", "all_reduce", "--folder", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "deliberately_fails" not in out
    assert f"PASS {SAMPLE}::all_reduce_sums_ranks rank=1" in out


def test_default_discovery_and_module_names():
    modules = discover_modules()
    assert "_test.test_distributed_harness" in modules
    assert "_test.multi_gpu.test_runner_local" in modules
    assert SAMPLE not in modules
    assert module_name(__file__) == "_test.multi_gpu.test_runner_local"
    assert module_name(SAMPLE) == SAMPLE
