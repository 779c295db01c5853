"""A sentence-transformers folder (``modules.json``) as slmembed runs it: reproduced exactly, or refused by name.

sentence-transformers runs a folder's modules in order. slmembed reproduces these, and refuses any other module (e.g.
LayerNorm, WordEmbeddings, CNN, LSTM, StaticEmbedding, Router, custom classes) and any setting it does not apply, in
one line naming it, before the model is loaded:

* Transformer, first, at the folder's root: the backbone. Texts are cut to its ``max_seq_length`` tokens (specials
  included), else to the tokenizer's ``model_max_length`` capped at the model's ``max_position_embeddings``, as
  sentence-transformers sets them; ``do_lower_case`` lower-cases them (``lowercase``). No EOS is appended: the
  tokenizer adds the special tokens it adds in sentence-transformers.
* Pooling, right after it: ``cls``, ``mean`` and ``lasttoken`` (slmembed's ``cls``, ``mean`` and ``last``);
  ``mean_sqrt_len_tokens`` is mean times a positive number per text, which normalisation removes, so it is taken as
  mean where no Dense follows. ``include_prompt: false`` leaves the prompt's tokens out of pooling.
* Then Dense (a linear layer with its bias, an activation ``torch.nn`` names and an optional residual; weights from
  ``model.safetensors``, or a pickle only with ``allow_pickle``), Normalize and Dropout (nothing at inference), in any
  order: the head (``head``) that the Embedder applies to pooled vectors before it normalises them.
* ``config_sentence_transformers.json``: the default prompt (``prompts[default_prompt_name]``) is put before every
  text and ``truncate_dim`` keeps the head's first dimensions, as ``SentenceTransformer.encode`` does.

slmembed L2-normalises every vector (its contract): a pipeline without Normalize gives vectors of other lengths in
sentence-transformers, with the same cosine similarities, which is all slmembed compares. A folder whose similarity
function is not cosine is refused unless its vectors are normalised (dot products are then cosines).

Padding: slmembed gives every text the positions it has alone (embedder.py), sentence-transformers those of its
batch; they agree where the tokenizer pads on the right, as encoders' and most decoders' tokenizers do.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from slmembed import models
from slmembed.errors import SlmembedError
from slmembed.pooling import FROM_ST, LEGACY_MODES

APPLIED = ("Transformer", "Pooling", "Dense", "Normalize", "Dropout")
HUB = {"trust_remote_code", "cache_dir", "revision", "local_files_only", "token", "subfolder"}  # where, not what
PLAIN_TEXT = {"method": "forward", "method_output_name": "last_hidden_state"}  # modality_config's "text"
# sentence_bert_config.json: the settings slmembed applies, each with the values it takes (None: any)
TRANSFORMER_SETTINGS: dict[str, tuple | None] = {
    "max_seq_length": None, "do_lower_case": None, "unpad_inputs": None,  # unpadding changes speed, not vectors
    "transformer_task": ("feature-extraction",), "modality_config": None,  # _modalities
    "module_output_name": (None, "token_embeddings"), "processing_kwargs": (None, {}), "query_length": (None,),
    "document_length": (None,), "query_expansion": (None,), "tokenizer_name_or_path": (None,),
}
# the backbone's loading arguments (old and new names) and those that leave what it computes as it is (the dtype:
# slmembed picks its own; the padding side: slmembed pads as embedder.py says, exact either way)
LOADING_ARGS = {"model_args": "model", "model_kwargs": "model", "tokenizer_args": "processor",
                "processor_kwargs": "processor", "config_args": "config", "config_kwargs": "config"}
ARGS_KEPT = {"model": HUB | {"torch_dtype", "dtype", "attn_implementation"},
             "processor": HUB | {"padding_side", "model_max_length"}, "config": HUB}
CHAT_TEMPLATES = ("chat_template.jinja", "chat_template.json")
DENSE_SETTINGS = {"in_features", "out_features", "bias", "activation_function", "module_input_name",
                  "module_output_name", "use_residual"}


@dataclass(frozen=True)
class Dense:
    """A Dense module's folder and config.json."""

    folder: Path
    config: dict


