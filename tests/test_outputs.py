"""No command deletes or overwrites what it did not write: every command that writes refuses, before any work, an
output that is, contains or lies inside its input, a non-empty folder or a file it did not write, and replaces an
earlier output of its own only with --force. Refusals are one line and exit code 2, and leave every file as it was."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_train import _tiny_recipe

from slmembed import outputs
from slmembed.cli import main
from slmembed.train import train


def _snapshot(root: Path) -> dict[str, str]:
    """Every file below ``root`` with a hash of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_models, data_dir) -> Path:
    """A finished training run of the tiny Llama (4 steps), inside a folder of runs."""
    folder = tmp_path_factory.mktemp("runs") / "run"
    train(_tiny_recipe(tiny_models, max_steps=4), folder, data_dir=str(data_dir), progress=False)
    return folder


def _refused(args: list[str], capsys, *watch: Path, message: str) -> None:
    """``slmembed ARGS`` exits 2 with one error line holding ``message``, quickly, and changes no file in ``watch``."""
    before = [_snapshot(w) if w.is_dir() else w.exists() and w.read_bytes() for w in watch]
    capsys.readouterr()  # what earlier commands printed
    start = time.perf_counter()
    assert main(args) == 2
    assert time.perf_counter() - start < 5, "refused only after work"
    err = capsys.readouterr().err.strip()
    assert err.startswith("slmembed: error:") and "\n" not in err and "Traceback" not in err, err
    assert message in err, err
    assert before == [_snapshot(w) if w.is_dir() else w.exists() and w.read_bytes() for w in watch]


def test_export_refuses_its_run_its_parent_and_foreign_folders(run, capsys, tmp_path) -> None:
    parent = run.parent
    _refused(["export", "--run", str(run), "--output", str(run)], capsys, parent, message="is the input")
    _refused(["export", "--run", str(run), "--output", str(parent)], capsys, parent, message="contains the input")
    _refused(["export", "--run", str(run), "--output", str(run / "adapter" / "x")], capsys, parent,
             message="lies inside the input")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for force in ([], ["--force"]):
        _refused(["export", "--run", str(run), "--output", str(foreign), *force], capsys, foreign,
                 message="did not write and is not empty")
    (tmp_path / "file").write_text("x")
    _refused(["export", "--run", str(run), "--output", str(tmp_path / "file" / "model")], capsys, tmp_path,
             message="is a file, not a folder")


def test_export_replaces_an_earlier_export_only_with_force(run, capsys, tmp_path) -> None:
    out = tmp_path / "model"
    assert main(["export", "--run", str(run), "--output", str(out), "--format", "hf"]) == 0
    assert outputs.written_by(out) == "export"
    _refused(["export", "--run", str(run), "--output", str(out), "--format", "hf"], capsys, out,
             message="pass --force")
    (out / "model.safetensors").write_bytes(b"stale")
    assert main(["export", "--run", str(run), "--output", str(out), "--format", "hf", "--force"]) == 0
    assert (out / "model.safetensors").read_bytes() != b"stale"
    (out / "mine.txt").write_text("keep me")  # something the user added: --force no longer replaces the folder
    _refused(["export", "--run", str(run), "--output", str(out), "--format", "hf", "--force"], capsys, out,
             message="'mine.txt', which slmembed did not write")


def test_train_refuses_inputs_foreign_folders_and_earlier_runs(run, tiny_models, data_dir, capsys, tmp_path) -> None:
    base = ["train", "--recipe", "smollm2-135m", "--data-dir", str(data_dir),
            "--set", f"model.name={tiny_models['llama']}"]
    _refused([*base, "--output", str(tiny_models["llama"])], capsys, tiny_models["llama"], message="is the input")
    _refused([*base, "--output", str(data_dir.parent)], capsys, data_dir, message="contains the input")
    _refused([*base, "--output", str(run)], capsys, run, message="pass --force to replace it (or --resume to continue")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "a.txt").write_text("keep me")
    _refused([*base, "--output", str(foreign), "--force"], capsys, foreign, message="did not write")
    # An earlier run holding a file the user put there is not replaced, even with --force.
    (run / "notes.txt").write_text("mine")
    try:
        _refused([*base, "--output", str(run), "--force"], capsys, run, message="'notes.txt', which slmembed")
    finally:
        (run / "notes.txt").unlink()


