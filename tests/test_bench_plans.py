"""The GPU queue's plans (bench/queue_gpu.sh) name shipped recipes and valid overrides, so that no device time is
lost to a typo: every line's --recipe loads and its --set fields apply, as `slmembed reproduce` would take them."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from slmembed.config import load_recipe, with_overrides

PLANS = sorted(p for p in (Path(__file__).resolve().parents[1] / "bench" / "plans").glob("quality-*.txt")
               if int(p.stem.removeprefix("quality-")) >= 7)  # 1-6: bench/reproduce_gpu.sh's NAME GPU ARGS


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.name)
def test_every_queued_run_is_a_valid_recipe_with_valid_overrides(plan: Path) -> None:
    names = []
    for line in plan.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, deps, *args = shlex.split(line)
        assert deps == "-" or all(d in names for d in deps.split(",")), f"{name}: a dependency queued after it"
        recipe = args[args.index("--recipe") + 1]
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        with_overrides(load_recipe(recipe), sets)  # raises SlmembedError on an unknown field or a bad value
        names.append(name)
    assert len(names) == len(set(names)) >= 1
