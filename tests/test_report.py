"""`report` on a real tiny run, on the committed reproduce results and on the ablation folder; TensorBoard events."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train import _tiny_recipe

from slmembed.cli import main
from slmembed.errors import DataError, SlmembedError
from slmembed.report import report
from slmembed.train import train

RESULTS = Path(__file__).resolve().parents[1] / "results" / "reproduce"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_models, data_dir) -> Path:
    run = tmp_path_factory.mktemp("report") / "run"
    train(_tiny_recipe(tiny_models), run, data_dir=str(data_dir), progress=False)
    return run


def test_training_writes_tensorboard_events(run_dir) -> None:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in log] == list(range(1, 7))
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in log], rel=1e-5)
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([r["lr"] for r in log], rel=1e-5)


def test_report_of_a_training_run(run_dir, tmp_path) -> None:
    (run_dir / "eval.json").write_text(json.dumps({"scores": {"STS17": 12.5, "BIOSSES": 3.25}, "average": 7.88}))
    path = report(run_dir, tmp_path)
    text = path.read_text()
    assert "6 log records to step 6" in text and "![training](train.png)" in text
    assert "| STS17 | 12.50 |" in text
    assert (tmp_path / "train.png").read_bytes()[:8] == PNG and not (tmp_path / "scores.png").exists()


def test_report_of_a_reproduce_result(tmp_path) -> None:
    folder = RESULTS / "gemma-3-270m"
    result = json.loads((folder / "gemma-3-270m.json").read_text())
    text = report(folder, tmp_path).read_text()
    before, after = result["before"]["scores"]["STSBenchmark"], result["after"]["scores"]["STSBenchmark"]
    assert f"| STSBenchmark | {before:.2f} | {after:.2f} |" in text
    assert f"step {result['curve'][0]['step']}: {result['curve'][0]['average']:.2f}" in text
    for name in ("scores.png", "train.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG


def test_report_of_an_ablation_folder(tmp_path) -> None:
    runs = sorted(p.parent.name for p in RESULTS.glob("*/*.json") if p.stem == p.parent.name)
    assert len(runs) >= 2
    text = report(RESULTS, tmp_path).read_text()
    table = [line for line in text.splitlines() if line.startswith("| ") and re.search(r" \d+ x \d+ \|", line)]
    assert [row.split(" | ")[0].lstrip("| ") for row in table] == runs
    assert "train.lr" in text.splitlines()[4] and "train.hard_negatives" in text  # the recipe fields that differ
    for name in ("ablation.png", "losses.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG


def test_report_errors(tmp_path, capsys) -> None:
    with pytest.raises(SlmembedError, match="nothing to report"):
        report(tmp_path)
    (tmp_path / "train_log.jsonl").write_text('{"step": 1, "loss": 2.0, "lr": 0.1}\n{"step": 2}\n')
    with pytest.raises(DataError, match=r"train_log.jsonl:2: expected an object with step and loss and lr, or step "
                                        r"and stsb_dev"):
        report(tmp_path)
    # Records of STSBenchmark dev scores (train.dev_every), alone or with a loss, are reported beside the losses.
    (tmp_path / "train_log.jsonl").write_text('{"step": 1, "loss": 2.0, "lr": 0.1}\n{"step": 2, "stsb_dev": 50.5}\n'
                                              '{"step": 3, "loss": 1.0, "lr": 0.1, "stsb_dev": 61.25}\n')
    text = report(tmp_path).read_text()
    assert "STSBenchmark dev during training: step 2: 50.50, step 3: 61.25." in text
    assert "2 log records to step 3; final loss 1.0000" in text
    (tmp_path / "report.md").unlink()
    for png in tmp_path.glob("*.png"):
        png.unlink()
    shutil.rmtree(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    assert "no such folder" in capsys.readouterr().err
