"""The paper's experiment for one model: nine-set scores before training, train with a recipe, scores after.

Writes ``NAME.json`` (before, after, train summary, optional learning curve), ``NAME.md`` (a table) and ``NAME.png``
(grouped bars per task) into the output folder, whose name is NAME. The curve evaluates the checkpoints the run
keeps, as the nine-set average against the number of triplets seen.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from slmembed import outputs, plots, train_output
from slmembed.atomic import write_json, write_text
from slmembed.config import Recipe
from slmembed.data.sts import TASKS, load_all, load_sts
from slmembed.paths import find_data_dir
from slmembed.run import Checkpoint, RunDir
from slmembed.spec import EmbedSpec
from slmembed.tables import table

# torch and the modules built on it are imported by the functions that train and score, so that the outputs are
# checked and held before any of them loads.


def _state_scorer(recipe: Recipe, sets: dict, device: str):
    """``score(file)``: the nine-set result of the base model with a saved trained state (a checkpoint's or a dev
    snapshot's weights, tuning.py) put in."""
    from safetensors.torch import load_file

    from slmembed import tuning
    from slmembed.evaluate import evaluate
    from slmembed.loading import load_embedder
    from slmembed.models import resolve_device

    embedder = load_embedder(recipe.model.name, device=resolve_device(device),
                             trust_remote_code=recipe.model.trust_remote_code, allow_pickle=recipe.model.allow_pickle,
                             **EmbedSpec.of(recipe.model).__dict__)
    embedder.model = tuning.prepare(embedder.model, recipe).eval()

    def score(file: Path) -> dict:
        tuning.load_state(embedder.model, load_file(file), recipe)
        return evaluate(embedder, sets)

    return score


def _curve(recipe: Recipe, run_dir: Path, sets: dict, device: str, final: dict) -> list[dict]:
    """Nine-set average of every kept checkpoint, plus the final adapter."""
    score = _state_scorer(recipe, sets, device)
    points = []
    for ckpt in map(Checkpoint, RunDir(run_dir).checkpoints()):
        points.append({"step": ckpt.step, "triplets_seen": ckpt.step * final["batch_size"],
                       "average": score(ckpt.weights(recipe.train.finetune))["average"]})
    points.append({"step": final["steps"], "triplets_seen": final["triplets_seen"], "average": None})
    return points


def reproduce(recipe: Recipe, output: str | Path, run_dir: str | Path, *, data_dir: str | None = None,
              device: str = "auto", curve: int = 0, force: bool = False,
              provenance: Callable[[], dict] | None = None) -> dict:
    """Evaluate, train, evaluate; with ``curve`` > 0, keep that many evenly spaced checkpoints and score them.

    An unfinished run in ``run_dir`` with checkpoints is continued; ``force`` replaces an earlier run there instead,
    and earlier results in ``output``."""
    output, run_dir = Path(output), Path(run_dir)
    resume = _resumes(run_dir, force)
    with outputs.writing(output, lambda: _check(recipe, output, run_dir, data_dir=data_dir, force=force)), \
            outputs.writing(run_dir):
        return _reproduce(recipe, output, run_dir, data_dir=data_dir, device=device, curve=curve, force=force,
                          resume=resume, provenance=provenance)


def _resumes(run_dir: Path, force: bool) -> bool:
    """Whether ``reproduce`` continues the run in ``run_dir``: an unfinished one with checkpoints, without force."""
    run = RunDir(run_dir)
    return run.checkpoints_dir.exists() and run.finished() is None and not force


def _check(recipe: Recipe, output: str | Path, run_dir: str | Path, *, data_dir: str | None = None,
          force: bool = False) -> None:
    """Check before any work that ``reproduce`` may write its results to ``output`` and its run to ``run_dir``."""
    output, run_dir = Path(output), Path(run_dir)
    outputs.check_folder(output, "reproduce", inputs=[recipe.model.name, run_dir],
                         around=[find_data_dir(data_dir, required=False)], force=force)
    train_output.check(recipe, run_dir, data_dir=data_dir, resume=_resumes(run_dir, force) or None, force=force)


def _reproduce(recipe: Recipe, output: Path, run_dir: Path, *, data_dir: str | None, device: str, curve: int,
               force: bool, resume: bool, provenance: Callable[[], dict] | None) -> dict:
    """``reproduce`` once its outputs are checked and held."""
    from slmembed.evaluate import evaluate
    from slmembed.loading import load_embedder
    from slmembed.models import resolve_device
    from slmembed.train import train

    name = output.name
    sets = load_all(TASKS, data_dir)
    spec = EmbedSpec.of(recipe.model).__dict__
    before = evaluate(load_embedder(recipe.model.name, device=resolve_device(device),
                                    trust_remote_code=recipe.model.trust_remote_code,
                                    allow_pickle=recipe.model.allow_pickle, **spec), sets)
    print(f"[reproduce] {name} before: {before['average']:.2f} (seven-set {before['average_7']:.2f})", flush=True)
    summary = train(recipe, run_dir, data_dir=data_dir, device=device, resume=resume, force=force,
                    spaced_checkpoints=curve or None)
    tuned = load_embedder(None, adapter=run_dir, device=resolve_device(device),
                          trust_remote_code=recipe.model.trust_remote_code, allow_pickle=recipe.model.allow_pickle)
    after = evaluate(tuned, sets)
    # STSBenchmark dev, the only score meant for choosing between recipes (the nine test sets are not).
    after["stsb_dev"] = evaluate(tuned, {"dev": load_sts("STSBenchmark", data_dir, split="dev")})["average"]
    if "dev" in summary:  # the scores behind the run's selection (selection.py), also STSBenchmark dev only
        after["selected"] = {k: v for k, v in summary["dev"].items() if k != "scores"}
        if summary["dev"]["chosen"] != "last":  # reported beside the choice, never used for it
            after["last_weights"] = _state_scorer(recipe, sets, device)(RunDir(run_dir).snapshot(summary["steps"]))
    print(f"[reproduce] {name} after: {after['average']:.2f} (seven-set {after['average_7']:.2f})", flush=True)
    result = {"model": recipe.model.name, "recipe": recipe.to_dict(), "before": before, "after": after,
              "train": summary}
    if curve:
        points = _curve(recipe, run_dir, sets, device, summary)
        points[-1]["average"] = after["average"]
        result["curve"] = points
    if provenance is not None:  # how the result was made (cli.provenance), asked once the work is done
        result["run"] = provenance()
    output.mkdir(parents=True, exist_ok=True)
    outputs.mark(output, "reproduce", [f"{name}.json", f"{name}.md", f"{name}.png"])
    write_json(output / f"{name}.json", result)
    write_text(output / f"{name}.md", f"# {name}\n\n" + table({"before": before["scores"], "after": after["scores"]})
               + f"\n\nTrained {summary['steps']} steps of {summary['batch_size']} triplets in "
               f"{summary['minutes']:.1f} min on {summary['device']}.\n")
    plots.scores(output / f"{name}.png", name, before, after)
    return result

