"""A model made of several runs, as ``slmembed reproduce`` builds it from one recipe (``Build``):

* a soup (``soup.seeds``): one run of the recipe per seed (its ``train.seed`` set, its ``soup`` section dropped) in
  the run folder's ``members/seed-S/``, then their soup (soup.py: uniform, or greedy on STSBenchmark dev) written
  into the run folder itself;
* a student whose ``train.reference`` names recipes (``recipe:NAME`` or ``recipe:NAME@SEED``, config.py): each such
  recipe's run (a teacher, built the same way: it may be a soup, in ``teachers/NAME/``, or have teachers of its own)
  in the run folder's ``teachers/NAME-seedS/`` first, then the student with those entries replaced by the teachers'
  run folders.

The folders are RunDir's (``member``, ``teacher``); train and soup keep them when they write the model beside them
(run.PARTS). ``plan`` reads every recipe and ``check`` every output before any model loads. A part that finished is
reused as it is (a training run only if its recipe computes what the plan's does), an unfinished one with
checkpoints continues; ``force`` builds every part again.

No torch here: train and soup are imported where the parts are built.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from slmembed import outputs, soup, train_output
from slmembed.config import Recipe, load_recipe, recipe_reference, result_changes, with_overrides
from slmembed.data.sts import TASKS
from slmembed.errors import SlmembedError
from slmembed.paths import find_data_dir
from slmembed.run import PARTS, RunDir


@dataclass(frozen=True)
class Build:
    """What is built into ``path``: one training run of ``recipe`` (its ``recipe:`` references replaced by the
    ``teachers``' run folders, which are built first), or, with ``members``, their soup. ``label`` says what asked
    for it (``recipe:NAME@SEED``, ``seed S``)."""

    recipe: Recipe
    path: Path
    label: str
    teachers: tuple[Build, ...] = ()
    members: tuple[Build, ...] = ()

    def resumes(self, force: bool) -> bool:
        """Whether training continues an unfinished run here: one with checkpoints, without force."""
        run = RunDir(self.path)
        return not self.members and run.checkpoints_dir.exists() and run.finished() is None and not force

    def reused(self, force: bool) -> bool:
        """Whether a finished run here is used as it is (a part, without force)."""
        return not force and RunDir(self.path).finished() is not None


def _recipe_name(name: str) -> str:
    """A recipe's name for its teacher folder: a shipped recipe's name, a YAML file's name without the suffix."""
    return Path(name).name.removesuffix(".yaml").removesuffix(".yml")


def plan(recipe: Recipe, path: str | Path, label: str = "", within: tuple[str, ...] = ()) -> Build:
    """What building ``recipe`` into ``path`` takes, read before any work (``within``: the recipes that led here by
    their references, which it may not name again). Recipes that do not load, name themselves or ask for a seed of a
    soup are one-line errors."""
    run = RunDir(path)
    teachers, sources = [], []
    for source in recipe.train.references:
        named = recipe_reference(source)
        if named is None:
            sources.append(source)
            continue
        name, seed = named
        if _recipe_name(name) in within:
            raise SlmembedError(f"train.reference: {source}: the recipe is its own reference ({' -> '.join(within)} "
                                f"-> {_recipe_name(name)}); name another recipe or a run")
        try:
            teacher = load_recipe(name)
        except SlmembedError as exc:
            raise SlmembedError(f"train.reference: {source}: {exc}") from None
        if seed is not None and teacher.soup.seeds is not None:
            raise SlmembedError(f"train.reference: {source}: {name} is a soup of the seeds {teacher.soup.seeds}; "
                                f"name it without @{seed}")
        if teacher.model.trust_remote_code and not recipe.model.trust_remote_code:
            raise SlmembedError(f"train.reference: {source}: recipe {teacher.name} runs the model's own code: pass "
                                "--trust-remote-code to allow it")
        if teacher.soup.seeds is None:
            seed = teacher.train.seed if seed is None else seed
        # The user's permissions, as the command line gave them to the recipe that names this one.
        teacher = with_overrides(teacher, [f"model.allow_pickle={recipe.model.allow_pickle}",
                                           f"model.trust_remote_code={recipe.model.trust_remote_code}",
                                           *([] if seed is None else [f"train.seed={seed}"])])
        teachers.append(plan(teacher, run.teacher(_recipe_name(name), seed), source,
                             (*within, _recipe_name(name))))
        sources.append(str(teachers[-1].path))
    if teachers:
        reference = sources[0] if isinstance(recipe.train.reference, str) else sources
        recipe = with_overrides(recipe, [f"train.reference={json.dumps(reference)}"])
    members = tuple(plan(with_overrides(recipe, [f"train.seed={seed}", "soup.seeds=null", "soup.greedy=false"]),
                         run.member(seed), f"seed {seed}")
                    for seed in recipe.soup.seeds or ())
    return Build(recipe, Path(path), label, tuple(teachers), members)


def check(build: Build, *, data_dir: str | None, force: bool, part: bool = False,
          trained_first: tuple[str, ...] = ()) -> None:
    """Check before any work that every run of ``build`` may be written (or reused, or continued); ``part``: the
    build is a teacher or member, reused if it finished; ``trained_first``: the run folders of teachers built before
    it (by the builds it is part of)."""
    if part and build.reused(force):
        if not build.members:
            changes = result_changes(RunDir(build.path).recipe() or Recipe(), build.recipe)
            if changes:
                raise SlmembedError(f"{build.path} ({build.label}) finished with a recipe that computes another "
                                    f"result: {'; '.join(changes)}; pass --force to train it again")
        return
    trained_first = (*trained_first, *(str(t.path) for t in build.teachers))
    for sub in (*build.teachers, *build.members):
        check(sub, data_dir=data_dir, force=force, part=True, trained_first=trained_first)
    if build.members:
        outputs.check_folder(build.path, soup.COMMAND, inputs=[build.recipe.model.name],
                             around=[find_data_dir(data_dir, required=False)], force=force, keep=PARTS)
    else:
        train_output.check(build.recipe, build.path, data_dir=data_dir, resume=build.resumes(force) or None,
                           force=force, trained_first=trained_first)


def build_parts(build: Build, *, data_dir: str | None, device: str, force: bool) -> None:
    """Build the teachers and members of ``build`` (each whole, unless it is reused), not ``build`` itself."""
    for sub in (*build.teachers, *build.members):
        if not sub.reused(force):
            build_parts(sub, data_dir=data_dir, device=device, force=force)
            build_one(sub, data_dir=data_dir, device=device, force=force)


def build_one(build: Build, *, data_dir: str | None, device: str, force: bool,
              spaced_checkpoints: int | None = None) -> dict:
    """Train ``build``'s run, or soup its members (built already); its summary, or the soup's result (soup.py)."""
    if build.members:
        model = build.recipe.model
        print(f"[reproduce] soup of {len(build.members)} runs into {build.path}", flush=True)
        return soup.soup([m.path for m in build.members], build.path, greedy=build.recipe.soup.greedy, tasks=TASKS,
                         data_dir=data_dir, device=device, force=force, trust_remote_code=model.trust_remote_code,
                         allow_pickle=model.allow_pickle)
    from slmembed.train import train  # torch: once everything is checked

    print(f"[reproduce] training {build.label or build.recipe.name} into {build.path}", flush=True)
    return train(build.recipe, build.path, data_dir=data_dir, device=device, resume=build.resumes(force), force=force,
                 spaced_checkpoints=spaced_checkpoints)
