"""Model soups (Wortsman et al. 2022): one model whose weights are the mean of several training runs' weights.

Members are finished training runs of one base model, one fine-tuning kind, one LoRA shape (rank, scale alpha / r,
targets, layers) and one embedding spec; ``check_members`` refuses anything else, naming the run and the field,
before any model loads. The mean is ``tuning.average``'s: the mean of the state dicts (full fine-tuning), or a LoRA
adapter of rank ``k r`` whose update is exactly the mean of the members' updates. A run that kept an average of its
dev snapshots (selection.py) holds an adapter of a multiple of the trained rank at the same scale; it soups alike.

* uniform soup: every member;
* greedy soup (``greedy``): the members ordered by their STSBenchmark dev score, best first; starting from the best,
  each next member joins if the soup's dev score does not drop, and is left out otherwise (``choose_greedy``).

Only STSBenchmark dev chooses. The test sets are scored once the soup is chosen and written, and only reported.
Scores on the way (members, candidate soups) are computed on the model as training holds it (the backbone in
``tuning.weights_dtype``, the averaged adapter unmerged), as train's dev selection scores it; the soup's own scores
are those of the written folder, loaded as ``slmembed eval --adapter SOUP`` loads it.

The output is a run folder (run.RunDir) that every command loads like a training run: the averaged ``adapter/`` or
``model/``, the first member's saved spec and recipe, a summary (the members' training as the first member's summary
records it, and ``soup``: the members, the choice and the dev scores) and ``soup.json`` (the result, an eval JSON:
the soup's scores on the test sets, plus the choice).

No torch at import: ``cli.py`` checks the members and the output before the heavy libraries load.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from slmembed import outputs
from slmembed.atomic import atomic_dir
from slmembed.config import Recipe
from slmembed.data.sts import TASKS, StsSet, load_all, load_sts
from slmembed.errors import SlmembedError
from slmembed.paths import find_data_dir
from slmembed.run import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PARTS, EmbedInfo, RunDir
from slmembed.spec import EmbedSpec
from slmembed.tables import table

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

COMMAND = "soup"
RESULT, MODEL_CONFIG = "soup.json", "config.json"  # the soup's result beside the run's files; a full model's config
# The first member's summary fields a soup's summary repeats: how each member trained (export's model card reads
# them).
TRAINING = ("steps", "batch_size", "triplets", "triplets_seen", "minutes", "device", "world_size", "finetune", "bf16")
DEV = "STSBenchmark dev"


@dataclass(frozen=True)
class Member:
    """A finished training run, as a soup needs it."""

    run: Path
    recipe: Recipe
    model: str  # the base model, as the run's saved spec names it
    spec: EmbedSpec
    info: EmbedInfo  # the run's saved spec
    summary: dict
    adapter: dict | None  # adapter_config.json (LoRA)

    @property
    def final(self) -> Path:
        """The folder of the run's trained weights."""
        return RunDir(self.run).weights_folder(self.info.finetune)

    def shape(self) -> dict[str, object]:
        """What every member of a soup must share, field -> value."""
        fields = {"model": self.model, "train.finetune": self.info.finetune,
                  **{f"spec.{k}": v for k, v in self.spec.__dict__.items()}}
        if self.adapter is not None:  # as trained (the recipe's rank), and as kept: an average of dev snapshots
            # (selection.py) is of a multiple of that rank at the same scale, and soups with the others
            targets, layers = self.adapter.get("target_modules"), self.adapter.get("layers_to_transform")
            r, alpha = self.adapter.get("r"), self.adapter.get("lora_alpha")
            fields |= {"lora.r": self.recipe.lora.r,
                       "lora.scale": alpha / r if isinstance(r, int) and isinstance(alpha, int | float) and r else None,
                       "lora.targets": sorted(targets) if isinstance(targets, list) else targets,
                       "lora.layers": sorted(layers) if isinstance(layers, list) else layers}
        return fields


def _json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SlmembedError(f"{path}: cannot be read as {what} ({type(exc).__name__}); expected a finished training "
                            "run folder") from None
    if not isinstance(data, dict):
        raise SlmembedError(f"{path}: expected {what} (a JSON object)")
    return data


