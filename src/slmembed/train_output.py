"""Whether ``train`` may write a run into a folder: start one, continue one (``--resume``) or replace one
(``--force``), checked before any work.

No torch here: ``cli.py`` runs ``check`` before the heavy libraries load, so a refused output answers at once; train
runs it again while it holds the output (outputs.writing), where it decides.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from slmembed import outputs
from slmembed.config import Recipe, recipe_reference, result_changes
from slmembed.errors import SlmembedError
from slmembed.paths import find_data_dir
from slmembed.run import ADAPTER_CONFIG, PARTS, RunDir


def _check_resumable(run: RunDir, recipe: Recipe) -> None:
    """Refuse to resume a folder that holds no run (no recipe; a run without checkpoints restarts at step 0), a
    finished run, or with a recipe that changes the run's result (config.NOT_RESULT lists the fields that may
    change)."""
    if not run.recipe_file.is_file():
        raise SlmembedError(f"cannot resume {run.path}: it holds no run (no {run.recipe_file.name}); start one "
                            "without --resume")
    steps = run.finished()
    if steps is not None:
        raise SlmembedError(f"{run.path} is finished ({steps} steps); nothing to resume: pass --force instead of "
                            "--resume to train it again, or choose another folder")
    changes = result_changes(run.recipe(), recipe)
    if changes:
        raise SlmembedError(f"cannot resume {run.path} with a recipe that changes its result: {'; '.join(changes)}; "
                            f"resume with its {run.recipe_file.name}, or start a new run in another folder")


def _check_reference(source: str) -> None:
    """Refuse a ``train.reference`` that names a recipe (its run is trained by reproduce, first), or a folder which is
    missing, an unfinished run, or neither a run nor a model folder. Other names (packaged models, hub ids) are
    resolved where the reference loads (reference.py)."""
    if recipe_reference(source) is not None:
        raise SlmembedError(f"train.reference: {source} names a recipe, not a trained model: `slmembed reproduce` "
                            "trains its run first, or train it with `slmembed train` and give its run folder")
    path = Path(source).expanduser()
    if path.is_dir():
        run = RunDir(path)
        if outputs.written_by(path) == "train" and run.finished() is None:
            raise SlmembedError(f"train.reference: {path} is a training run that has not finished (no "
                                f"{run.summary_file.name}): give a finished run, or finish this one first")
        if not any(f.is_file() for f in (path / "config.json", run.embed_file, path / ADAPTER_CONFIG)):
            raise SlmembedError(f"train.reference: {path} is neither a model folder (no config.json) nor a finished "
                                f"training run (no {run.embed_file.name})")
    elif path.exists() or source.startswith(("/", ".", "~")) or source.count("/") > 1:
        raise SlmembedError(f"train.reference: {source} is not a folder; expected a model name, a model folder or a "
                            "finished training run")


def check(recipe: Recipe, run_dir: str | Path, *, data_dir: str | None = None, resume: bool | None = False,
          force: bool = False, trained_first: Collection[str] = ()) -> bool:
    """Check before any work that a run may be written to ``run_dir`` (outputs.py) and, with ``resume``, continued;
    True if an earlier run there is to be replaced. ``resume=None``: the caller has no way to continue a run.
    ``trained_first``: references that reproduce trains before this run (checked as runs of their own)."""
    run_dir = Path(run_dir)
    if recipe.soup.seeds is not None:
        raise SlmembedError(f"recipe {recipe.name} is a soup of {len(recipe.soup.seeds)} runs (soup.seeds): "
                            "`slmembed reproduce` trains and soups them; to train one run, --set soup.seeds=null"
                            + (" --set soup.greedy=false" if recipe.soup.greedy else ""))
    references = recipe.train.references
    for source in references:
        if source not in trained_first:
            _check_reference(source)
    replace = outputs.check_folder(run_dir, "train", inputs=[recipe.model.name, *recipe.data.sources, *references],
                                   around=[find_data_dir(data_dir, required=False)], force=force, resume=resume,
                                   keep=PARTS)
    if resume:
        _check_resumable(RunDir(run_dir), recipe)
    return replace and not resume