def test_train_force_replaces_an_earlier_run(tiny_models, data_dir, tmp_path) -> None:
    recipe = _tiny_recipe(tiny_models, max_steps=2)
    folder = tmp_path / "run"
    train(recipe, folder, data_dir=str(data_dir), progress=False)
    (folder / "eval.json").write_text("{}")
    outputs.record_added(folder, "eval.json", "eval")  # as `slmembed eval --output RUN/eval.json` records it
    recipe.train.max_steps = 3
    train(recipe, folder, data_dir=str(data_dir), progress=False, force=True)
    assert json.loads((folder / "summary.json").read_text())["steps"] == 3
    assert not (folder / "eval.json").exists()  # the old run's scores went with it
    assert outputs.written_by(folder) == "train"


def test_eval_output_checked_before_any_work(run, tiny_models, data_dir, capsys, tmp_path) -> None:
    args = ["eval", "--model", "all-minilm-l6-v2", "--tasks", "BIOSSES", "--data-dir", str(data_dir), "--output"]
    _refused([*args, str(tmp_path)], capsys, tmp_path, message="is a folder; the output must be a file path")
    _refused([*args, str(run / "embed.json")], capsys, run, message="is not an earlier `slmembed eval` output")
    _refused([*args, str(tmp_path / "scores.txt")], capsys, tmp_path, message="must end in .json")
    tiny = tiny_models["llama"]
    _refused(["eval", "--model", str(tiny), "--data-dir", str(data_dir), "--output", str(tiny / "scores.json")],
             capsys, tiny, message="lies inside the input")
    _refused([*args, str(data_dir)], capsys, data_dir, message="is a folder")
    out = tmp_path / "scores.json"
    assert main([*args, str(out)]) == 0
    first = out.read_bytes()
    _refused([*args, str(out)], capsys, out, message="pass --force")
    assert main([*args, str(out), "--force"]) == 0 and json.loads(out.read_text())["scores"].keys() == {"BIOSSES"}
    assert json.loads(first)["scores"] == json.loads(out.read_text())["scores"]


def test_embed_refuses_foreign_files_and_replaces_its_own_with_force(data_dir, capsys, tmp_path) -> None:
    texts = tmp_path / "texts.txt"
    texts.write_text("A man is playing a guitar.\nA dog runs.\n")
    args = ["embed", str(texts), "--model", "all-minilm-l6-v2", "--dtype", "float32", "--output"]
    foreign = tmp_path / "weights.npy"
    np.save(foreign, np.arange(6))  # a 1-D integer array: not an embedding matrix slmembed wrote
    _refused([*args, str(foreign), "--force"], capsys, foreign, message="not an earlier `slmembed embed` output")
    _refused([*args, str(texts)], capsys, texts, message="must end in .npy or .parquet")
    (tmp_path / "v.npy.parts").write_text("not a folder")
    _refused([*args, str(tmp_path / "v.npy")], capsys, tmp_path, message="not the chunk folder")
    out = tmp_path / "w.npy"
    assert main([*args, str(out)]) == 0 and np.load(out).shape == (2, 384)
    _refused([*args, str(out)], capsys, out, message="pass --force")
    assert main([*args, str(out), "--force"]) == 0 and np.load(out).shape == (2, 384)
    # The calibration file is an input too: an earlier output used as calibration is never replaced by the output.
    _refused([*args, str(out), "--force", "--precision", "int8", "--calibration", str(out)], capsys, out,
             message="is the input")


def test_report_keeps_foreign_files_and_replaces_its_own_with_force(run, capsys, tmp_path) -> None:
    assert main(["report", str(run)]) == 0
    assert outputs.written_by(run) == "train" and (run / "train.png").exists()
    _refused(["report", str(run)], capsys, run, message="pass --force")
    assert main(["report", str(run), "--force"]) == 0
    out = tmp_path / "rep"
    out.mkdir()
    (out / "report.md").write_text("my own notes\n")
    _refused(["report", str(run), "--output", str(out), "--force"], capsys, out, message="not an earlier")
    # Beside a run's files is fine; inside the folders that hold its work (the adapter, checkpoints) is not.
    for part in ("adapter", "checkpoints"):
        _refused(["report", str(run), "--output", str(run / part), "--force"], capsys, run,
                 message=f"lies inside the input {run / part}")


def test_eval_output_may_sit_beside_a_run_but_not_inside_its_work(run, data_dir, capsys, tmp_path) -> None:
    args = ["eval", "--run", str(run), "--tasks", "BIOSSES", "--data-dir", str(data_dir), "--output"]
    _refused([*args, str(run / "adapter" / "eval.json")], capsys, run, message="lies inside the input")


