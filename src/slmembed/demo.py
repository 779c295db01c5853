"""The main job: STSBenchmark-test Spearman of an offline decoder before and after a short CPU fine-tune."""

from __future__ import annotations

import functools
import time
from pathlib import Path

from slmembed import outputs, train_output
from slmembed.config import Recipe, load_recipe, with_overrides
from slmembed.data.sts import load_all
from slmembed.spec import EmbedSpec


def demo(output: str | Path, recipe_name: str = "demo-smollm2", overrides: list[str] | None = None,
         data_dir: str | None = None, device: str = "auto", force: bool = False) -> dict:
    """Evaluate STSBenchmark test, train the demo recipe into ``output`` (an earlier demo there is replaced only
    with ``force``), evaluate again; return and print the figures. The output is checked and held (outputs.writing)
    before torch is imported."""
    recipe = with_overrides(load_recipe(recipe_name), overrides or [])
    check = functools.partial(train_output.check, recipe, output, data_dir=data_dir, resume=None, force=force)
    with outputs.writing(output, check):
        return _demo(recipe, output, data_dir=data_dir, device=device, force=force)


def _demo(recipe: Recipe, output: str | Path, *, data_dir: str | None, device: str, force: bool) -> dict:
    """``demo`` once its output is checked and held."""
    from slmembed.evaluate import evaluate
    from slmembed.loading import load_embedder
    from slmembed.train import train

    t0 = time.time()
    model, sets = recipe.model.name, load_all(["STSBenchmark"], data_dir)
    print(f"[demo] {model}: STSBenchmark test before training ...", flush=True)
    before = evaluate(load_embedder(model, **EmbedSpec.of(recipe.model).__dict__), sets)["average"]
    print(f"[demo] before: {before:.2f}", flush=True)
    summary = train(recipe, output, data_dir=data_dir, device=device, force=force)
    after = evaluate(load_embedder(None, adapter=output), sets)["average"]
    minutes = (time.time() - t0) / 60
    print(f"[demo] STSBenchmark test Spearman x100: before {before:.2f} -> after {after:.2f} "
          f"(gain {after - before:+.2f}); {summary['steps']} steps of {summary['batch_size']} triplets; "
          f"{minutes:.1f} min in all")
    return {"model": model, "before": before, "after": after, "gain": round(after - before, 2),
            "minutes": round(minutes, 2), "train": summary}
