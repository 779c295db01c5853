"""The main job: STSBenchmark-test Spearman of an offline decoder before and after a short CPU fine-tune."""

from __future__ import annotations

import time
from pathlib import Path

from slmembed.config import Recipe
from slmembed.data.sts import load_all
from slmembed.spec import EmbedSpec


def demo(recipe: Recipe, output: str | Path, loading: dict, *, data_dir: str | None, device: str,
         force: bool) -> dict:
    """Evaluate the recipe's model on STSBenchmark test, train the recipe into ``output`` (checked and held by the
    caller, as for ``train``), evaluate the run; return and print the figures. ``loading``: load_embedder's
    keywords (device, dtype, what may run), as ``eval`` loads a model."""
    t0 = time.time()
    model, sets = recipe.model.name, load_all(["STSBenchmark"], data_dir)  # bad data fails before torch loads
    from slmembed.evaluate import evaluate
    from slmembed.loading import load_embedder
    from slmembed.train import train

    print(f"[demo] {model}: STSBenchmark test before training ...", flush=True)
    before = evaluate(load_embedder(model, **loading, **EmbedSpec.of(recipe.model).__dict__), sets)["average"]
    print(f"[demo] before: {before:.2f}", flush=True)
    summary = train(recipe, output, data_dir=data_dir, device=device, force=force)
    after = evaluate(load_embedder(None, output, **loading), sets)["average"]
    minutes = (time.time() - t0) / 60
    print(f"[demo] STSBenchmark test Spearman x100: before {before:.2f} -> after {after:.2f} "
          f"(gain {after - before:+.2f}); {summary['steps']} steps of {summary['batch_size']} triplets; "
          f"{minutes:.1f} min in all")
    return {"model": model, "before": before, "after": after, "gain": round(after - before, 2),
            "minutes": round(minutes, 2), "train": summary}
