"""Recipes: dataclasses that round-trip through the YAML files shipped in the package (``slmembed/recipes/``).

A recipe has five sections, each a dataclass below. Every field declares its rule beside its default (``checked``),
and a recipe is checked whole when it is built from YAML or from overrides, before any data or model is loaded: an
unknown key, a wrongly typed value or one outside its rule is one error naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slmembed.checks import NOT_NEGATIVE, POSITIVE, TEXT, Check, at_least, one_of, rule
from slmembed.errors import SlmembedError
from slmembed.losses import LOSSES, OPTIONS, REFERENCE
from slmembed.spec import RULES as SPEC_RULES

NAMES = rule("a non-empty list of distinct, non-empty strings",
             lambda v: 0 < len(set(v)) == len(v) and all(s.strip() for s in v))
DIMS = rule("a non-empty list of distinct integers >= 1, or null",
            lambda v: 0 < len(set(v)) == len(v) and all(d >= 1 for d in v))
WEIGHTS = rule("a non-empty list of finite numbers > 0, or null",
               lambda v: len(v) > 0 and all(math.isfinite(w) and w > 0 for w in v))
INDICES = rule("a non-empty list of distinct integers, or null for all", lambda v: 0 < len(set(v)) == len(v))
SEED = rule("an integer in [0, 2**64)", lambda v: 0 <= v < 2**64)  # what torch.manual_seed and numpy accept
SEEDS = rule("a list of two or more distinct integers in [0, 2**64) (a soup averages two or more runs), or null",
             lambda v: 1 < len(set(v)) == len(v) and all(SEED(s) is None for s in v))
RECIPE = "recipe:"  # a train.reference entry that names a recipe (recipe_reference), trained by reproduce first
# get_scheduler names that work as train.py calls them and warm up over warmup_steps; transformers' "constant" skips
# the warm-up (constant_with_warmup with warmup_steps 0 is the same), the others need arguments train.py has no
# field for.
SCHEDULES = ("cosine", "linear", "constant_with_warmup", "cosine_with_restarts", "polynomial", "inverse_sqrt")


def recipe_reference(source: str) -> tuple[str, int | None] | None:
    """The recipe (a shipped name or a YAML path) and seed that a ``train.reference`` entry ``recipe:NAME[@SEED]``
    names (seed None: the recipe's own ``train.seed``); None for an entry that names a model or a run instead."""
    if not source.startswith(RECIPE):
        return None
    named = source.removeprefix(RECIPE).strip()
    name, at, seed = named.rpartition("@")
    return (name, int(seed)) if at and seed.isdigit() else (named, None)


def _references_ok(value: str | list[str]) -> bool:
    """REFERENCES' rule: one name, or distinct names; a ``recipe:`` entry with a recipe and a seed in SEED's range."""
    entries = [value] if isinstance(value, str) else value
    named = [n for n in map(recipe_reference, entries) if n is not None]
    return (NAMES(entries) is None and all(name and (seed is None or SEED(seed) is None) for name, seed in named))


REFERENCES = rule("a non-empty string, or a non-empty list of distinct, non-empty strings (an ensemble); an entry "
                  f"{RECIPE}NAME or {RECIPE}NAME@SEED names the run that recipe trains", _references_ok)


def checked(check: Check, **kwargs: Any) -> Any:
    """A dataclass field whose values (other than None) must pass ``check``; ``kwargs`` go to ``field``."""
    return field(metadata={"check": check}, **kwargs)


@dataclass
class ModelConfig:
    name: str = checked(TEXT, default="smollm2-135m")
    trust_remote_code: bool = False
    allow_pickle: bool = False  # load pickle weights (pytorch_model.bin, .pt); needs --allow-pickle too
    pooling: str = checked(SPEC_RULES["pooling"], default="last")
    prompt: str | None = checked(SPEC_RULES["prompt"], default=None)
    max_length: int = checked(SPEC_RULES["max_length"], default=150)  # a token and the EOS; texts are cut to fit
    append_eos: bool = True
    # causal: a decoder as it was pre-trained; bidirectional: every token sees the whole text (attention.py), as in
    # LLM2Vec and EmbeddingGemma; mean pooling then uses every token's view of the whole text.
    attention: str = checked(SPEC_RULES["attention"], default="causal")


@dataclass
class LoraConfig:
    r: int = checked(at_least(1), default=8)
    alpha: int = checked(at_least(1), default=32)  # the update is scaled by alpha / r
    dropout: float = checked(rule("a number in [0, 1)", lambda v: 0 <= v < 1), default=0.1)
    targets: list[str] = checked(NAMES, default_factory=lambda: ["q_proj", "v_proj"])
    layers: list[int] | None = checked(INDICES, default=None)  # None: every layer; negative counts from the top


@dataclass
class TrainConfig:
    lr: float = checked(POSITIVE, default=5e-5)
    schedule: str = checked(one_of(*SCHEDULES), default="cosine")  # each after warmup_steps of linear warm-up
    warmup_steps: int = checked(at_least(0), default=100)
    batch_size: int = checked(at_least(1), default=60)  # per process
    epochs: int = checked(at_least(1), default=1)
    max_steps: int | None = checked(at_least(1), default=None)  # None: epochs over the data
    temperature: float = checked(POSITIVE, default=0.05)
    loss: str = checked(one_of(*LOSSES), default="infonce")  # a name in losses.LOSSES
    # angle_infonce (losses/angle.py): InfoNCE plus angle_weight times AnglE's angle term at scale angle_tau; the
    # defaults are AnglE's for NLI triplets.
    angle_weight: float = checked(NOT_NEGATIVE, default=0.02)
    angle_tau: float = checked(POSITIVE, default=20.0)
    # The reference model of the objectives that use one (losses.REFERENCE; reference.py): a packaged model name, a
    # model folder, a hub id or a finished training run, or a list of them (their ensemble: ensemble.py), whose
    # vectors of the training sentences guide the in-batch negatives (guided_infonce: candidates it ranks above the
    # positive, less guide_margin, are left out) or are distilled (distill_infonce: infonce + distill_weight * KL to
    # its in-batch softmax at distill_temperature).
    reference: str | list[str] | None = checked(REFERENCES, default=None)
    guide_margin: float = checked(NOT_NEGATIVE, default=0.0)
    distill_weight: float = checked(NOT_NEGATIVE, default=1.0)
    distill_temperature: float = checked(POSITIVE, default=0.05)
    # Matryoshka (losses/matryoshka.py): the loss also at these embedding prefix sizes (each below the model's size),
    # weighted by matryoshka_weights (default 1 each), so that a cut vector keeps its quality. None: full size only.
    matryoshka_dims: list[int] | None = checked(DIMS, default=None)
    matryoshka_weights: list[float] | None = checked(WEIGHTS, default=None)
    finetune: str = checked(one_of("lora", "full"), default="lora")  # full: every weight trains, no adapter
    hard_negatives: bool = True
    weight_decay: float = checked(NOT_NEGATIVE, default=0.0)
    bf16: bool = True
    # Tokens per forward chunk (padded ones, or real ones when packed); a longer text gets a chunk of its own.
    chunk_tokens: int = checked(at_least(1), default=4096)
    packing: bool | None = None  # chunks as one row without padding (packing.py); None: where supported, on a GPU
    # The packed batches' attention kernel (packing.py): auto: variable-length FlashAttention on a GPU, an explicit
    # mask elsewhere; varlen: FlashAttention; flex: FlexAttention with a document mask in 128-token tiles (flex64:
    # 64-token tiles). Any but auto packs wherever packing is supported and is refused where it cannot run.
    packed_attention: str = checked(one_of("auto", "varlen", "flex", "flex64"), default="auto")
    grad_cache: bool = False  # cached negatives (GradCache): memory set by chunk_tokens, not batch_size
    compile: bool = False  # torch.compile each transformer block (compile.py): fused kernels, a one-off compile time
    # Each step's forward and backward replayed as a CUDA graph (cuda_graphs.py): for small batches, whose steps the
    # host's kernel launches otherwise pace; one GPU, packed steps of at most chunk_tokens tokens, no GradCache.
    cuda_graphs: bool = False
    # liger: liger-kernel's fused RMSNorm, gated MLP and rotary embeddings on a GPU (kernels.py); none: transformers'
    kernels: str = checked(one_of("none", "liger"), default="none")
    # fsdp: weights, gradients and optimizer state split across the processes (sharding.py), for a backbone that does
    # not fit one device; none: each process holds the whole model (DDP).
    sharding: str = checked(one_of("none", "fsdp"), default="none")
    seed: int = checked(SEED, default=42)
    save_every: int = checked(at_least(1), default=200)
    keep_checkpoints: int = checked(at_least(1), default=2)
    log_every: int = checked(at_least(1), default=10)
    # Scores on STSBenchmark dev (never a test set) every dev_every steps and at the end; None: none. The run's model
    # is then ``select``: the last weights, the best scored ones, or the best of those and the average of the last
    # ``average_last`` scored weights (train.py, "Selection").
    dev_every: int | None = checked(at_least(1), default=None)
    select: str = checked(one_of("last", "best_dev"), default="last")
    average_last: int = checked(at_least(1), default=1)

    @property
    def references(self) -> list[str]:
        """The models ``reference`` names: none, one, or the members of an ensemble."""
        return [] if self.reference is None else [self.reference] if isinstance(self.reference, str) else self.reference


@dataclass
class DataConfig:
    sources: list[str] = checked(NAMES, default_factory=lambda: ["all"])
    max_triplets: int | None = checked(at_least(1), default=None)  # None: all
    skip_bad_rows: bool = False
    # How NLI groups (one premise's hypotheses) become examples (data/nli.py): kth pairs the k-th entailment with the
    # k-th contradiction (SimCSE's file); all takes every entailment x contradiction pair of the group.
    pairing: str = checked(one_of("kth", "all"), default="kth")
    neutral_negatives: bool = False  # a neutral hypothesis of the group as a further negative of each example
    entailment_pairs: bool = False  # entailments without a contradiction as (anchor, positive) pairs


@dataclass
class AdaptConfig:
    """LLM2Vec's adaptation of a decoder before supervised training (adapt.py): masked next-token prediction, then
    unsupervised SimCSE, each a LoRA (``r``, ``alpha``, on ``lora.targets``) merged into the weights, on the unique
    sentences of the recipe's NLI data. 0 steps: the stage is off. The learning rates are LLM2Vec's."""

    mntp_steps: int = checked(at_least(0), default=0)
    mntp_mask: float = checked(rule("a number in (0, 1)", lambda v: 0 < v < 1), default=0.2)  # of the tokens
    mntp_batch: int = checked(at_least(1), default=128)  # sentences per step, over all processes
    mntp_lr: float = checked(POSITIVE, default=5e-5)
    simcse_steps: int = checked(at_least(0), default=0)
    simcse_batch: int = checked(at_least(2), default=128)  # sentences per step, over all processes
    simcse_lr: float = checked(POSITIVE, default=3e-5)
    simcse_dropout: float = checked(rule("a number in [0, 1)", lambda v: 0 <= v < 1), default=0.3)  # attention's
    r: int = checked(at_least(1), default=16)
    alpha: int = checked(at_least(1), default=32)

    @property
    def on(self) -> bool:
        """Whether any stage runs."""
        return self.mntp_steps > 0 or self.simcse_steps > 0


@dataclass
class SoupConfig:
    """A model soup of the recipe (soup.py): ``slmembed reproduce`` trains the recipe once per seed and averages the
    runs, every one (uniform) or greedily on STSBenchmark dev. ``slmembed train`` trains one run, so it refuses it."""

    seeds: list[int] | None = checked(SEEDS, default=None)  # None: no soup, one run
    greedy: bool = False


@dataclass
class Recipe:
    name: str = checked(TEXT, default="custom")
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    soup: SoupConfig = field(default_factory=SoupConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# Fields that change how a run goes but not what it computes, so a resumed run may change them (train.py): its
# label, the safety flags that allow loading, where it logs and checkpoints, skip_bad_rows (a run started without it
# had no bad rows to skip), and how each step's batch is cut and run: chunk_tokens, packing and packed_attention,
# grad_cache (speed, memory), compile and kernels (fused kernels) leave the loss and its gradient as they are; only
# rounding and the dropout masks drawn differ.
NOT_RESULT = frozenset({
    "name", "model.trust_remote_code", "model.allow_pickle", "data.skip_bad_rows",
    "train.log_every", "train.save_every", "train.keep_checkpoints",
    "train.chunk_tokens", "train.packing", "train.packed_attention", "train.grad_cache", "train.compile",
    "train.kernels",
})


def flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested recipe dict as ``section.field -> value``."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def result_changes(old: Recipe, new: Recipe) -> list[str]:
    """``field: old -> new`` (JSON values) for each field outside NOT_RESULT in which the recipes differ."""
    a, b = flat(old.to_dict()), flat(new.to_dict())
    return [f"{k}: {json.dumps(a[k])} -> {json.dumps(b[k])}" for k in a if k not in NOT_RESULT and a[k] != b[k]]


def _check(value: Any, hint: Any, where: str) -> Any:
    """Return ``value`` if it fits the type ``hint`` (ints accepted for floats), else raise naming ``where``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            try:
                return _check(value, arm, where)
            except SlmembedError:
                pass
    elif hint is type(None):
        if value is None:
            return None
    elif origin is list:
        if isinstance(value, list):
            return [_check(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 5e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, hint):
        return value
    name = str(hint).replace("typing.", "") if origin else hint.__name__  # list[str], int | None; int
    raise SlmembedError(f"{where}: expected {name}, got {value!r}")


def _build(cls: type, data: Any, file: str, path: str = "") -> Any:
    """A ``cls`` from the mapping ``data``, each value type-checked and checked by its field's rule; errors name
    ``file`` and the field's dotted ``path``."""
    where = f"{file}: {path}" if path else file
    if not isinstance(data, dict):
        raise SlmembedError(f"{where}: expected a mapping, got {data!r}")
    hints, fields = typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(key) for key in data if key not in fields)
    if unknown:
        raise SlmembedError(f"{where}: unknown field(s) {', '.join(unknown)}; expected {', '.join(sorted(fields))}")
    kwargs = {}
    for key, value in data.items():
        hint, at = hints[key], f"{path}.{key}" if path else key
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, file, at)
            continue
        kwargs[key] = value = _check(value, hint, f"{file}: {at}")
        expected = field_error(cls, key, value)
        if expected:
            raise SlmembedError(f"{file}: {at}: expected {expected}, got {value!r}")
    return cls(**kwargs)