def read_member(path: Path) -> Member:
    """The finished training run in ``path``; a folder that is not one is a one-line error naming what is missing."""
    if not path.is_dir():
        raise SlmembedError(f"--run {path}: no such run folder")
    run = RunDir(path)
    if run.finished() is None:
        raise SlmembedError(f"{path}: not a finished training run (no {run.summary_file.name} with its steps); a soup "
                            "averages finished runs")
    summary = run.summary()
    if COMMAND in summary:
        raise SlmembedError(f"{path} is a soup, not a training run: give its members ({run.summary_file.name} lists "
                            "them)")
    recipe = run.recipe()
    if recipe is None:
        raise SlmembedError(f"{path}: no {run.recipe_file.name}; expected a finished training run folder")
    info = run.info()
    final = run.weights
    adapter = None
    if info.finetune == "lora":
        if not (final / ADAPTER_WEIGHTS).is_file():
            raise SlmembedError(f"{path}: no {final.name}/{ADAPTER_WEIGHTS} (the trained LoRA weights)")
        adapter = _json(final / ADAPTER_CONFIG, "a PEFT adapter config")
    elif not (final / MODEL_CONFIG).is_file():
        raise SlmembedError(f"{path}: no {final.name}/{MODEL_CONFIG} (the fully fine-tuned model)")
    return Member(path, recipe, info.model, info.spec, info, summary, adapter)


def check_members(runs: Sequence[str | Path]) -> list[Member]:
    """The members of a soup, checked before any model loads: two or more distinct finished training runs that
    share ``Member.shape``."""
    paths = [Path(r) for r in runs]
    if len(paths) < 2:
        raise SlmembedError(f"a soup averages two or more runs (--run RUN1 --run RUN2 ...), got {len(paths)}")
    seen: dict[Path, Path] = {}
    for path in paths:
        if path.resolve() in seen:
            raise SlmembedError(f"--run {path}: given twice (as {seen[path.resolve()]}); give each run once")
        seen[path.resolve()] = path
    members = [read_member(p) for p in paths]
    first = members[0].shape()
    for member in members[1:]:
        shape = member.shape()
        for field in dict.fromkeys([*first, *shape]):
            if shape.get(field) != first.get(field):
                raise SlmembedError(
                    f"{member.run}: {field} is {json.dumps(shape.get(field))}, but {members[0].run} has "
                    f"{json.dumps(first.get(field))}; a soup averages runs of one base model, fine-tuning kind, LoRA "
                    "shape (rank, scale, targets, layers) and embedding spec")
    return members


def _rank(value: float) -> float:
    """A dev score for ordering: NaN (constant similarities) ranks last."""
    return -math.inf if math.isnan(value) else value


def choose_greedy(member_dev: Sequence[float], score: Callable[[list[int]], float]) -> tuple[list[int], list[dict]]:
    """The greedy soup's members (indices) and its steps: ``member_dev`` are the members' dev scores, ``score`` gives
    a soup's (of the members it is given). Members are tried best first (ties in the given order); each joins if the
    soup's score does not drop. A step is ``{"tried": [...], "stsb_dev": ..., "kept": ...}``."""
    order = sorted(range(len(member_dev)), key=lambda i: -_rank(member_dev[i]))
    chosen, best = [order[0]], member_dev[order[0]]
    steps = [{"tried": list(chosen), "stsb_dev": best, "kept": True}]
    for i in order[1:]:
        tried = [*chosen, i]
        value = score(tried)
        kept = _rank(value) >= _rank(best)
        steps.append({"tried": tried, "stsb_dev": value, "kept": kept})
        if kept:
            chosen, best = tried, value
    return chosen, steps


def soup(runs: Sequence[str | Path], output: str | Path, *, greedy: bool = False, tasks: Sequence[str] | None = None,
         data_dir: str | None = None, device: str = "auto", force: bool = False, trust_remote_code: bool = False,
         allow_pickle: bool = False, provenance: Callable[[], dict] | None = None) -> dict:
    """Average the runs ``runs`` (uniformly, or greedily on STSBenchmark dev) into the run folder ``output``, score
    the soup on ``tasks`` (default: all nine) and return its result (also ``output/soup.json``). ``force`` replaces
    an earlier soup in ``output``; see outputs.py for what else it may not be."""
    output = Path(output)
    members = check_members(runs)
    check = functools.partial(outputs.check_folder, output, COMMAND, inputs=[*(m.run for m in members),
                                                                             members[0].model],
                              around=[find_data_dir(data_dir, required=False)], force=force, keep=PARTS)
    with outputs.writing(output, check):
        dev = {DEV: load_sts("STSBenchmark", data_dir, split="dev")}
        sets = load_all(tasks or TASKS, data_dir)  # bad task names and data fail before a model loads
        return _soup(members, output, greedy=greedy, dev=dev, sets=sets, device=device,
                     trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, provenance=provenance)


