"""A training run's folder: what it holds, and whether ``train`` may start, continue or replace a run there.

No torch here: ``cli.py`` runs ``check`` before the heavy libraries load, so a refused output answers at once; train
runs it again while it holds the output (outputs.writing), where it decides.
"""

from __future__ import annotations

import json
from pathlib import Path

from slmembed import outputs
from slmembed.config import Recipe, load_recipe, result_changes
from slmembed.errors import SlmembedError
from slmembed.paths import find_data_dir

# What a run folder holds (docs/training.md, "Train").
ENTRIES = ("adapter", "model", "checkpoints", "dev", "recipe.yaml", "embed.json", "train_log.jsonl", "data.json",
           "summary.json", "tensorboard", "profile", "reference.safetensors")


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders, oldest first."""
    return sorted((run_dir / "checkpoints").glob("step-*"))


def finished(run_dir: Path) -> int | None:
    """The steps of the finished run in ``run_dir`` (its summary.json, written last), or None."""
    try:
        return int(json.loads((run_dir / "summary.json").read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_resumable(run_dir: Path, recipe: Recipe) -> None:
    """Refuse to resume a folder that holds no run (no recipe.yaml; a run without checkpoints restarts at step 0), a
    finished run, or with a recipe that changes the run's result (config.NOT_RESULT lists the fields that may
    change)."""
    saved = run_dir / "recipe.yaml"
    if not saved.is_file():
        raise SlmembedError(f"cannot resume {run_dir}: it holds no run (no recipe.yaml); start one without --resume")
    steps = finished(run_dir)
    if steps is not None:
        raise SlmembedError(f"{run_dir} is finished ({steps} steps); nothing to resume: pass --force instead of "
                            "--resume to train it again, or choose another folder")
    changes = result_changes(load_recipe(saved), recipe)
    if changes:
        raise SlmembedError(f"cannot resume {run_dir} with a recipe that changes its result: {'; '.join(changes)}; "
                            "resume with its recipe.yaml, or start a new run in another folder")


def _check_reference(source: str) -> None:
    """Refuse a ``train.reference`` that names a folder which is missing, an unfinished run, or neither a run nor a
    model folder. Other names (packaged models, hub ids) are resolved where the reference loads (reference.py)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if outputs.written_by(path) == "train" and finished(path) is None:
            raise SlmembedError(f"train.reference: {path} is a training run that has not finished (no summary.json): "
                                "give a finished run, or finish this one first")
        if not any((path / name).is_file() for name in ("config.json", "embed.json", "adapter_config.json")):
            raise SlmembedError(f"train.reference: {path} is neither a model folder (no config.json) nor a finished "
                                "training run (no embed.json)")
    elif path.exists() or source.startswith(("/", ".", "~")) or source.count("/") > 1:
        raise SlmembedError(f"train.reference: {source} is not a folder; expected a model name, a model folder or a "
                            "finished training run")


def check(recipe: Recipe, run_dir: str | Path, *, data_dir: str | None = None, resume: bool | None = False,
          force: bool = False) -> bool:
    """Check before any work that a run may be written to ``run_dir`` (outputs.py) and, with ``resume``, continued;
    True if an earlier run there is to be replaced. ``resume=None``: the caller has no way to continue a run."""
    run_dir = Path(run_dir)
    references = recipe.train.references
    for source in references:
        _check_reference(source)
    replace = outputs.check_folder(run_dir, "train", inputs=[recipe.model.name, *recipe.data.sources, *references],
                                   around=[find_data_dir(data_dir, required=False)], force=force, resume=resume)
    if resume:
        _check_resumable(run_dir, recipe)
    return replace and not resume