def field_error(cls: type, name: str, value: Any) -> str | None:
    """What the field ``name`` of the recipe section ``cls`` expects, if ``value`` (of the right type) breaks its
    rule; None if it keeps it."""
    check = next(f for f in dataclasses.fields(cls) if f.name == name).metadata.get("check")
    return check(value) if check and value is not None else None


def recipe_from_dict(data: dict[str, Any], where: str = "recipe") -> Recipe:
    """The recipe ``data`` describes, checked field by field and for fields that only work together; ``where`` (a
    file name) leads every error."""
    recipe = _build(Recipe, data, where)
    tc = recipe.train
    for name, value, default in (("select", tc.select, "last"), ("average_last", tc.average_last, 1)):
        if tc.dev_every is None and value != default:
            raise SlmembedError(f"{where}: train.{name}: {value!r} needs STSBenchmark dev scores: set train.dev_every "
                                f"(steps between scores), or leave train.{name} at {default!r}")
    if tc.matryoshka_weights is not None and len(tc.matryoshka_weights) != len(tc.matryoshka_dims or []):
        raise SlmembedError(f"{where}: train.matryoshka_weights: expected one weight for each of train.matryoshka_dims "
                            f"({tc.matryoshka_dims}), got {tc.matryoshka_weights}")
    for loss, names in OPTIONS.items():
        for name in names:
            value, default = getattr(tc, name), TrainConfig.__dataclass_fields__[name].default
            if tc.loss != loss and value != default:
                raise SlmembedError(f"{where}: train.{name}: {value!r} is used by train.loss: {loss} only, not "
                                    f"{tc.loss}; set train.loss: {loss}, or leave train.{name} at {default!r}")
    if tc.loss in REFERENCE and tc.reference is None:
        raise SlmembedError(f"{where}: train.loss: {tc.loss} learns from a reference model: set train.reference (a "
                            "model name, a model folder, a finished training run, or a list of them)")
    if tc.reference is not None and tc.loss not in REFERENCE:
        raise SlmembedError(f"{where}: train.reference: {tc.loss} does not use it, only {', '.join(sorted(REFERENCE))} "
                            "do: set train.loss to one of them, or train.reference to null")
    if recipe.adapt.on and recipe.model.attention != "bidirectional":
        raise SlmembedError(f"{where}: model.attention: {recipe.model.attention!r}; the adapt stages (LLM2Vec's) train "
                            "a bidirectional model: set model.attention: bidirectional, or adapt.mntp_steps and "
                            "adapt.simcse_steps to 0")
    if recipe.soup.seeds is not None and recipe.adapt.on:
        raise SlmembedError(f"{where}: soup.seeds: each seed's run would adapt its own base model (adapt stages), "
                            "and a soup averages runs of one base model: set adapt.mntp_steps and adapt.simcse_steps "
                            "to 0, or soup.seeds to null")
    if recipe.soup.greedy and recipe.soup.seeds is None:
        raise SlmembedError(f"{where}: soup.greedy: true needs soup.seeds (the runs to choose from); set soup.seeds, "
                            "or leave soup.greedy at false")
    if tc.packing is False and tc.packed_attention != "auto":
        raise SlmembedError(f"{where}: train.packed_attention: {tc.packed_attention} is the attention of packed "
                            "batches, and train.packing is false: set train.packing to true (or null), or "
                            "train.packed_attention to auto")
    if tc.sharding == "fsdp" and tc.average_last != 1:
        raise SlmembedError(f"{where}: train.average_last: {tc.average_last} cannot be combined with train.sharding: "
                            "fsdp (the averaged adapter is not sharded); leave it at 1")
    return recipe


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last, so
    ``lr`` written twice, or two ``train:`` sections, would silently mean something else than the file shows)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (first on line {seen[key] + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


RECIPES = importlib.resources.files("slmembed") / "recipes"  # package data: the same from a wheel or a checkout


def shipped_recipes() -> list[str]:
    """Names of the recipes shipped with slmembed (``gemma-2b``, ``smollm2-135m``, ...)."""
    return sorted(f.name.removesuffix(".yaml") for f in RECIPES.iterdir() if f.name.endswith(".yaml"))


def load_recipe(path_or_name: str | Path) -> Recipe:
    """Load a recipe from a YAML file, or by name from the shipped recipes (e.g. ``gemma-2b``)."""
    path = Path(path_or_name)
    if not path.exists() and str(path_or_name) in shipped_recipes():
        path = RECIPES / f"{path_or_name}.yaml"
    if not path.is_file():
        raise SlmembedError(f"no recipe {str(path_or_name)!r}: give a YAML file or one of "
                            f"{', '.join(shipped_recipes())}")
    try:
        data = _parse_yaml(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise SlmembedError(f"{path}: cannot read it as UTF-8 text ({exc})") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SlmembedError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from exc
    if data is None:  # an empty file would otherwise train the defaults, which it never asked for
        raise SlmembedError(f"{path}: the recipe is empty; expected a mapping with some of the sections "
                            f"{', '.join(f.name for f in dataclasses.fields(Recipe))}")
    return recipe_from_dict(data, where=str(path))


def with_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """Apply ``section.key=value`` overrides (values parsed as YAML), e.g. ``train.lr=5e-4``."""
    data = recipe.to_dict()
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) not in (1, 2):
            raise SlmembedError(f"override {item!r}: expected section.key=value, e.g. train.lr=5e-4")
        target = data if len(parts) == 1 else data.get(parts[0])
        if not isinstance(target, dict) or parts[-1] not in target:
            raise SlmembedError(f"override {item!r}: no field {key!r} in the recipe")
        try:
            target[parts[-1]] = _parse_yaml(raw)
        except yaml.YAMLError as exc:
            raise SlmembedError(f"override {item!r}: not a YAML value ({getattr(exc, 'problem', None) or exc}); "
                                "quote text with braces or colons, e.g. model.prompt='\"{} means\"'") from exc
    return recipe_from_dict(data, where="recipe (with overrides)")
