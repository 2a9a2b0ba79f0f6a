"""``benchmarks/gpu.py`` cannot rot before a GPU arrives: its CPU smoke mode runs the same round
(prepare, split, Federation with the bf16 runtime) on the tiny LLaVA, and without CUDA the real
check refuses to run instead of writing CPU figures as GPU ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_without_cuda_it_says_so_and_writes_nothing(tmp_path) -> None:
    proc = _run("--out", str(tmp_path / "gpu.json"))
    assert proc.returncode == 3
    assert "no CUDA device here" in proc.stderr and "nothing written" in proc.stderr
    assert not (tmp_path / "gpu.json").exists()


@pytest.mark.slow
def test_cpu_smoke_round(tmp_path) -> None:
    out = tmp_path / "gpu.json"
    proc = _run("--device", "cpu", "--tiny", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke"] is True and result["device"] == "cpu"
    assert result["ranks"] == [32, 32, 16, 16, 8, 8, 4, 4, 4, 4]
    bf16, four_bit = result["runs"]
    assert bf16["variant"] == "bf16" and bf16["runtime"]["dtype"] == "bfloat16" and bf16["runtime"]["gradient_checkpointing"]
    assert len(bf16["clients"]) == 4 and bf16["ranks"] == sorted(bf16["ranks"], reverse=True)
    assert bf16["train_tokens"] > 0 and bf16["tokens_per_s"] > 0 and 0 < bf16["train_s"] <= bf16["round_s"]
    assert bf16["adapter_device"] == "cpu" and bf16["plan_peak_bytes"] > 0
    assert all(loss == loss and loss > 0 for loss in bf16["client_losses"])
    assert four_bit == {"variant": "4bit", "skipped": "4-bit needs CUDA"}