def test_reproduce_and_demo_check_outputs_first(run, data_dir, capsys, tmp_path) -> None:
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "table.csv").write_text("a,b\n")
    _refused(["reproduce", "--model", "smollm2-135m", "--data-dir", str(data_dir), "--output", str(foreign)], capsys,
             foreign, message="did not write and is not empty")
    _refused(["reproduce", "--model", "smollm2-135m", "--data-dir", str(data_dir), "--output", str(run),
              "--run", str(run)], capsys, run.parent, message="is the input")
    _refused(["demo", "--data-dir", str(data_dir), "--output", str(run)], capsys, run,
             message="pass --force to replace it")
    _refused(["demo", "--data-dir", str(data_dir), "--output", str(foreign), "--force"], capsys, foreign,
             message="did not write")


HOLD = '''"""Hold the output argv[1] as a command does (outputs.writing) until stdin closes."""
import sys

from slmembed import outputs

with outputs.writing(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
'''


@pytest.fixture
def held(tmp_path):
    """``held(path)``: another process holding the output ``path`` (as a running command does); its PID."""
    (tmp_path / "hold.py").write_text(HOLD)
    procs = []

    def hold(path: Path) -> int:
        proc = subprocess.Popen([sys.executable, str(tmp_path / "hold.py"), str(path)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline() == "held\n"
        return proc.pid

    yield hold
    for proc in procs:
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0


def test_a_second_writer_is_refused_naming_the_holder(run, tiny_models, data_dir, capsys, tmp_path, held) -> None:
    """train, export, embed and reproduce refuse an output another slmembed process is writing, naming its PID,
    and touch nothing of it; once it is released, the output is theirs and no lock file is left behind."""
    texts = tmp_path / "texts.txt"
    texts.write_text("A man is playing a guitar.\n")
    new, model, vectors, results = tmp_path / "new" / "run", tmp_path / "model", tmp_path / "v.npy", tmp_path / "res"
    commands = {
        new: ["train", "--recipe", "smollm2-135m", "--data-dir", str(data_dir), "--set",
              f"model.name={tiny_models['llama']}", "--output", str(new)],
        run: ["train", "--recipe", "smollm2-135m", "--data-dir", str(data_dir), "--set",
              f"model.name={tiny_models['llama']}", "--output", str(run), "--force"],
        model: ["export", "--run", str(run), "--output", str(model), "--format", "hf"],
        vectors: ["embed", str(texts), "--model", "all-minilm-l6-v2", "--output", str(vectors)],
        results: ["reproduce", "--model", "smollm2-135m", "--data-dir", str(data_dir), "--output", str(results),
                  "--run", str(tmp_path / "rrun")],
    }
    for output, args in commands.items():
        pid = held(output)
        _refused(args, capsys, run.parent, tmp_path, message=f"{output} is being written by another slmembed "
                 f"process (PID {pid}); wait for it or choose another output")
    # A run the holder has begun writing looks like an earlier run: the refusal still names the writer.
    started = tmp_path / "started"
    pid = held(started)
    started.mkdir()
    (started / "recipe.yaml").write_text("name: started\n")
    outputs.mark(started, "train", ["recipe.yaml"])
    _refused([*commands[new][:-1], str(started)], capsys, started, message=f"(PID {pid})")
    (tmp_path / "link").symlink_to(tmp_path)  # another spelling of the same output meets the same lock
    pid = held(tmp_path / "same")
    _refused([*commands[model][:-4], "--output", str(tmp_path / "link" / "same"), "--format", "hf"], capsys, tmp_path,
             message=f"(PID {pid})")


def test_the_lock_is_released_and_leaves_nothing(run, capsys, tmp_path, held) -> None:
    out = tmp_path / "a" / "model"
    assert main(["export", "--run", str(run), "--output", str(out), "--format", "hf"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]  # no lock file beside it
    held(tmp_path / "b" / "model")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [".model.lock"]


def test_the_next_writer_removes_the_temporaries_a_killed_export_left(run, tmp_path) -> None:
    """A killed export leaves its temporary folder (the model's size) beside the output: the next export of that
    output removes it, and only it (a folder of the same pattern without slmembed's marker stays)."""
    out = tmp_path / "model"
    code = f"""
import os, signal, sys
from slmembed import export
write = export.check_token_ids
def killed(folder, reference):
    write(folder, reference)
    os.kill(os.getpid(), signal.SIGKILL)
export.check_token_ids = killed
from slmembed.cli import main
sys.exit(main(["export", "--run", {str(run)!r}, "--output", {str(out)!r}, "--format", "hf"]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    left = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(left) == 1 and sum(f.stat().st_size for f in left[0].rglob("*") if f.is_file()) > 10_000
    (tmp_path / ".model.mine.tmp").mkdir()
    assert main(["export", "--run", str(run), "--output", str(out), "--format", "hf"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.mine.tmp", "model"]
