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
    (["train", "--config", "demo-smollm2", "--output", "x", "--device", "cuda"], "no CUDA GPU"),
    (["train", "--config", "demo-smollm2", "--output", "x", "--set", "model.name=no-such-model", "--set",
      "data.sources=[cad_snli]"], "unknown model 'no-such-model'"),
    (["train", "--config", "demo-smollm2", "--output", "x", "--data-dir", "/no/such/dir"],
     "/no/such/dir does not exist"),
    (["reproduce", "--model", "smollm2-135m", "--output", "x", "--data-dir", "/no/such/dir"],
     "/no/such/dir does not exist"),
    (["train", "--config", "demo-smollm2", "--output", "x", "--set", "train.batch_size=abc"],
     "train.batch_size: expected int, got 'abc'"),
    (["train", "--config", "demo-smollm2", "--output", "x", "--set", "train.batch=8"], "no field 'train.batch'"),
])
def test_errors_are_one_line_with_exit_code_2(args, message, capsys, tmp_path, monkeypatch) -> None:
    if "cuda" in args:
        pytest.importorskip("torch").cuda.is_available() and pytest.skip("a GPU is present")
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slmembed: error:") and message in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []  # no output folder or file


@pytest.mark.parametrize("yaml_text, message", [
    ("train:\n  lr: fast\n", "recipe.yaml: train.lr: expected float, got 'fast'"),
    ("train:\n  batch_size: 8.5\n", "train.batch_size: expected int, got 8.5"),
    ("lora:\n  targets: q_proj\n", "lora.targets: expected list[str], got 'q_proj'"),
    ("model: [smollm2-135m]\n", "recipe.yaml: model: expected a mapping"),
    ("lora:\n  rank: 4\n", "unknown field(s) rank"),
    ("train: {lr: 1e-3\n", "recipe.yaml:2: not valid YAML (expected ',' or '}', but got '<stream end>')"),
    ("train:\n  max_steps: [1\n", "not valid YAML"),
    ("- a list\n", "expected a mapping"),
    # A key given twice would silently keep the last; an empty file would train the defaults.
    ("train:\n  lr: 1e-4\n  lr: 2e-4\n", "recipe.yaml:3: not valid YAML (key 'lr' appears twice in one mapping "
                                       "(first on line 2))"),
    ("train:\n  lr: 1e-4\nmodel:\n  pooling: mean\ntrain:\n  epochs: 2\n",
     "recipe.yaml:5: not valid YAML (key 'train' appears twice in one mapping (first on line 1))"),
    ("# only a comment\n\n", "recipe.yaml: the recipe is empty; expected a mapping with some of the sections name, "
                            "model, lora, train, data"),
    ("", "recipe.yaml: the recipe is empty"),
])
def test_bad_recipe_files_are_one_line_errors(yaml_text, message, capsys, tmp_path) -> None:
    (tmp_path / "recipe.yaml").write_text(yaml_text)
    assert main(["train", "--config", str(tmp_path / "recipe.yaml"), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"slmembed: error: {tmp_path / 'recipe.yaml'}") and message in err and "\n" not in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("fixture, extra, message", [
    ("pickle_model", [], "pytorch_model.bin is a pickle checkpoint, which can run code when loaded"),
    ("remote_code_model", [], "--trust-remote-code"),
    ("pickle_model", ["--set", "model.allow_pickle=true"],
     "loads pickle weights, which can run code: pass --allow-pickle"),
])
def test_unsafe_models_are_refused(fixture, extra, message, request, capsys, tmp_path) -> None:
    """Pickle weights and a model's own code are refused by eval and train unless the user allows them."""
    folder = request.getfixturevalue(fixture)
    out = tmp_path / "out.json"
    commands = [["eval", "--model", str(folder), "--tasks", "STSBenchmark", "--output", str(out)],
                ["train", "--config", "demo-smollm2", "--output", str(out), "--set", f"model.name={folder}",
                 "--set", "data.sources=[cad_snli]", *extra]]
    capsys.readouterr()
    for args in commands[1:] if extra else commands:
        assert main([*args, "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("slmembed: error:") and message in err and "\n" not in err, err
        assert not out.exists()



def test_skip_bad_rows_flag_skips_and_reports(tmp_path, tiny_models, capsys) -> None:
    rows = [f"anchor {i},positive {i},negative {i}" for i in range(16)]
    rows[3], rows[9] = "only,two", "a,,c"
    (tmp_path / "t.csv").write_text("sent0,sent1,hard_neg\n" + "\n".join(rows) + "\n")
    args = ["train", "--config", "demo-smollm2", "--output", str(tmp_path / "run"), "--device", "cpu",
            "--set", f"model.name={tiny_models['llama']}", "--set", f"data.sources=['{tmp_path / 't.csv'}']",
            "--set", "train.max_steps=1", "--set", "train.batch_size=8", "--set", "train.bf16=false"]
    capsys.readouterr()
    assert main(args) == 2
    assert capsys.readouterr().err == f"slmembed: error: {tmp_path / 't.csv'}:5: expected 3 comma-separated columns " \
                                      "(sent0,sent1,hard_neg), got 2\n"
    assert main([*args, "--skip-bad-rows"]) == 0
    assert json.loads((tmp_path / "run" / "data.json").read_text())["skipped_rows"] == 2
    assert "14 used of 14 from 1 sources (0 duplicates dropped, 2 bad rows skipped)" in capsys.readouterr().out


def test_eval_compile_gives_the_same_scores(tmp_path, tiny_models, capsys) -> None:
    """``--compile`` (compiled blocks) changes the speed of encoding, not the scores."""
    scores = []
    for extra in ([], ["--compile"]):
        out = tmp_path / f"scores{len(extra)}.json"
        assert main(["eval", "--model", str(tiny_models["gemma"]), "--tasks", "BIOSSES", "--dtype", "float32",
                     "--output", str(out), *extra]) == 0
        scores.append(json.loads(out.read_text())["scores"]["BIOSSES"])
    assert scores[0] == pytest.approx(scores[1], abs=0.02)


@pytest.mark.parametrize("args, message", [
    (["eval", "--batch-size", "0"], "argument --batch-size: expected a whole number >= 1, got '0'"),
    (["eval", "--prompt", "no placeholder"], "argument --prompt: expected P1, P2, P3, PromptEOL, AnglE or a template"),
    (["eval", "--prompt", "{} and {}"], "argument --prompt: expected P1, P2, P3, PromptEOL, AnglE or a template"),
    (["eval", "--pooling", "max"], "argument --pooling: invalid choice: 'max'"),
    (["embed", "in.txt", "--model", "m", "--output", "o.npy", "--chunk-size", "-1"], "--chunk-size: expected a whole"),
    (["embed", "in.txt", "--model", "m", "--output", "o.npy", "--batch-size", "x"], "--batch-size: expected a whole"),
    (["serve", "m", "--port", "70000"], "argument --port: expected a whole number from 1 to 65535, got '70000'"),
    (["serve", "m", "--max-queue", "0"], "argument --max-queue: expected a whole number >= 1"),
    (["serve", "m", "--read-timeout", "0"], "argument --read-timeout: expected a number of seconds > 0, got '0'"),
    (["serve", "m", "--request-timeout", "nan"], "argument --request-timeout: expected a number of seconds > 0"),
    (["reproduce", "--model", "m", "--output", "o", "--curve", "-1"], "argument --curve: expected a whole number >= 0"),
    (["train", "--config", "smollm2-135m"], "the following arguments are required: --output"),
    (["no-such-command"], "invalid choice: 'no-such-command'"),
    (["train", "--config", "demo-smollm2", "--output", "x", "--profile", "20"], "expected FIRST:COUNT"),
])
def test_command_line_mistakes_are_one_line_with_exit_code_2(args, message, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith("slmembed: error:") and message in err and "\n" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_model_folder_given_as_dot_goes_by_its_folder_name(tmp_path, monkeypatch) -> None:
    """``slmembed serve .`` serves the model under its folder's name, not under an empty id."""
    import argparse

    from slmembed import cli, loading

    folder = tmp_path / "my-model"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.setattr(loading, "load_embedder", lambda *a, **k: "the embedder")
    args = argparse.Namespace(device="cpu", dtype="auto", trust_remote_code=False, allow_pickle=False, compile=False)
    assert cli._load_model(".", args) == ("the embedder", "my-model")
