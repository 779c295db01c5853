"""`reproduce` end to end on a tiny model: before/after on all nine sets, a learning curve, the table and the plot."""

from __future__ import annotations

import json

from slmembed.config import Recipe
from slmembed.data.sts import TASKS
from slmembed.reproduce import reproduce


def test_reproduce_writes_json_table_plot_and_curve(tmp_path, tiny_models, data_dir) -> None:
    recipe = Recipe()
    recipe.model.name, recipe.model.max_length = str(tiny_models["llama"]), 32
    recipe.data.sources, recipe.data.max_triplets = ["cad_snli"], 64
    recipe.train.batch_size, recipe.train.max_steps, recipe.train.warmup_steps = 8, 6, 1
    recipe.train.bf16 = False
    out = tmp_path / "results" / "tiny"
    result = reproduce(recipe, out, tmp_path / "run", data_dir=str(data_dir), device="cpu", curve=2)
    saved = json.loads((out / "tiny.json").read_text())
    assert saved["before"]["scores"].keys() == saved["after"]["scores"].keys() == set(TASKS)
    assert saved["train"]["steps"] == 6 and saved["train"]["batch_size"] == 8 and saved["recipe"]["train"]["lr"] == 5e-5
    assert [p["step"] for p in saved["curve"]] == [2, 4, 6]
    assert saved["curve"][-1]["average"] == result["after"]["average"]
    assert -100 <= saved["after"]["stsb_dev"] <= 100
    assert (out / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| STSBenchmark |" in (out / "tiny.md").read_text()
