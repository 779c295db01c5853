"""The paper's experiment for one model: nine-set scores before training, train with a recipe, scores after.

Writes ``NAME.json`` (before, after, train summary, optional learning curve), ``NAME.md`` (a table) and ``NAME.png``
(grouped bars per task) into the output folder, whose name is NAME. The curve evaluates the checkpoints the run
keeps, as the nine-set average against the number of triplets seen.

A model made of several runs (composite.py) is built whole: a soup's "after" is the soup's, and the outputs also hold
each member's nine-set and STSBenchmark dev scores and the soup's choice; a student's record names its teachers' runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from slmembed import composite, outputs, plots
from slmembed.atomic import write_json, write_text
from slmembed.config import Recipe
from slmembed.data.sts import TASKS, load_all, load_sts
from slmembed.errors import SlmembedError
from slmembed.paths import find_data_dir
from slmembed.run import Checkpoint, RunDir
from slmembed.spec import EmbedSpec
from slmembed.tables import table

# torch and the modules built on it are imported by the functions that train and score, so that the outputs are
# checked and held before any of them loads.


def _state_scorer(recipe: Recipe, run_dir: Path, sets: dict, device: str):
    """``score(file)``: the nine-set result of the finished run's base model (the one its embed.json names: the
    adapted model in the run folder, after ``adapt`` stages) with a saved trained state (a checkpoint's or a dev
    snapshot's weights, tuning.py) put in."""
    from safetensors.torch import load_file

    from slmembed import tuning
    from slmembed.device import resolve_device
    from slmembed.evaluate import evaluate
    from slmembed.loading import load_embedder

    embedder = load_embedder(RunDir(run_dir).info().model, device=resolve_device(device),
                             trust_remote_code=recipe.model.trust_remote_code, allow_pickle=recipe.model.allow_pickle,
                             **EmbedSpec.of(recipe.model).__dict__)
    embedder.model = tuning.prepare(embedder.model, recipe).eval()

    def score(file: Path) -> dict:
        tuning.load_state(embedder.model, load_file(file), recipe)
        return evaluate(embedder, sets)

    return score


def _curve(recipe: Recipe, run_dir: Path, sets: dict, device: str, final: dict) -> list[dict]:
    """Nine-set average of every kept checkpoint, plus the final adapter."""
    score = _state_scorer(recipe, run_dir, sets, device)
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

    A recipe made of several runs (a soup, ``recipe:`` references: composite.py) has them built first inside
    ``run_dir``, and the "after" scores are those of the model they make. An unfinished run in ``run_dir`` with
    checkpoints is continued, finished parts are reused; ``force`` builds everything again, and replaces earlier
    results in ``output``."""
    output, run_dir = Path(output), Path(run_dir)
    build = composite.plan(recipe, run_dir)
    if curve and build.members:
        raise SlmembedError(f"--curve scores the checkpoints of one run; recipe {recipe.name} is a soup of "
                            f"{len(build.members)} runs (soup.seeds): leave --curve out")
    with outputs.writing(output, lambda: _check(build, output, data_dir=data_dir, force=force)), \
            outputs.writing(run_dir):
        return _reproduce(build, output, data_dir=data_dir, device=device, curve=curve, force=force,
                          provenance=provenance)


def _check(build: composite.Build, output: Path, *, data_dir: str | None = None, force: bool = False) -> None:
    """Check before any work that ``reproduce`` may write its results to ``output`` and its runs into the build's
    run folder."""
    outputs.check_folder(output, "reproduce", inputs=[build.recipe.model.name, build.path],
                         around=[find_data_dir(data_dir, required=False)], force=force)
    composite.check(build, data_dir=data_dir, force=force)


def _scores(embedder, sets: dict, data_dir: str | None) -> dict:
    """The nine-set result of ``embedder``, with its STSBenchmark dev score (``stsb_dev``), the only score meant for
    choosing between recipes (the nine test sets are not)."""
    from slmembed.evaluate import evaluate

    return {**evaluate(embedder, sets),
            "stsb_dev": evaluate(embedder, {"dev": load_sts("STSBenchmark", data_dir, split="dev")})["average"]}


def _reproduce(build: composite.Build, output: Path, *, data_dir: str | None, device: str, curve: int,
               force: bool, provenance: Callable[[], dict] | None) -> dict:
    """``reproduce`` once its outputs are checked and held."""
    from slmembed.device import resolve_device
    from slmembed.evaluate import evaluate
    from slmembed.loading import load_embedder

    name, recipe, run_dir = output.name, build.recipe, build.path
    sets = load_all(TASKS, data_dir)
    spec = EmbedSpec.of(recipe.model).__dict__
    loading = {"device": resolve_device(device), "trust_remote_code": recipe.model.trust_remote_code,
               "allow_pickle": recipe.model.allow_pickle}
    before = evaluate(load_embedder(recipe.model.name, **loading, **spec), sets)
    print(f"[reproduce] {name} before: {before['average']:.2f} (seven-set {before['average_7']:.2f})", flush=True)
    composite.build_parts(build, data_dir=data_dir, device=device, force=force)
    made = composite.build_one(build, data_dir=data_dir, device=device, force=force,
                               spaced_checkpoints=None if build.members else curve or None)
    if build.members:  # the soup scored its written folder, as eval loads it, on the nine sets and dev
        summary = RunDir(run_dir).summary()
        after = {**{k: v for k, v in made.items() if k not in ("model", "soup")}, "stsb_dev": made["soup"]["dev"]}
    else:
        summary = made
        after = _scores(load_embedder(None, adapter=run_dir, **loading), sets, data_dir)
    if "dev" in summary:  # the scores behind the run's selection (selection.py), also STSBenchmark dev only
        after["selected"] = {k: v for k, v in summary["dev"].items() if k != "scores"}
        if summary["dev"]["chosen"] != "last":  # reported beside the choice, never used for it
            last = RunDir(run_dir).snapshot(summary["steps"])
            after["last_weights"] = _state_scorer(recipe, run_dir, sets, device)(last)
    print(f"[reproduce] {name} after: {after['average']:.2f} (seven-set {after['average_7']:.2f})", flush=True)
    result = {"model": recipe.model.name, "recipe": recipe.to_dict(), "before": before, "after": after,
              "train": summary}
    if build.teachers:
        result["teachers"] = [{"reference": t.label, "run": str(t.path), "train": RunDir(t.path).summary()}
                              for t in build.teachers]
    if build.members:  # each member as eval loads it, and the soup's choice (made on STSBenchmark dev only)
        result["members"] = [{"seed": m.recipe.train.seed, "run": str(m.path), "train": RunDir(m.path).summary(),
                              **_scores(load_embedder(None, adapter=m.path, **loading), sets, data_dir)}
                             for m in build.members]
        result["soup"] = made["soup"]
    if curve:
        points = _curve(recipe, run_dir, sets, device, summary)
        points[-1]["average"] = after["average"]
        result["curve"] = points
    if provenance is not None:  # how the result was made (cli.provenance), asked once the work is done
        result["run"] = provenance()
    _write(output, result)
    return result


def _write(output: Path, result: dict) -> None:
    """The result as ``NAME.json``, a table (``NAME.md``) and a plot (``NAME.png``) in ``output``."""
    name, before, after, summary = output.name, result["before"], result["after"], result["train"]
    members = result.get("members", [])
    columns = {"before": before["scores"], **{f"seed {m['seed']}": m["scores"] for m in members},
               "soup" if members else "after": after["scores"]}
    trained = f"{summary['steps']} steps of {summary['batch_size']} triplets"
    if members:
        record = result["soup"]
        note = (f"{'Greedy' if record['greedy'] else 'Uniform'} soup of {', '.join(record['members'])}: STSBenchmark "
                f"dev {record['dev']:.2f} (members: "
                + ", ".join(f"seed {m['seed']} {m['stsb_dev']:.2f}" for m in members)
                + f"). Each run trained {trained} on {summary['device']}, "
                f"{sum(m['train']['minutes'] for m in members):.1f} min in all.")
    else:
        note = f"Trained {trained} in {summary['minutes']:.1f} min on {summary['device']}."
    output.mkdir(parents=True, exist_ok=True)
    outputs.mark(output, "reproduce", [f"{name}.json", f"{name}.md", f"{name}.png"])
    write_json(output / f"{name}.json", result)
    write_text(output / f"{name}.md", f"# {name}\n\n{table(columns)}\n\n{note}\n")
    plots.scores(output / f"{name}.png", name, before, after, members)
