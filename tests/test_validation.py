"""Every recipe value is checked before any work: through ``slmembed train`` a bad value of any field is exit code 2
and one error line naming the field, with no traceback and no files (no run folder, no model cache). ``--resume``
needs a run, and refuses a recipe that changes the run's result, naming the fields."""

from __future__ import annotations

import dataclasses
import json
import shutil
import typing
from pathlib import Path

import pytest
import torch
import yaml
from transformers import get_scheduler

from slmembed.cli import main
from slmembed.config import NOT_RESULT, SCHEDULES, Recipe, load_recipe, with_overrides
from slmembed.spec import EmbedSpec

# Bad values (YAML, as after --set) of every recipe field; test_every_field_has_bad_values keeps this complete.
NOT_INT, NOT_BOOL = ["1.5", "'8'", "true", "null"], ["2", "maybe", "null"]
BAD: dict[str, list[str]] = {
    "name": ["''", "[a]"],
    "model.name": ["''", "'  '", "null", "[smollm2-135m]"],
    "model.trust_remote_code": NOT_BOOL,
    "model.allow_pickle": NOT_BOOL,
    "model.pooling": ["max", "LAST", "''", "1"],
    "model.prompt": ["'no field'", "''", "'{} and {}'", "'{0}'", "'{name} {}'", "'{:>9}'", "'{!r}'", "'{'", "'{}}'",
                     "P4", "p1", "1"],
    "model.max_length": ["0", "1", "-5", *NOT_INT],
    "model.append_eos": NOT_BOOL,
    "model.attention": ["full", "Bidirectional", "''", "1", "true"],
    "lora.r": ["0", "-8", *NOT_INT],
    "lora.alpha": ["0", "-32", ".nan", *NOT_INT],
    "lora.dropout": ["-0.1", "1", "1.5", ".nan", ".inf", "true", "x"],
    "lora.targets": ["[]", "['']", "[q_proj, q_proj]", "q_proj", "[1]", "null"],
    "lora.layers": ["[]", "[1, 1]", "[a]", "[true]", "[1.5]", "3"],
    "train.lr": ["0", "-1e-3", ".nan", "nan", ".inf", "inf", "x", "true", "null"],
    "train.schedule": ["weird", "constant", "reduce_lr_on_plateau", "cosine_with_min_lr", "''", "1"],
    "train.warmup_steps": ["-1", ".inf", *NOT_INT],
    "train.batch_size": ["-8", "0", *NOT_INT],
    "train.epochs": ["0", "-1", *NOT_INT],
    "train.max_steps": ["0", "-5", "1.5", "true"],
    "train.temperature": ["-0.05", "0", ".nan", ".inf", "x", "true"],
    "train.loss": ["mse", "InfoNCE", "''", "1", "[infonce]", "guided_infonce"],  # the last without train.reference
    "train.angle_weight": ["-0.1", ".nan", ".inf", "x", "true", "0.1"],  # 0.1: a weight for another train.loss
    "train.angle_tau": ["0", "-20", ".nan", "x", "true", "5"],
    "train.finetune": ["partial", "LoRA", "''", "1", "null"],
    "train.hard_negatives": NOT_BOOL,
    "train.weight_decay": ["-0.1", ".nan", ".inf", "x", "true"],
    "train.bf16": NOT_BOOL,
    "train.chunk_tokens": ["0", "-1", *NOT_INT],
    "train.packing": ["auto", "1"],
    "train.packed_attention": ["fast", "FLEX", "flash", "''", "1", "true", "null"],
    "train.grad_cache": NOT_BOOL,
    "train.compile": NOT_BOOL,
    "train.cuda_graphs": NOT_BOOL,
    "train.kernels": ["liger-kernel", "Liger", "''", "1", "null"],
    "train.sharding": ["ddp", "FSDP", "''", "1", "null"],
    "train.matryoshka_dims": ["[]", "[0]", "[8, 8]", "8", "[1.5]", "[true]"],
    "train.matryoshka_weights": ["[]", "[0]", "[-1]", "[.nan]", "1", "[x]"],
    "train.reference": ["''", "'  '", "[]", "[x, x]", "['']", "1", "[1]", "recipe:", f"'recipe:x@{2**64}'",
                        "all-minilm-l6-v2"],  # last: for infonce
    "train.guide_margin": ["-0.1", ".nan", ".inf", "x", "true", "null", "0.1"],  # 0.1: for another train.loss
    "train.distill_weight": ["-1", ".nan", ".inf", "x", "true", "null", "0.5"],
    "train.distill_temperature": ["0", "-0.05", ".nan", ".inf", "x", "true", "null", "0.1"],
    "train.seed": ["-1", str(2**64), *NOT_INT],
    "train.save_every": ["0", "-1", *NOT_INT],
    "train.keep_checkpoints": ["0", *NOT_INT],
    "train.log_every": ["0", *NOT_INT],
    "train.dev_every": ["0", "-1", "1.5", "true"],
    "train.select": ["best", "first", "''", "1", "null"],
    "train.average_last": ["0", "-1", *NOT_INT],
    "data.sources": ["[]", "['']", "[nli, nli]", "nli", "[1]", "null"],
    "data.max_triplets": ["0", "-1", "1.5", "true"],
    "data.skip_bad_rows": NOT_BOOL,
    "data.pairing": ["every", "KTH", "''", "1", "null"],
    "data.neutral_negatives": NOT_BOOL,
    "data.entailment_pairs": NOT_BOOL,
    "adapt.mntp_steps": ["-1", "1.5", "x", "true", "null"],
    "adapt.mntp_mask": ["0", "1", "-0.2", ".nan", "x", "true"],
    "adapt.mntp_batch": ["0", "-1", "1.5", "true"],
    "adapt.mntp_lr": ["0", "-1e-4", ".nan", ".inf", "x", "true"],
    "adapt.simcse_steps": ["-1", "1.5", "x", "true", "null"],
    "adapt.simcse_batch": ["1", "0", "1.5", "true"],
    "adapt.simcse_lr": ["0", "-3e-5", ".nan", "x", "true"],
    "adapt.simcse_dropout": ["1", "-0.1", ".nan", "x", "true"],
    "adapt.r": ["0", "-16", "1.5", "true"],
    "adapt.alpha": ["0", "-32", "1.5", "true"],
    "soup.seeds": ["[]", "[1]", "[3, 3]", "[-1, 2]", f"[1, {2**64}]", "[1.5, 2]", "[true, 2]", "3"],
    "soup.greedy": [*NOT_BOOL, "true"],  # true: without soup.seeds
}
CASES = [(path, value) for path, values in BAD.items() for value in values]


