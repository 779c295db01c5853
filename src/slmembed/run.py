"""A training run's folder (``RunDir``): the one place that knows what it holds and under which names, and what its
``embed.json`` says (``EmbedInfo``: one schema for runs and exports alike).

No torch here: the command line finds and checks runs before the heavy libraries load.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from slmembed.atomic import write_json
from slmembed.config import Recipe, load_recipe
from slmembed.errors import SlmembedError
from slmembed.spec import EmbedSpec

EMBED_JSON = "embed.json"  # in a run folder and in an exported model folder alike
KINDS = ("run", "export")
WEIGHTS = {"lora": "adapter", "full": "model"}  # train.finetune -> the run's entry holding the trained weights
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # in a PEFT adapter folder
# What train writes into a run folder (outputs.mark): RunDir's entries.
ADAPTED = "adapted"  # the base model after the recipe's adapt stages (adapt.py), when it has some
# A run's embed.json names a base model inside the run folder as a path relative to it, starting "./" (which no
# packaged name or hub id does), so that the folder can be moved; RunDir.info() resolves it.
IN_RUN = "./"
ENTRIES = (*WEIGHTS.values(), ADAPTED, "checkpoints", "dev", "recipe.yaml", EMBED_JSON, "train_log.jsonl", "data.json",
           "summary.json", "tensorboard", "profile", "reference.safetensors")
# Folders of the runs a reproduced model is made of (reproduce.py trains them inside its run folder): a soup's
# members, a student's teachers. The commands that write the model beside them (train, soup) keep them.
PARTS = ("members", "teachers")


@dataclass(frozen=True)
class EmbedInfo:
    """What ``embed.json`` says: how slmembed loads a folder back. One schema for a training run (``kind: run``) and
    an ``slmembed export`` folder (``kind: export``):

    * both: ``model`` (the base model: packaged name, folder or hub id), ``spec`` (``EmbedSpec``), ``finetune``
      (``lora`` or ``full``: what training updated);
    * an export also: ``merged`` (False: the folder holds the PEFT adapter, loaded over ``model``), ``format``
      (``st``, ``hf`` or ``onnx``), ``source_run``, ``dtype`` and, for ONNX, ``quantize``.

    Files written before ``kind`` existed still load: an export's had ``format`` and ``merged``, a run's neither;
    runs from before full fine-tuning have no ``finetune`` and are LoRA runs.
    """

    kind: str
    model: str
    spec: EmbedSpec
    finetune: str = "lora"
    merged: bool | None = None
    format: str | None = None
    source_run: str | None = None
    dtype: str | None = None
    quantize: str | None = None

    @classmethod
    def read(cls, folder: str | Path) -> EmbedInfo | None:
        """The ``embed.json`` of ``folder``, or None if it has none; a file that is not one is a one-line error."""
        path = Path(folder) / EMBED_JSON
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            kind = data.get("kind") or ("export" if {"format", "merged"} & data.keys() else "run")
            fields = {f.name for f in dataclasses.fields(cls)} - {"kind", "spec"}
            info = cls(kind=kind, spec=EmbedSpec(**data["spec"]), **{k: v for k, v in data.items() if k in fields})
        except (OSError, ValueError, AttributeError, KeyError, TypeError, SlmembedError) as exc:
            raise SlmembedError(f"{path}: expected the JSON object slmembed writes, with model and spec "
                                f"({type(exc).__name__}: {exc})") from None
        if info.kind not in KINDS or info.finetune not in WEIGHTS or not isinstance(info.model, str):
            raise SlmembedError(f"{path}: expected kind {' or '.join(KINDS)}, finetune {' or '.join(WEIGHTS)} and "
                                "a model name")
        return info

    def to_dict(self) -> dict:
        """As ``embed.json`` holds it: the fields of its kind."""
        data = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        if self.format == "onnx":  # None too: float32
            data["quantize"] = self.quantize
        return data

    def write(self, folder: str | Path) -> None:
        """Write it as ``folder/embed.json`` (atomically)."""
        write_json(Path(folder) / EMBED_JSON, self.to_dict())


@dataclass(frozen=True)
class Checkpoint:
    """The files of a checkpoint folder, ``RUN/checkpoints/step-NNNNNNN/`` (or the temporary folder it is written in
    before it is renamed into place): the trained weights (``adapter.safetensors`` or ``model.safetensors``), the
    optimizer and schedule (``optim.pt``), the random states (``rng.pt``) and the step (``state.json``)."""

    path: Path

    @property
    def step(self) -> int:
        return int(self.path.name.removeprefix("step-"))

    def weights(self, finetune: str) -> Path:
        return self.path / f"{WEIGHTS[finetune]}.safetensors"

    @property
    def optimizer(self) -> Path:
        return self.path / "optim.pt"

    @property
    def rng(self) -> Path:
        return self.path / "rng.pt"

    @property
    def state(self) -> Path:
        return self.path / "state.json"


class RunDir:
    """A training run's folder. It holds:

    * ``adapter/``: the trained PEFT LoRA adapter; ``model/`` instead, a whole transformers folder (and tokenizer),
      when ``train.finetune=full`` trained every weight (``weights``);
    * ``recipe.yaml``: the recipe it ran with (``recipe_file``, ``recipe()``);
    * ``embed.json``: base model, pooling, prompt, max length, EOS, attention and what was trained (``EmbedInfo``);
    * ``train_log.jsonl``: step, loss, learning rate, triplets/s, STSBenchmark dev scores (``log``);
    * ``data.json``: triplets per source (``data_record``);
    * ``summary.json``: steps, batch, time, device, what the selection chose; written last (``summary()``);
    * ``dev/``: with ``train.dev_every``, the dev scores (``dev/scores.json``) and the scored weights a selection
      needs (``dev/step-NNNNNNN.safetensors``, ``snapshot``);
    * ``checkpoints/``: ``step-NNNNNNN/`` folders written atomically (``Checkpoint``);
    * ``tensorboard/``: TensorBoard events, when tensorboard is installed; ``profile/``: ``--profile``'s traces;
    * ``reference.safetensors``: the vectors of a reference model, cached for a resumed run;
    * ``eval.json``: where ``slmembed eval --output`` may put the run's scores, for export's model card;
    * ``adapted/``: with the recipe's adapt stages, the base model they adapted (a transformers folder with its
      tokenizer), which the run trained from and its ``embed.json`` names (``adapted``);
    * ``members/`` and ``teachers/`` (``PARTS``): in a run that ``slmembed reproduce`` made of several, the runs it
      trained first: the soup's members (``member``), the reference's runs (``teacher``).

    A run is a folder whose ``embed.json`` says ``kind: run`` (``find``); it trained a LoRA adapter or every weight as
    that file's ``finetune`` says (``finetune``).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @classmethod
    def locate(cls, path: str | Path) -> RunDir | None:
        """The finished run at ``path`` (a run folder, or its ``adapter/`` or ``model/`` subfolder), or None."""
        path = Path(path)
        for folder in (path, path.parent) if path.name in WEIGHTS.values() else (path,):
            info = EmbedInfo.read(folder) if folder.is_dir() else None
            if info is not None and info.kind == "run":
                return cls(folder)
        return None

    @classmethod
    def find(cls, path: str | Path) -> RunDir:
        """``locate``, or a one-line error saying what ``path`` is instead."""
        run = cls.locate(path)
        if run is not None:
            return run
        path = Path(path)
        if not path.is_dir():
            raise SlmembedError(f"{path}: no such folder; expected a training run folder")
        info = EmbedInfo.read(path)
        what = "an exported model, " if info is not None and info.kind == "export" else ""
        raise SlmembedError(f"{path}: {what}not a training run folder (expected the {EMBED_JSON} and adapter/ or "
                            "model/ that slmembed train writes)")

    # The entries.
    @property
    def adapter(self) -> Path:
        return self.path / WEIGHTS["lora"]

    @property
    def model(self) -> Path:
        return self.path / WEIGHTS["full"]

    @property
    def adapted(self) -> Path:
        return self.path / ADAPTED

    @property
    def recipe_file(self) -> Path:
        return self.path / "recipe.yaml"

    @property
    def embed_file(self) -> Path:
        return self.path / EMBED_JSON

    @property
    def log(self) -> Path:
        return self.path / "train_log.jsonl"

    @property
    def data_record(self) -> Path:
        return self.path / "data.json"

    @property
    def summary_file(self) -> Path:
        return self.path / "summary.json"

    @property
    def dev(self) -> Path:
        return self.path / "dev"

    @property
    def dev_scores(self) -> Path:
        return self.dev / "scores.json"

    def snapshot(self, step: int) -> Path:
        """Where the run keeps the weights it scored on STSBenchmark dev at ``step``."""
        return self.dev / f"step-{step:07d}.safetensors"

    def snapshots(self) -> list[Path]:
        return sorted(self.dev.glob("step-*.safetensors"))

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        """The folder of the checkpoint at ``step`` (its files: ``Checkpoint``)."""
        return self.checkpoints_dir / f"step-{step:07d}"

    def checkpoints(self) -> list[Path]:
        """The run's checkpoint folders, oldest first."""
        return sorted(self.checkpoints_dir.glob("step-*"))

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def profile(self) -> Path:
        return self.path / "profile"

    @property
    def reference(self) -> Path:
        return self.path / "reference.safetensors"

    @property
    def scores(self) -> Path:
        return self.path / "eval.json"

    def member(self, seed: int) -> Path:
        """The run of the soup's member trained with ``seed``."""
        return self.path / PARTS[0] / f"seed-{seed}"

    def teacher(self, recipe: str, seed: int | None) -> Path:
        """The run of the reference the recipe ``recipe`` (its name) trains with ``seed`` (None: a soup, of its own
        seeds)."""
        return self.path / PARTS[1] / (recipe if seed is None else f"{recipe}-seed{seed}")

    # Reading them back.
    def info(self) -> EmbedInfo:
        """The run's ``embed.json`` (written when training finished), a base model inside the run folder (``IN_RUN``)
        given as its path where the folder is now."""
        info = EmbedInfo.read(self.path)
        if info is None:
            raise SlmembedError(f"{self.path}: not a finished training run (no {EMBED_JSON})")
        if info.model.startswith(IN_RUN):
            return dataclasses.replace(info, model=str(self.path / info.model.removeprefix(IN_RUN)))
        return info

    @property
    def finetune(self) -> str:
        """``lora`` or ``full``: what the finished run trained."""
        return self.info().finetune

    def weights_folder(self, finetune: str) -> Path:
        """The folder that holds the trained weights of a run that trained as ``finetune`` says: ``adapter/`` or
        ``model/``."""
        return self.path / WEIGHTS[finetune]

    @property
    def weights(self) -> Path:
        """The folder holding the finished run's trained weights: ``adapter/`` or ``model/``."""
        return self.weights_folder(self.finetune)

    def recipe(self) -> Recipe | None:
        """The recipe the run ran with, or None if it has none."""
        return load_recipe(self.recipe_file) if self.recipe_file.is_file() else None

    def summary(self) -> dict | None:
        """The finished run's summary, or None (not finished, or unreadable: the run did not finish writing it)."""
        try:
            summary = json.loads(self.summary_file.read_text())
        except (OSError, ValueError):
            return None
        return summary if isinstance(summary, dict) else None

    def finished(self) -> int | None:
        """The steps of the finished run (its summary, written last), or None."""
        try:
            return int((self.summary() or {})["steps"])
        except (KeyError, TypeError, ValueError):
            return None

    def records(self) -> list[Path]:
        """What the run records of itself, without its weights: those of its log, data record, summary and dev scores
        that exist (``python -m slmembed.run RUN...`` lists them, for bench/reproduce_gpu.sh)."""
        return [p for p in (self.log, self.data_record, self.summary_file, self.dev_scores) if p.exists()]

    def holds_weights(self) -> bool:
        """Whether the folder holds a run's trained weights, finished or not (``adapter/``, or ``model/`` with its
        config), or is a PEFT adapter folder itself: what the command line takes for a run where a model may stand."""
        return self.path.is_dir() and (self.adapter.exists() or (self.model / "config.json").exists()
                                       or (self.path / ADAPTER_CONFIG).exists())

    def holds_run(self) -> bool:
        """Whether the folder holds a run's files (train's output from before output markers: outputs.written_by)."""
        return (self.recipe_file.is_file() and self.embed_file.is_file()) or self.checkpoints_dir.is_dir()

    # Writing.
    def write_info(self, model: str, spec: EmbedSpec, finetune: str, adapted: bool = False) -> None:
        """Write the finished run's ``embed.json``; its base model is ``model``, or the run's ``adapted/``."""
        EmbedInfo("run", IN_RUN + ADAPTED if adapted else model, spec, finetune).write(self.path)


if __name__ == "__main__":  # python -m slmembed.run RUN...: each run's records, one path a line
    for folder in sys.argv[1:]:
        for path in RunDir(folder).records():
            print(path)