def _soup(members: list[Member], output: Path, *, greedy: bool, dev: dict[str, StsSet], sets: dict[str, StsSet],
          device: str, trust_remote_code: bool, allow_pickle: bool, provenance: Callable[[], dict] | None) -> dict:
    """``soup`` once the members and the output are checked and held."""
    # torch and the modules built on it: here, so that the checks above answer before they load.
    from slmembed import tuning
    from slmembed.device import resolve_device
    from slmembed.evaluate import evaluate
    from slmembed.loading import load_embedder

    where = resolve_device(device)
    loading = {"trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}
    first, names = members[0], [str(m.run) for m in members]
    model, tokenizer, member_dev, chosen, steps = _choose(members, greedy, dev, where, loading)
    with atomic_dir(output, keep=PARTS) as tmp:  # a reproduced soup's members/ stay
        written_run = RunDir(tmp)
        tuning.save_final(model, tokenizer, written_run.weights_folder(first.info.finetune), first.recipe)
        del model  # before the written soup loads
        first.info.write(tmp)
        # Plain writes: atomic_dir fsyncs them.
        written_run.recipe_file.write_text(RunDir(first.run).recipe_file.read_text())
        written = load_embedder(None, adapter=tmp, device=where, **loading)
        record = {"members": [names[i] for i in chosen], "greedy": greedy,
                  "candidates": [{"run": n, "stsb_dev": s} for n, s in zip(names, member_dev, strict=True)],
                  "steps": [{**s, "tried": [names[i] for i in s["tried"]]} for s in steps],
                  "dev": evaluate(written, dev)["average"]}
        result = {"model": str(output), "soup": record, **evaluate(written, sets)}
        if provenance is not None:
            result["run"] = provenance()
        summary = {k: first.summary[k] for k in TRAINING if k in first.summary}
        written_run.summary_file.write_text(json.dumps({**summary, COMMAND: record}, indent=2) + "\n")
        (tmp / RESULT).write_text(json.dumps(result, indent=2) + "\n")
        outputs.mark(tmp, COMMAND, [e.name for e in tmp.iterdir()])
    return result


def _choose(members: list[Member], greedy: bool, dev: dict[str, StsSet], device: torch.device,
            loading: dict) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, list[float], list[int], list[dict]]:
    """The soup's model (the chosen members averaged into it) and tokenizer, the members' dev scores, the chosen
    members (indices) and the greedy steps."""
    from slmembed import models, tuning
    from slmembed.embedder import Embedder
    from slmembed.evaluate import evaluate

    first, recipe = members[0], members[0].recipe
    dtype = tuning.weights_dtype(recipe, device)  # as training holds the model
    if recipe.train.finetune == "full":
        model, tokenizer = models.load(str(first.final), dtype=dtype, device=device, **loading)
    else:
        from peft import PeftModel

        base, tokenizer = models.load(first.model, dtype=dtype, device=device, **loading)
        model = PeftModel.from_pretrained(base, str(first.final))  # the "default" adapter tuning.average builds on
    states = [tuning.read_final(m.final, recipe, loading["trust_remote_code"]) for m in members]
    embedder = Embedder(model.eval(), tokenizer, first.spec)

    def dev_score(chosen: list[int]) -> float:
        tuning.average(model, [states[i] for i in chosen], recipe)
        return evaluate(embedder, dev)["average"]

    member_dev = [dev_score([i]) for i in range(len(members))]
    chosen, steps = choose_greedy(member_dev, dev_score) if greedy else (list(range(len(members))), [])
    tuning.average(model, [states[i] for i in chosen], recipe)
    return model, tokenizer, member_dev, chosen, steps


def text(result: dict) -> str:
    """What ``slmembed soup`` prints: the dev scores that chose (members, greedy steps, the soup), then the soup's
    scores on the test sets."""
    record = result["soup"]
    lines = [f"{DEV} (the only scores that choose):"]
    lines += [f"  member {c['run']}: {c['stsb_dev']:.2f}" for c in record["candidates"]]
    for step in record["steps"][1:]:
        lines.append(f"  greedy: + {step['tried'][-1]}: soup {step['stsb_dev']:.2f}, "
                     + ("kept" if step["kept"] else "left out (the soup's dev score drops)"))
    lines.append(f"  soup of {len(record['members'])} ({', '.join(record['members'])}): {record['dev']:.2f}")
    lines += ["", f"The soup on the test sets (scored after the choice; average {result['average']:.2f}):", "",
              table({result["model"]: result["scores"]})]
    return "\n".join(lines)