def _paths(cls: type = Recipe, prefix: str = "") -> list[str]:
    """The dotted path of every field of the recipe, section by section."""
    out = []
    for name, hint in typing.get_type_hints(cls).items():
        out += _paths(hint, f"{prefix}{name}.") if dataclasses.is_dataclass(hint) else [prefix + name]
    return out


def _files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*"))


def _one_error_line(capsys) -> str:
    """The only line of stderr, which must be an slmembed error, with no traceback anywhere."""
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and err.count("\n") == 1 and err.startswith("slmembed: error: "), err
    return err


def test_every_field_has_bad_values() -> None:
    assert sorted(BAD) == sorted(_paths()) and set(NOT_RESULT) <= set(_paths())


@pytest.mark.parametrize("via", ["set", "file"])
@pytest.mark.parametrize("path, value", CASES)
def test_bad_value_is_one_line_exit_2_and_no_files(path: str, value: str, via: str, tmp_path, monkeypatch,
                                                   capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLMEMBED_CACHE", str(tmp_path / "cache"))  # loading the model would create it
    config, where, extra = "smollm2-135m", "recipe (with overrides)", ["--set", f"{path}={value}"]
    if via == "file":
        config = where = str(tmp_path / "recipe.yaml")
        *section, key = path.split(".")
        tree = {key: yaml.safe_load(value)}
        Path(config).write_text(yaml.safe_dump({section[0]: tree} if section else tree))
        extra = []
    assert main(["train", "--recipe", config, "--output", str(tmp_path / "run"), *extra]) == 2
    assert _one_error_line(capsys).startswith(f"slmembed: error: {where}: {path}")
    assert _files(tmp_path) == ([Path(config)] if via == "file" else [])


GOOD = [("train.lr", "1e-3", 1e-3), ("train.lr", "5e-5", 5e-5), ("train.max_steps", "null", None),
        ("train.warmup_steps", "0", 0), ("train.weight_decay", "0", 0.0), ("train.seed", "0", 0),
        ("train.schedule", "inverse_sqrt", "inverse_sqrt"), ("train.packing", "null", None),
        ("lora.dropout", "0", 0.0), ("lora.layers", "[-1, 0]", [-1, 0]), ("lora.targets", "[q_proj]", ["q_proj"]),
        ("model.max_length", "2", 2), ("model.pooling", "mean", "mean"), ("model.prompt", "P1", "P1"),
        ("model.prompt", "'Query: {}'", "Query: {}"), ("model.prompt", "'{{x}} {} means'", "{{x}} {} means"),
        ("data.sources", "[nli, lingnli]", ["nli", "lingnli"]), ("data.max_triplets", "1", 1),
        ("train.loss", "symmetric_infonce", "symmetric_infonce"), ("train.packed_attention", "flex", "flex")]


@pytest.mark.parametrize("path, value, expected", GOOD)
def test_good_values_load(path: str, value: str, expected: object) -> None:
    section, key = path.split(".")
    recipe = with_overrides(load_recipe("smollm2-135m"), [f"{path}={value}"])
    assert getattr(getattr(recipe, section), key) == expected
    spec = EmbedSpec.of(recipe.model)  # what the embedder accepts
    assert spec.template.format("TEXT").count("TEXT") == 1


def test_good_values_pass_the_cli_and_reach_the_data(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLMEMBED_DATA", str(tmp_path / "no-data"))
    args = [item for path, value, _ in GOOD for item in ("--set", f"{path}={value}")]
    assert main(["train", "--recipe", "smollm2-135m", "--output", str(tmp_path / "run"), *args]) == 2
    assert "no-data is not a directory" in _one_error_line(capsys) and _files(tmp_path) == []


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_accepted_schedule_runs_as_train_calls_it_and_warms_up(name: str) -> None:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=2, num_training_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[:3] == [0.0, 0.5, 1.0], lrs


def _run(tmp_path: Path, data_dir: Path, *extra: str) -> int:
    return main(["train", "--recipe", str(tmp_path / "recipe.yaml"), "--output", str(tmp_path / "run"),
                 "--data-dir", str(data_dir), "--device", "cpu", *extra])


@pytest.mark.parametrize("state", ["missing", "empty", "no recipe.yaml"])
def test_resume_needs_a_run(state: str, tmp_path, data_dir, capsys) -> None:
    (tmp_path / "recipe.yaml").write_text(Recipe().to_yaml())
    if state != "missing":
        (tmp_path / "run").mkdir()
    if state == "no recipe.yaml":
        (tmp_path / "run" / "checkpoints").mkdir()
    before = _files(tmp_path)
    assert _run(tmp_path, data_dir, "--resume") == 2
    err = _one_error_line(capsys)
    assert str(tmp_path / "run") in err and ("holds no run" in err or state == "no recipe.yaml"), err
    assert _files(tmp_path) == before


def test_resume_refuses_result_changes_naming_them_and_allows_the_rest(tmp_path, tiny_models, data_dir,
                                                                       capsys) -> None:
    recipe = Recipe()
    recipe.model.name, recipe.model.max_length = str(tiny_models["llama"]), 32
    recipe.data.sources, recipe.data.max_triplets = ["cad_snli"], 32
    for key, value in {"batch_size": 8, "max_steps": 4, "warmup_steps": 1, "lr": 1e-3, "save_every": 2,
                       "bf16": False, "log_every": 1}.items():
        setattr(recipe.train, key, value)
    (tmp_path / "recipe.yaml").write_text(recipe.to_yaml())
    run = tmp_path / "run"
    assert _run(tmp_path, data_dir) == 0
    capsys.readouterr()
    (run / "summary.json").unlink()  # as a run killed after its checkpoint at step 2 leaves it (a finished one refuses)
    snapshot = {p: p.read_bytes() for p in _files(run) if p.is_file()}

    assert _run(tmp_path, data_dir, "--resume", "--set", "train.lr=5e-4", "--set", "lora.targets=[q_proj]") == 2
    err = _one_error_line(capsys)
    assert "train.lr: 0.001 -> 0.0005" in err and 'lora.targets: ["q_proj", "v_proj"] -> ["q_proj"]' in err, err
    assert {p: p.read_bytes() for p in _files(run) if p.is_file()} == snapshot  # untouched

    changes = ["train.log_every=2", "train.save_every=1", "train.keep_checkpoints=3", "train.chunk_tokens=64",
               "train.grad_cache=true", "train.packing=false", "name=renamed"]
    assert _run(tmp_path, data_dir, "--resume", *(a for c in changes for a in ("--set", c))) == 0
    assert "resumed from step 2" in capsys.readouterr().out

    # A run killed before its first checkpoint has recipe.yaml and nothing to continue: it restarts at step 0.
    for name in ("checkpoints", "adapter"):
        shutil.rmtree(run / name)
    (run / "summary.json").unlink()
    assert _run(tmp_path, data_dir, "--resume") == 0
    log = (run / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3, 4]
