"""The command line: JSON output of eval, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slmembed.cli import main
from slmembed.errors import SlmembedError


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
    (["train", "--recipe", "minicpm-2b", "--output", "x"], "--trust-remote-code"),
    (["train", "--recipe", "no-such-recipe", "--output", "x"], "no recipe"),
    (["eval", "--model", "all-minilm-l6-v2", "--device", "cuda"], "no CUDA GPU"),
    (["train", "--recipe", "demo-smollm2", "--output", "x", "--device", "cuda"], "no CUDA GPU"),
    (["train", "--recipe", "demo-smollm2", "--output", "x", "--set", "model.name=no-such-model", "--set",
      "data.sources=[cad_snli]"], "unknown model 'no-such-model'"),
    (["train", "--recipe", "demo-smollm2", "--output", "x", "--data-dir", "/no/such/dir"],
     "/no/such/dir does not exist"),
    (["reproduce", "--model", "smollm2-135m", "--output", "x", "--data-dir", "/no/such/dir"],
     "/no/such/dir does not exist"),
    (["train", "--recipe", "demo-smollm2", "--output", "x", "--set", "train.batch_size=abc"],
     "train.batch_size: expected int, got 'abc'"),
    (["train", "--recipe", "demo-smollm2", "--output", "x", "--set", "train.batch=8"], "no field 'train.batch'"),
    # demo takes its recipe as train does: the same checks, before any model loads
    (["demo", "--output", "x", "--set", "model.trust_remote_code=true"], "pass --trust-remote-code to allow it"),
    (["demo", "--output", "x", "--set", "model.allow_pickle=true"], "loads pickle weights, which can run code"),
    (["demo", "--output", "x", "--device", "cuda"], "no CUDA GPU"),
    (["demo", "--output", "x", "--set", "train.batch=8"], "no field 'train.batch'"),
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
    assert main(["train", "--recipe", str(tmp_path / "recipe.yaml"), "--output", str(tmp_path / "run")]) == 2
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
                ["train", "--recipe", "demo-smollm2", "--output", str(out), "--set", f"model.name={folder}",
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
    args = ["train", "--recipe", "demo-smollm2", "--output", str(tmp_path / "run"), "--device", "cpu",
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
    (["serve", "--model", "m", "--port", "70000"],
     "argument --port: expected a whole number from 1 to 65535, got '70000'"),
    (["serve", "--model", "m", "--max-queue", "0"], "argument --max-queue: expected a whole number >= 1"),
    (["serve", "--model", "m", "--read-timeout", "0"],
     "argument --read-timeout: expected a number of seconds > 0, got '0'"),
    (["serve", "--model", "m", "--request-timeout", "nan"],
     "argument --request-timeout: expected a number of seconds > 0"),
    (["serve", "--run", "a="], "argument --run: expected [NAME=]RUN, a training run folder after '=', got 'a='"),
    (["serve", "--run", " =runs/a"], "argument --run: expected a non-blank name"),
    (["serve", "--model", "m", "--run", "runs/a"], "argument --run: not allowed with argument --model"),
    (["export", "--output", "o"], "the following arguments are required: --run (see slmembed export --help)"),
    (["train", "--output", "o"], "the following arguments are required: --recipe (see slmembed train --help)"),
    (["embed", "in.txt", "--output", "o.npy"], "one of the arguments --model --run is required"),
    (["reproduce", "--model", "m", "--output", "o", "--curve", "-1"], "argument --curve: expected a whole number >= 0"),
    (["train", "--recipe", "smollm2-135m"], "the following arguments are required: --output"),
    (["no-such-command"], "invalid choice: 'no-such-command'"),
    (["train", "--recipe", "demo-smollm2", "--output", "x", "--profile", "20"], "expected FIRST:COUNT"),
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
    assert cli._load_model(args, ".") == ("the embedder", "my-model")


@pytest.mark.parametrize("old, new", [
    (["train", "--config", "r", "--output", "o"], ["train", "--recipe", "r", "--output", "o"]),
    (["eval", "--adapter", "runs/a", "--adapter", "runs/b"], ["eval", "--run", "runs/a", "--run", "runs/b"]),
    (["export", "--adapter", "runs/a", "--output", "o"], ["export", "--run", "runs/a", "--output", "o"]),
    (["reproduce", "--model", "m", "--output", "o", "--run-dir", "runs/a"],
     ["reproduce", "--model", "m", "--output", "o", "--run", "runs/a"]),
])
def test_old_spellings_parse_as_the_new_ones_after_one_note(old, new, capsys) -> None:
    from slmembed.cli import parser

    assert parser().parse_args(old) == parser().parse_args(new)
    was, now = next(a for a in old if a not in new), next(a for a in new if a not in old)
    assert capsys.readouterr().err == f"slmembed: note: {was} is deprecated; use {now}\n"  # once, however often


def _fake_run(folder):
    (folder / "adapter").mkdir(parents=True)
    return folder


def test_embed_model_naming_a_run_loads_it_as_run_after_a_note(tmp_path, monkeypatch, capsys) -> None:
    from slmembed import cli

    run_dir, texts = _fake_run(tmp_path / "run"), tmp_path / "in.txt"
    texts.write_text("a text\n")
    loaded = []

    def load(args, model=None, run_dir=None):
        loaded.append((model, run_dir))
        raise SlmembedError("stop here")

    monkeypatch.setattr(cli, "_load_model", load)
    for flag in ("--run", "--model"):
        assert main(["embed", str(texts), "--output", str(tmp_path / "o.npy"), flag, str(run_dir)]) == 2
    assert loaded == [(None, str(run_dir))] * 2
    assert capsys.readouterr().err == ("slmembed: error: stop here\n"
                                       "slmembed: note: --model with a training run folder is deprecated; use --run\n"
                                       "slmembed: error: stop here\n")


@pytest.mark.parametrize("args, model, runs, note", [
    (["--model", "m"], "m", [], False),
    (["--run", "a=runs/x", "--run", "runs/y"], None, [("a", "runs/x"), (None, "runs/y")], False),
    (["m"], "m", [], True),  # the positional MODEL of before
    (["RUN"], None, [(None, "RUN")], True),
    (["RUN", "runs/y"], None, [(None, "RUN"), (None, "runs/y")], True),
])
def test_serve_takes_a_model_or_named_runs(args, model, runs, note, tmp_path, capsys) -> None:
    from slmembed.cli import _serve_what, parser

    run_dir = str(_fake_run(tmp_path / "run"))
    args = [run_dir if a == "RUN" else a for a in args]
    got = _serve_what(parser().parse_args(["serve", *args]))
    assert got == (model, [(name, Path(run_dir if p == "RUN" else p)) for name, p in runs])
    assert capsys.readouterr().err == ("slmembed: note: serve MODEL is deprecated; use --model MODEL, or --run RUN "
                                       "for a training run (repeatable)\n" if note else "")


def test_serve_run_names_are_given_or_the_folders(tmp_path, monkeypatch) -> None:
    """``--run NAME=RUN`` serves the run under NAME, else under its folder's name; a folder whose name holds '='
    is taken whole."""
    from slmembed import adapters, cli

    folders = [_fake_run(tmp_path / name) for name in ("a", "lr=1e-4")]
    pools = []
    monkeypatch.setattr(adapters, "AdapterPool", lambda runs, **kwargs: pools.append(runs))
    monkeypatch.setattr(cli, "_load_model", lambda args, model=None, run_dir=None: ("embedder", Path(run_dir).name))
    monkeypatch.setattr(cli, "_loading", lambda args: {})

    def served(*runs: str):
        args = cli.parser().parse_args(["serve", *(a for run in runs for a in ("--run", run))])
        return cli._served(args, *cli._serve_what(args))

    served(f"first={folders[0]}", str(folders[1]))
    assert pools == [{"first": folders[0], "lr=1e-4": folders[1]}]
    assert served(str(folders[1])).names == ["lr=1e-4"] and served(f"one={folders[1]}").names == ["one"]
    args = cli.parser().parse_args(["serve", "--run", f"one={folders[0]}", "--name", "two"])
    with pytest.raises(SlmembedError, match="--name and --run one=... both name the model"):
        cli._served(args, *cli._serve_what(args))


def test_demo_scores_as_eval_does(tmp_path, tiny_models) -> None:
    """demo's "before" and "after" are eval's scores of the recipe's model and of the run demo trained: both load
    their models as eval does (--device, dtype, what may run)."""
    tiny, out = str(tiny_models["llama"]), tmp_path / "demo"
    recipe = [f"model.name={tiny}", "model.max_length=150", "data.sources=[cad_snli]", "data.max_triplets=64",
              "train.max_steps=2", "train.batch_size=8", "train.warmup_steps=0", "train.bf16=false"]
    assert main(["demo", "--output", str(out), "--device", "cpu", *(a for s in recipe for a in ("--set", s))]) == 0
    demo = json.loads((out / "demo.json").read_text())
    for args, key in ((["--model", tiny], "before"), (["--run", str(out)], "after")):
        scores = tmp_path / f"{key}.json"
        assert main(["eval", *args, "--tasks", "STSBenchmark", "--device", "cpu", "--output", str(scores)]) == 0
        assert demo[key] == json.loads(scores.read_text())["average"]
    assert demo["before"] != demo["after"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A tiny random BERT (an encoder: its tokenizer has no EOS token, its layers are query/key/value/dense and it
    cannot run packed batches), without sentence-transformers modules."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from slmembed import models

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(models.resolve("all-minilm-l6-v2"))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


TINY_TRAIN = ["--set", "data.sources=[cad_snli]", "--set", "data.max_triplets=64", "--set", "train.max_steps=1",
              "--set", "train.batch_size=8", "--set", "train.bf16=false", "--device", "cpu"]


@pytest.mark.parametrize("args, message", [
    (["eval", "--tasks", "BIOSSES"], "tiny-bert0: append_eos needs an EOS token, and its tokenizer has none: set "
                                     "model.append_eos=false"),
    (["train", "--set", "model.append_eos=false"], "lora.targets: none of q_proj, k_proj, v_proj, o_proj, gate_proj, "
                                                   "up_proj, down_proj is a module of this bert model; its linear "
                                                   "layers are dense, key, query, value"),
    (["train", "--set", "model.append_eos=false", "--set", "lora.targets=[query,value]", "--set",
      "train.packing=true"], "train.packing=true, but this model cannot run packed batches: its architecture 'bert' "
                             "is not one of gemma, gemma3_text, llama, mistral, phi, qwen2; set train.packing=null"),
])
def test_settings_a_model_cannot_take_are_one_line_errors(args, message, tiny_bert, tmp_path, capsys) -> None:
    """What a model cannot do with the user's settings (no EOS to append, LoRA targets it lacks, packed batches)
    is one line naming the setting, exit code 2, no traceback."""
    if args[0] == "eval":
        args = [*args, "--model", str(tiny_bert), "--device", "cpu"]
    else:
        args = [*args, "--recipe", "demo-smollm2", "--output", str(tmp_path / "run"), "--set",
                f"model.name={tiny_bert}", *TINY_TRAIN]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("slmembed: error: ") and message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("argv", [["eval"], ["--help"]])
def test_the_command_leaves_its_objects_to_the_process_end(argv: list[str]) -> None:
    """`python -m slmembed` (and the console script, the same `entry`) freezes the collector's objects once the command
    is done, whether it returned an exit code or raised SystemExit, so that the interpreter's last collections skip
    them; the exit code is the command's own."""
    probe = ("import atexit, gc, runpy, sys; atexit.register(lambda: print('frozen', gc.get_freeze_count())); "
             f"sys.argv = ['slmembed', *{argv!r}]; runpy.run_module('slmembed', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == (2 if argv == ["eval"] else 0), proc.stderr
    frozen = int(proc.stdout.split("frozen ")[-1])
    assert frozen > 10_000  # the imported modules' objects, not a handful
    scripts = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'slmembed = "slmembed.cli:entry"' in scripts


def test_a_command_called_in_process_freezes_nothing() -> None:
    """`main`, which tests and other programs call in-process, leaves the collector alone."""
    import gc

    before = gc.get_freeze_count()
    assert main(["eval"]) == 2
    assert gc.get_freeze_count() == before