@dataclass(frozen=True)
class Pipeline:
    """What slmembed applies of a sentence-transformers folder (see the module docstring)."""

    pooling: str  # slmembed's name (spec.POOLINGS)
    include_prompt: bool
    max_length: int
    prompt: str | None  # a template for EmbedSpec.prompt: ``{}`` is the text, other braces doubled
    lower_case: bool
    steps: tuple[Dense | str, ...]  # after pooling: Dense, or "normalize"
    truncate_dim: int | None

    def head(self, allow_pickle: bool = False) -> torch.nn.Module | None:
        """The modules after pooling as one torch module (None where they only normalise): Dense layers with their
        weights read, Normalize, and the truncation to ``truncate_dim``. Normalize steps after the last Dense are
        left out: the Embedder normalises anyway, and truncation commutes with scaling."""
        last_dense = max((i for i, step in enumerate(self.steps) if isinstance(step, Dense)), default=-1)
        layers: list[torch.nn.Module] = [_dense(step, allow_pickle) if isinstance(step, Dense) else Normalize()
                                         for step in self.steps[: last_dense + 1]]
        if self.truncate_dim is not None:
            layers.append(Truncate(self.truncate_dim))
        return torch.nn.Sequential(*layers).eval() if layers else None


def read(folder: Path) -> Pipeline | None:
    """The pipeline of a sentence-transformers folder, None for a folder without ``modules.json``; refuses what
    slmembed cannot apply (SlmembedError naming the folder and the module or setting)."""
    listing = _json(folder / "modules.json")
    if listing is None:
        return None
    if not isinstance(listing, list) or not all(isinstance(m, dict) and isinstance(m.get("type"), str)
                                                and _relative(m.get("path")) for m in listing):
        raise SlmembedError(f"{folder / 'modules.json'}: expected a list of modules, each with a type and a path "
                            "inside the folder")
    settings = _json(folder / "config_sentence_transformers.json") or {}
    if settings.get("model_type", "SentenceTransformer") != "SentenceTransformer":
        raise SlmembedError(f"{folder}: a {settings['model_type']} model, not a SentenceTransformer: slmembed embeds "
                            "with dense sentence embedding models only")
    kinds = [_kind(folder, module) for module in listing]
    if kinds[:2] != ["Transformer", "Pooling"] or any(k in ("Transformer", "Pooling") for k in kinds[2:]):
        raise SlmembedError(f"{folder}: modules {', '.join(kinds)}: slmembed applies a Transformer, then a Pooling, "
                            "then Dense, Normalize and Dropout modules")
    if listing[0]["path"] not in ("", "."):
        raise SlmembedError(f"{folder}: the Transformer is in {listing[0]['path']}/: slmembed loads the backbone from "
                            "the folder itself")
    lower_case, max_length = _transformer(folder)
    modules = zip(listing[2:], kinds[2:], strict=True)
    steps = tuple(_step(folder, module, kind) for module, kind in modules if kind != "Dropout")
    pooling, include_prompt, width = _pooling(folder / listing[1]["path"],
                                              any(isinstance(s, Dense) for s in steps))
    _check_dims(width, steps)
    normalised = bool(steps) and steps[-1] == "normalize" and settings.get("truncate_dim") is None
    similarity = settings.get("similarity_fn_name")
    if similarity not in (None, "cosine") and not (similarity == "dot" and normalised):
        raise SlmembedError(f"{folder}: similarity_fn_name {similarity!r} on vectors it does not normalise: slmembed "
                            "compares L2-normalised vectors by cosine")
    truncate_dim = settings.get("truncate_dim")
    if truncate_dim is not None and (not isinstance(truncate_dim, int) or truncate_dim < 1):
        raise SlmembedError(f"{folder}: truncate_dim: expected a positive integer, got {truncate_dim!r}")
    return Pipeline(pooling, include_prompt, max_length, _prompt(folder, settings), lower_case, steps,
                    truncate_dim)


