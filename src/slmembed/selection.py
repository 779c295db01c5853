"""Choosing a run's final weights on STSBenchmark dev, never on a test set (``train.dev_every``, ``select``,
``average_last``).

Every ``dev_every`` steps and at the end, the model is scored on STSBenchmark dev (Spearman x100 of cosine) and the
scored weights are kept as a snapshot in the run folder (``RunDir.snapshot``: the best one and the last
``average_last``; older ones are deleted), with the scores beside them (``RunDir.dev_scores``). Both are written
atomically, so a resumed run continues with them. At the end the run keeps, by ``select``:

* ``last``: the last weights, or the mean of the last ``average_last`` snapshots when that is above 1;
* ``best_dev``: the best-scoring of the snapshots and (when ``average_last`` > 1) that mean, scored too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from slmembed import tuning
from slmembed.atomic import atomic_path, write_json
from slmembed.config import Recipe
from slmembed.data.sts import StsSet, load_sts
from slmembed.embedder import Embedder
from slmembed.evaluate import evaluate
from slmembed.run import RunDir


@dataclass
class DevSelection:
    """Scores and snapshots of one run (see the module docstring)."""

    run: RunDir
    recipe: Recipe
    sets: dict[str, StsSet]
    scores: list[dict] = field(default_factory=list)  # {"step", "stsb_dev"} in step order

    @classmethod
    def open(cls, run_dir: Path, recipe: Recipe, data_dir: str | None, start: int) -> DevSelection:
        """Load STSBenchmark dev; keep the scores (and snapshots) of steps up to ``start``, where the run continues."""
        run = RunDir(run_dir)
        sets = {"STSBenchmark dev": load_sts("STSBenchmark", data_dir, split="dev")}
        saved = json.loads(run.dev_scores.read_text()) if start and run.dev_scores.exists() else []
        return cls(run, recipe, sets, [s for s in saved if s["step"] <= start])

    def due(self, step: int, total: int) -> bool:
        every = self.recipe.train.dev_every
        return every is not None and (step % every == 0 or step == total)

    def score(self, embedder: Embedder) -> float:
        """STSBenchmark dev of the embedder's model as it is now (evaluated in eval mode, then back to training)."""
        training = embedder.model.training
        embedder.model.eval()
        try:
            return evaluate(embedder, self.sets)["average"]
        finally:
            embedder.model.train(training)

    def record(self, step: int, embedder: Embedder, model: torch.nn.Module, write: bool = True) -> float:
        """Score the model at ``step`` and keep its weights as a snapshot; return the score. A sharded model is
        scored and gathered by every process, and only the one with ``write`` writes."""
        value = self.score(embedder)
        self.scores.append({"step": step, "stsb_dev": value})
        weights = tuning.state(model, self.recipe)
        if not write:
            return value
        with atomic_path(self.run.snapshot(step)) as tmp:
            save_file(weights, tmp)
        write_json(self.run.dev_scores, self.scores)
        keep = {self.run.snapshot(s["step"]) for s in [self.best(), *self.scores[-self.recipe.train.average_last:]]}
        for old in self.run.snapshots():
            if old not in keep:
                old.unlink()
        return value

    def best(self) -> dict:
        return max(self.scores, key=lambda s: (s["stsb_dev"], s["step"]))

    def choose(self, embedder: Embedder, model: torch.nn.Module) -> dict:
        """Put the selected weights into ``model`` (see the module docstring); return what was chosen and why."""
        tc = self.recipe.train
        last = self.scores[-tc.average_last:]
        candidates = {"last": self.scores[-1]}
        if tc.select == "best_dev":
            candidates["best"] = self.best()
        if len(last) > 1:
            tuning.average(model, [load_file(self.run.snapshot(s["step"])) for s in last], self.recipe)
            candidates["average"] = {"steps": [s["step"] for s in last], "stsb_dev": self.score(embedder)}
        chosen = "average" if "average" in candidates and tc.select == "last" else max(
            candidates, key=lambda k: candidates[k]["stsb_dev"])
        if chosen != "average":
            tuning.use_trained(model, self.recipe)
            tuning.load_state(model, load_file(self.run.snapshot(candidates[chosen]["step"])), self.recipe)
        return {"chosen": chosen, **candidates[chosen], "scores": self.scores,
                "average": candidates.get("average")}
