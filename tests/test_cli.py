"""The command line: JSON output of eval, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from slmembed.cli import main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slmembed", *args], capture_output=True, text=True, timeout=600)


def test_eval_writes_the_documented_json(tmp_path) -> None:
    out = tmp_path / "scores.json"
    proc = run("eval", "--model", "all-minilm-l6-v2", "--tasks", "STSBenchmark", "BIOSSES", "--output", str(out),
               "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["model"] == "all-minilm-l6-v2" and set(result["scores"]) == {"STSBenchmark", "BIOSSES"}
    assert result["average"] == pytest.approx((result["scores"]["STSBenchmark"] + result["scores"]["BIOSSES"]) / 2,
                                              abs=0.01)
    assert result["scores"]["STSBenchmark"] == pytest.approx(82.03, abs=0.05)
    assert "| STSBenchmark |" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["eval", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["eval", "--model", "all-minilm-l6-v2", "--tasks", "STS99"], "STS99"),
    (["eval", "--model", "all-minilm-l6-v2", "--data-dir", "/no/such/dir"], "/no/such/dir does not exist"),
    (["train", "--config", "minicpm-2b", "--output", "x"], "--trust-remote-code"),
    (["train", "--config", "no-such-recipe", "--output", "x"], "no recipe"),
    (["eval", "--model", "all-minilm-l6-v2", "--device", "cuda"], "no CUDA GPU"),
])
def test_errors_are_one_line_with_exit_code_2(args, message, capsys) -> None:
    if "cuda" in args:
        pytest.importorskip("torch").cuda.is_available() and pytest.skip("a GPU is present")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slmembed: error:") and message in err and "\n" not in err
