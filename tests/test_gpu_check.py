"""`make gpu-check SMOKE=1`: the prepared GPU check, rehearsed on the CPU, so that it works the day a GPU comes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_step_and_records_it(tmp_path):
    record = tmp_path / "BENCHMARKS.md"
    record.write_text("# earlier sections\n")
    args = f"--out {tmp_path / 'out'} --record {record}"
    proc = subprocess.run(["make", "--no-print-directory", "gpu-check", "SMOKE=1", f"GPU_CHECK_PYTHON={sys.executable}",
                           f"GPU_CHECK_ARGS={args}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == ["setup", "bench", "bench-7b", "bench-real", "train", "eval", "analysis", "demo"]
    failed = {n: s.get("reason") for n, s in steps.items()
              if s["status"] != "passed" and n not in ("demo", "bench-real", "bench-7b")}
    assert not failed, failed
    # the demo composes the pretrained 135M SmolLM2: too big for the CPU rehearsal (test_compare.py runs it shrunk)
    assert steps["demo"]["status"] == "skipped" and "tests/test_compare.py" in steps["demo"]["reason"]
    assert steps["bench-real"]["status"] == "skipped" and "tests/test_bench.py" in steps["bench-real"]["reason"]
    assert steps["bench-7b"]["status"] == "skipped" and "tests/test_bench.py" in steps["bench-7b"]["reason"]
    assert report["wall_s"] < 240  # SMOKE's budget: under 4 minutes on 2 cores

    bench = steps["bench"]["figures"]
    assert {r["setup"] for r in bench["rows"]} == {"full", "midtune", "naive", "lora"}
    assert all(r["median_step_s"] > 0 and r["tokens_per_s"] > 0 for r in bench["rows"])
    midtune = next(r for r in bench["rows"] if r["setup"] == "midtune")
    assert 0 < midtune["analytic_vs_full"] < 1 and midtune["vs_full"] > 0

    backends = steps["train"]["figures"]["backends"]
    assert list(backends) == ["plain", "zero2", "zero3", "fsdp2"]
    for name in ("plain", "zero2", "zero3"):  # FSDP needs a GPU: accelerate does not enable it on the CPU
        b = backends[name]
        assert b["status"] == "passed", (name, b.get("reason"))
        assert len(b["losses"]) == 4 and b["resumed_losses"] == b["losses"][2:]
        assert b["ranks"] == 1  # no GPUs here: one rank (two where a GPU machine has two)
    assert backends["plain"]["distributed_type"] == "NO"
    assert backends["zero3"]["distributed_type"] == "DEEPSPEED"
    # on the CPU accelerate would run the FSDP config as plain MULTI_CPU: skipped, saying so (on the H200 it runs)
    assert backends["fsdp2"]["status"] == "skipped" and "FSDP on the CPU" in backends["fsdp2"]["reason"]

    ev = steps["eval"]["figures"]
    assert ev["midtune_scores"] == ev["llava_hf_scores"]
    assert steps["analysis"]["figures"]["profile_values_compared"] > 10
    assert steps["analysis"]["figures"]["knn"]["rows_with_same_neighbours"] == 1.0

    section = (tmp_path / "out" / "gpu-check.md").read_text()
    assert record.read_text() == "# earlier sections\n\n" + section
    assert "| bench | passed |" in section and "| fsdp2 |" in section and report["machine"]["torch"] in section


def test_gpu_check_refuses_to_run_without_a_gpu_unless_smoke(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, str(ROOT / ".ci" / "gpu_check.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "SMOKE=1" in proc.stderr
    assert not (tmp_path / "gpu-check.json").exists()


def test_the_block_over_full_ratio_carries_an_interval_and_a_verdict_beside_the_papers():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / ".ci" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = gpu_check  # its dataclasses look their module up
    spec.loader.exec_module(gpu_check)

    def rows(full, block):
        return [{"setup": "full", "round_medians": full, "mem_vs_full": 1.0},
                {"setup": "midtune", "round_medians": block, "mem_vs_full": 0.55}]

    clear = gpu_check.block_vs_full(rows([1.0, 1.02, 0.98], [0.70, 0.71, 0.69]), paper=0.861)
    assert clear["step_verdict"] == "cheaper" and clear["vs_paper"] == "below"
    lo, hi = clear["step_ratio_ci"]
    assert lo < clear["step_ratio"] < hi < 0.861 and clear["step_ratio_rounds"] == 3
    noisy = gpu_check.block_vs_full(rows([1.0, 1.3, 0.8], [0.9, 0.8, 1.0]), paper=0.861)
    assert noisy["step_verdict"] == "inconclusive" and noisy["vs_paper"].startswith("inconclusive")
    assert clear["memory_ratio"] == 0.55
