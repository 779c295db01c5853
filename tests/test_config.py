"""Recipes: the shipped YAML files load, carry the paper's hyperparameters, and bad input is named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmembed.config import Recipe, load_recipe, recipe_from_dict, result_changes, shipped_recipes, with_overrides
from slmembed.errors import SlmembedError

PAPER = {"minicpm-2b": "openbmb/MiniCPM-2B-dpo-bf16", "phi-2": "microsoft/phi-2", "gemma-2b": "google/gemma-2b-it"}


@pytest.mark.parametrize("name", shipped_recipes())
def test_every_recipe_loads_and_round_trips(name: str, tmp_path) -> None:
    recipe = load_recipe(name)
    (tmp_path / "r.yaml").write_text(recipe.to_yaml())
    assert load_recipe(tmp_path / "r.yaml") == recipe


@pytest.mark.parametrize("name", [*PAPER, "gemma-3-270m", "smollm2-135m"])
def test_paper_hyperparameters(name: str) -> None:
    r = load_recipe(name)
    assert (r.lora.r, r.lora.alpha, r.lora.dropout, r.lora.targets) == (8, 32, 0.1, ["q_proj", "v_proj"])
    assert (r.train.lr, r.train.schedule, r.train.warmup_steps, r.train.bf16) == (5e-5, "cosine", 100, True)
    assert (r.train.batch_size, r.train.temperature, r.model.max_length, r.train.epochs) == (60, 0.05, 150, 1)
    assert r.model.pooling == "last" and r.model.append_eos and r.train.hard_negatives
    if name in PAPER:
        assert r.model.name == PAPER[name]
    assert r.model.trust_remote_code == (name == "minicpm-2b")


def test_paper_code_recipe_differs_from_table_1_only_where_the_script_does() -> None:
    """train.sh: 4 x 7 triplets a step, 1000 steps, weight decay 1e-4, seed 7; everything else as Table 1."""
    table, code = load_recipe("minicpm-2b").to_dict(), load_recipe("minicpm-2b-paper-code").to_dict()
    differ = {f"{section}.{k}": (v, code[section][k]) for section, fields in table.items() if isinstance(fields, dict)
              for k, v in fields.items() if code[section][k] != v}
    assert differ == {"train.batch_size": (60, 28), "train.max_steps": (None, 1000),
                      "train.weight_decay": (0.0, 1e-4), "train.seed": (42, 7)}


@pytest.mark.parametrize("name,run", [("smollm2-135m-plus", "smollm2-135m-plus-4-epochs-r64-lr2e-3"),
                                      ("gemma-3-270m-plus", "gemma-3-270m-plus-full-5e-5-fixed-tokenizer")])
def test_best_recipes_are_the_measured_runs(name, run) -> None:
    """The shipped -plus recipes compute what the runs behind their README scores ran (speed fields aside)."""
    result = json.loads((Path(__file__).parents[1] / "results/reproduce" / run / f"{run}.json").read_text())
    assert result_changes(recipe_from_dict(result["recipe"]), load_recipe(name)) == []
    assert result["after"]["selected"]["chosen"] == "best"  # chosen on STSBenchmark dev


def test_wrong_type_unknown_field_and_bad_override(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: fast\n")
    with pytest.raises(SlmembedError, match=r"bad.yaml: train.lr: expected float, got 'fast'"):
        load_recipe(bad)
    bad.write_text("train:\n  batch_size: 6.5\n")
    with pytest.raises(SlmembedError, match=r"train.batch_size: expected int"):
        load_recipe(bad)
    bad.write_text("lora:\n  rank: 8\n")
    with pytest.raises(SlmembedError, match=r"unknown field\(s\) rank"):
        load_recipe(bad)
    with pytest.raises(SlmembedError, match="no recipe"):
        load_recipe("no-such-recipe")
    with pytest.raises(SlmembedError, match="no field"):
        with_overrides(load_recipe("gemma-2b"), ["train.nope=1"])
    with pytest.raises(SlmembedError, match=r"override 'model.prompt=\{\} is: ': not a YAML value"):
        with_overrides(load_recipe("gemma-2b"), ["model.prompt={} is: "])


@pytest.mark.parametrize("content, message", [
    (b"1: 2\n", "bad.yaml: unknown field(s) 1; expected adapt, data, lora, model, name, soup, train"),
    (b"name: \xff\n", "bad.yaml: cannot read it as UTF-8 text"),
    (b"train:\n  batch_size: -8\n", "bad.yaml: train.batch_size: expected an integer >= 1, got -8"),
])
def test_odd_files_are_named_errors(content: bytes, message: str, tmp_path) -> None:
    (tmp_path / "bad.yaml").write_bytes(content)
    with pytest.raises(SlmembedError) as info:
        load_recipe(tmp_path / "bad.yaml")
    assert str(info.value).startswith(f"{tmp_path}/{message}"), info.value


def test_defaults_pass_their_own_checks() -> None:
    assert recipe_from_dict(Recipe().to_dict()) == Recipe()


def test_overrides_and_yaml_floats_without_a_dot(tmp_path) -> None:
    r = with_overrides(load_recipe("gemma-2b"), ["train.lr=5e-4", "lora.layers=[-1, -2]", "model.prompt=P1"])
    assert (r.train.lr, r.lora.layers, r.model.prompt) == (5e-4, [-1, -2], "P1")