def lowercase(tokenizer) -> None:
    """Lower-case texts before ``tokenizer`` splits them, as sentence-transformers' ``do_lower_case`` does: a
    Lowercase step first in the fast tokenizer's normaliser."""
    from tokenizers.normalizers import Lowercase, Sequence

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise SlmembedError(f"do_lower_case needs a fast tokenizer, not {type(tokenizer).__name__}")
    current = backend.normalizer
    backend.normalizer = Sequence([Lowercase()] + ([current] if current is not None else []))


def prompt_tokens(tokenizer, prefix: str, max_length: int) -> int:
    """The tokens of a prompt's text before ``{}`` (``EmbedSpec.parts``), counted as sentence-transformers counts a
    prompt to leave out of pooling: tokenised alone, special tokens in, but a special token at its end."""
    ids = tokenizer(prefix, truncation=True, max_length=max_length)["input_ids"]
    return len(ids) - int(bool(ids) and ids[-1] in tokenizer.all_special_ids)


class Normalize(torch.nn.Module):
    """L2 normalisation of the vectors so far."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)


class Truncate(torch.nn.Module):
    """The first ``dim`` dimensions."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., : self.dim]


class DenseLayer(torch.nn.Module):
    """sentence-transformers' Dense: ``activation_function(linear(x))``, plus ``x`` (``residual(x)`` where the widths
    differ) with ``use_residual``. Attribute names are its own, so its saved weights load as they are."""

    def __init__(self, linear: torch.nn.Linear, activation_function: torch.nn.Module, use_residual: bool) -> None:
        super().__init__()
        self.linear, self.activation_function = linear, activation_function
        self.residual: torch.nn.Module | None = None
        if use_residual:
            same = linear.in_features == linear.out_features
            self.residual = torch.nn.Identity() if same else torch.nn.Linear(linear.in_features, linear.out_features,
                                                                            bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.activation_function(self.linear(x))
        return out if self.residual is None else out + self.residual(x)


def _relative(path: object) -> bool:
    """Whether a module's path is a folder inside the model folder (or the folder itself)."""
    return isinstance(path, str) and not Path(path).is_absolute() and ".." not in Path(path).parts


def _json(path: Path) -> object:
    """A JSON file's content, None where it does not exist."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SlmembedError(f"{path}: not readable as JSON ({str(exc).splitlines()[0]})") from exc


def _kind(folder: Path, module: dict) -> str:
    """The sentence-transformers class a module is, if slmembed applies it; refuses any other."""
    ref = str(module["type"])
    name = ref.rpartition(".")[2]
    where = f"module {module['path'] or module.get('name', '?')}"
    if not ref.startswith("sentence_transformers."):
        raise SlmembedError(f"{folder}: {where} is the custom class {ref}, which slmembed cannot apply")
    if name not in APPLIED:
        raise SlmembedError(f"{folder}: {where} is {name} ({ref}), which slmembed cannot apply (it applies "
                            f"{', '.join(APPLIED)})")
    return name


def _transformer(folder: Path) -> tuple[bool, int]:
    """``do_lower_case`` and the longest input in tokens of the folder's Transformer (sentence_bert_config.json)."""
    path = folder / "sentence_bert_config.json"
    config = _json(path) or {}
    limit = config.get("max_seq_length")
    for key, value in config.items():
        if key in LOADING_ARGS and isinstance(value or {}, dict):
            value = value or {}
            if refused := sorted(set(value) - ARGS_KEPT[LOADING_ARGS[key]]):
                raise SlmembedError(f"{path}: Transformer {key} {refused[0]}={value[refused[0]]!r} is not applied by "
                                    "slmembed")
            limit = value.get("model_max_length", limit)  # sentence-transformers gives it to the tokenizer last
        elif key in LOADING_ARGS or key not in TRANSFORMER_SETTINGS or value not in (TRANSFORMER_SETTINGS[key]
                                                                                      or (value,)):
            raise SlmembedError(f"{path}: Transformer setting {key}={value!r} is not applied by slmembed")
    _modalities(path, folder, config.get("modality_config"))
    if limit is None:  # the tokenizer's own, capped at the model's positions
        tokenizer_config = _json(folder / "tokenizer_config.json") or {}
        positions = (_json(folder / "config.json") or {}).get("max_position_embeddings")
        limits = [n for n in (tokenizer_config.get("model_max_length"), positions)
                  if isinstance(n, int) and 0 < n < 10**9]
        if not limits:
            raise SlmembedError(f"{path}: no max_seq_length, and neither the tokenizer nor the model config gives a "
                                "longest input")
        limit = min(limits)
    if not isinstance(limit, int) or limit < 2:
        raise SlmembedError(f"{path}: max_seq_length: expected an integer of at least 2, got {limit!r}")
    return bool(config.get("do_lower_case", False)), limit


def _modalities(path: Path, folder: Path, modalities: dict | None) -> None:
    """Refuse a Transformer that does not embed a text as it is: sentence-transformers (>= 6) runs texts through
    the tokenizer's chat template where the modalities include "message", which it assumes for a tokenizer with a
    chat template where the config names none."""
    if modalities is None:
        tokenizer_config = _json(folder / "tokenizer_config.json") or {}
        if tokenizer_config.get("chat_template") or any((folder / name).exists() for name in CHAT_TEMPLATES):
            raise SlmembedError(f"{path}: no modality_config, and the tokenizer has a chat template, through which "
                                "sentence-transformers runs every text; slmembed embeds the text itself (a "
                                "modality_config of text alone makes them agree)")
        return
    if not isinstance(modalities, dict) or modalities.get("text") != PLAIN_TEXT:
        raise SlmembedError(f"{path}: Transformer modality_config {modalities!r}: slmembed embeds text through the "
                            "model's forward and last hidden state only")
    if "message" in modalities:
        raise SlmembedError(f"{path}: Transformer modality_config has 'message': sentence-transformers runs every "
                            "text through the tokenizer's chat template, which slmembed does not apply")


def _pooling(path: Path, dense: bool) -> tuple[str, bool, int | None]:
    """slmembed's pooling, ``include_prompt`` and the embedding dimension (if given) of a Pooling module's folder."""
    config = _json(path / "config.json")
    if not isinstance(config, dict):
        raise SlmembedError(f"{path / 'config.json'}: missing; expected the Pooling module's config")
    mode = config.get("pooling_mode")
    if mode is None:
        mode = [m for key, m in LEGACY_MODES.items() if config.get(key)] or "mean"
    modes = [mode] if isinstance(mode, str) else list(mode)
    if len(modes) != 1:
        raise SlmembedError(f"{path}: Pooling concatenates modes {', '.join(map(str, modes))}: slmembed pools one way")
    mode = modes[0]
    if mode == "mean_sqrt_len_tokens" and not dense:
        mode = "mean"
    if mode not in FROM_ST:
        raise SlmembedError(f"{path}: Pooling mode {mode}{' before a Dense' if mode == 'mean_sqrt_len_tokens' else ''}"
                            f" is not one slmembed applies ({', '.join(FROM_ST)})")
    width = config.get("embedding_dimension", config.get("word_embedding_dimension"))
    return FROM_ST[mode], bool(config.get("include_prompt", True)), width


def _step(folder: Path, module: dict, kind: str) -> Dense | str:
    """A module after pooling: a Dense, or "normalize"; checks that it reads and writes the sentence embedding."""
    path = folder / module["path"]
    config = _json(path / "config.json") or {}
    ends = (config.get("module_input_name", "sentence_embedding"), config.get("module_output_name"))
    if ends[0] != "sentence_embedding" or ends[1] not in (None, "sentence_embedding"):
        raise SlmembedError(f"{path}: {kind} from {ends[0]!r} to {ends[1]!r}: slmembed applies it to the sentence "
                            "embedding only")
    if kind == "Normalize":
        return "normalize"
    if unknown := sorted(set(config) - DENSE_SETTINGS):
        raise SlmembedError(f"{path}: Dense setting {unknown[0]} is not applied by slmembed")
    if not all(isinstance(config.get(key), int) for key in ("in_features", "out_features")):
        raise SlmembedError(f"{path / 'config.json'}: expected in_features and out_features (integers)")
    _activation(path, config)  # refused now, before any weights load
    return Dense(path, config)


def _check_dims(width: int | None, steps: tuple[Dense | str, ...]) -> None:
    """Each Dense takes the width of what comes before it (``width``: the Pooling's, if it gives one)."""
    for step in steps:
        if isinstance(step, Dense):
            if width is not None and step.config["in_features"] != width:
                raise SlmembedError(f"{step.folder}: Dense takes {step.config['in_features']} dimensions, but what "
                                    f"comes before it gives {width}")
            width = step.config["out_features"]


def _activation(path: Path, config: dict) -> torch.nn.Module:
    """The activation a Dense config names: a ``torch.nn`` module class built without arguments (Tanh where it names
    none: sentence-transformers' default; Identity for null)."""
    ref = config.get("activation_function", "torch.nn.modules.activation.Tanh")
    if ref is None:
        return torch.nn.Identity()
    module_name, _, name = str(ref).rpartition(".")
    problem = f"{path}: Dense activation function {ref!r} is not a torch.nn module slmembed can build"
    if not module_name.startswith("torch.nn"):
        raise SlmembedError(problem)
    try:
        cls = getattr(importlib.import_module(module_name), name)
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            raise TypeError(name)
        return cls()
    except (ImportError, AttributeError, TypeError) as exc:
        raise SlmembedError(problem) from exc


def _dense(step: Dense, allow_pickle: bool) -> DenseLayer:
    """A Dense module with its weights (model.safetensors; pytorch_model.bin only with ``allow_pickle``)."""
    config = step.config
    linear = torch.nn.Linear(config["in_features"], config["out_features"], bias=config.get("bias", True))
    layer = DenseLayer(linear, _activation(step.folder, config), bool(config.get("use_residual", False)))
    models.refuse_pickle(step.folder, "model.safetensors", allow_pickle)
    if (file := step.folder / "model.safetensors").exists():
        from safetensors.torch import load_file

        weights = load_file(file)
    elif (file := step.folder / "pytorch_model.bin").exists():
        weights = torch.load(file, map_location="cpu", weights_only=True)
    else:
        raise SlmembedError(f"{step.folder}: no model.safetensors: the Dense module's weights are missing")
    expected = {name: p.shape for name, p in layer.state_dict().items()}
    got = {name: tuple(w.shape) for name, w in weights.items()}
    if got != {name: tuple(shape) for name, shape in expected.items()}:
        raise SlmembedError(f"{file}: weights {got}, expected {dict(expected)} for its config.json")
    layer.load_state_dict({name: w.float() for name, w in weights.items()})
    return layer


def _prompt(folder: Path, settings: dict) -> str | None:
    """The default prompt as an EmbedSpec template (the text after it), or None."""
    name = settings.get("default_prompt_name")
    if name is None:
        return None
    prompts = settings.get("prompts") or {}
    if name not in prompts:
        raise SlmembedError(f"{folder / 'config_sentence_transformers.json'}: default_prompt_name {name!r} is not "
                            f"one of its prompts ({', '.join(prompts) or 'none'})")
    text = prompts[name] or ""
    return text.replace("{", "{{").replace("}", "}}") + "{}" if text else None
