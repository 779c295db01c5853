"""Recipes: dataclasses that round-trip through the YAML files in ``configs/``.

A recipe has four sections, each a dataclass below. Unknown keys and wrongly typed values are rejected with a
message naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slmembed.errors import SlmembedError


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"
    trust_remote_code: bool = False
    allow_pickle: bool = False  # load pickle weights (pytorch_model.bin, .pt); needs --allow-pickle too
    pooling: str = "last"
    prompt: str | None = None
    max_length: int = 150
    append_eos: bool = True


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 32
    dropout: float = 0.1
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    layers: list[int] | None = None  # None: every layer; else only these (negative counts from the top)


@dataclass
class TrainConfig:
    lr: float = 5e-5
    schedule: str = "cosine"  # cosine | linear | constant, each after the warm-up
    warmup_steps: int = 100
    batch_size: int = 60
    epochs: int = 1
    max_steps: int | None = None
    temperature: float = 0.05
    hard_negatives: bool = True
    weight_decay: float = 0.0
    bf16: bool = True
    chunk_tokens: int = 4096  # tokens per forward chunk (padded ones, or real ones when packed)
    packing: bool | None = None  # chunks as one row without padding (packing.py); None: where supported, on a GPU
    grad_cache: bool = False  # cached negatives (GradCache): memory set by chunk_tokens, not batch_size
    compile: bool = False  # torch.compile each transformer block (compile.py): fused kernels, a one-off compile time
    seed: int = 42
    save_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10


@dataclass
class DataConfig:
    sources: list[str] = field(default_factory=lambda: ["all"])
    max_triplets: int | None = None
    skip_bad_rows: bool = False


@dataclass
class Recipe:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


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


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise SlmembedError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise SlmembedError(f"{where}: unknown field(s) {', '.join(unknown)}; expected {', '.join(sorted(fields))}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{where}.{key}")
        else:
            kwargs[key] = _check(value, hint, f"{where}.{key}")
    return cls(**kwargs)


def recipe_from_dict(data: dict[str, Any], where: str = "recipe") -> Recipe:
    return _build(Recipe, data, where)


CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def load_recipe(path_or_name: str | Path) -> Recipe:
    """Load a recipe from a YAML file, or by name from ``configs/`` (e.g. ``gemma-2b``)."""
    path = Path(path_or_name)
    if not path.exists() and (CONFIG_DIR / f"{path_or_name}.yaml").exists():
        path = CONFIG_DIR / f"{path_or_name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
        raise SlmembedError(f"no recipe {str(path_or_name)!r}: give a YAML file or one of {', '.join(known)}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SlmembedError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from exc
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
        target[parts[-1]] = yaml.safe_load(raw)
    return recipe_from_dict(data, where="recipe (with overrides)")
