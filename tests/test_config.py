"""Recipes: the YAML files in configs/ load, carry the paper's hyperparameters, and bad input is named."""

from __future__ import annotations

import pytest

from slmembed.config import CONFIG_DIR, load_recipe, with_overrides
from slmembed.errors import SlmembedError

PAPER = {"minicpm-2b": "openbmb/MiniCPM-2B-dpo-bf16", "phi-2": "microsoft/phi-2", "gemma-2b": "google/gemma-2b-it"}


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
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


def test_wrong_type_unknown_field_and_bad_override(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: fast\n")
    with pytest.raises(SlmembedError, match=r"bad.yaml.train.lr: expected float, got 'fast'"):
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


def test_overrides_and_yaml_floats_without_a_dot(tmp_path) -> None:
    r = with_overrides(load_recipe("gemma-2b"), ["train.lr=5e-4", "lora.layers=[-1, -2]", "model.prompt=P1"])
    assert (r.train.lr, r.lora.layers, r.model.prompt) == (5e-4, [-1, -2], "P1")
