"""Causal or bidirectional self-attention for a loaded decoder, as LLM2Vec and EmbeddingGemma use: ``use(model, mode)``.

No model class is replaced (LLM2Vec subclasses each architecture's model and attention): transformers (>= 5.2, as
this package requires) makes any well-behaved decoder bidirectional through its config. Three things decide what a
forward computes:

* Masks. ``create_causal_mask`` and ``create_sliding_window_causal_mask`` (masking_utils) return bidirectional,
  padding-only masks when ``config.is_causal`` is False.
* The kernel, where no mask was built (a batch without padding: SDPA and FlashAttention then run mask-free, causal
  or not). An ``is_causal`` keyword wins over the attention module's own ``is_causal``, which e.g. LlamaAttention
  hard-codes to True; and the model's forward (``merge_with_config_defaults``) hands ``config.is_causal``, where the
  config has one, to every layer as that keyword. So the config alone decides, in this process and after a reload.
* Gemma's native ``use_bidirectional_attention`` (EmbeddingGemma's config). Gemma-3 builds its masks from it: full
  layers see every real token, sliding layers the tokens j with ``|i - j| < w'``, where ``w' = w // 2 + 1`` is what
  the config computes from the saved window ``w`` (a window of w centred on the token); its attention modules read
  the flag when built. Gemma and Gemma-2 read it only in their attention modules, their masks stay causal (padded
  and unpadded batches would then differ): they need ``is_causal`` as well. Gemma-3 must not get ``is_causal``:
  its sliding layers would then get masking_utils' own bidirectional window instead of EmbeddingGemma's.

Flags set for ``bidirectional``, per architecture (``model_type``):

* ``gemma3_text``: ``use_bidirectional_attention=True`` and ``sliding_window`` as the config computes it for the flag;
* ``gemma``, ``gemma2``: ``use_bidirectional_attention=True`` and ``is_causal=False``;
* every other decoder (llama, qwen2, mistral, phi, ...): ``is_causal=False``;

and in every case each attention module's ``is_causal`` (and Gemma-3's ``sliding_window``) as a fresh load of the
switched config gives them, which slmembed reads (``is_causal``, packing.py). ``save_pretrained`` writes these
config flags into config.json, so plain ``AutoModel.from_pretrained`` (sentence-transformers included) loads the
model bidirectional again, without remote code (tests/test_attention.py checks unpadded and padded batches).

``causal`` undoes slmembed's switch exactly (config and modules as they were). A model slmembed did not switch is
left as loaded: a decoder stays causal, and a model whose config makes it bidirectional (an export of a
bidirectional run, EmbeddingGemma, an encoder) stays bidirectional.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedConfig, PreTrainedModel

MODES = ("causal", "bidirectional")
NATIVE_MASKS = frozenset({"gemma3_text"})  # builds its masks from use_bidirectional_attention itself
NATIVE_FLAG = frozenset({"gemma", "gemma2", "gemma3_text"})  # has use_bidirectional_attention (bool)
_SAVED = "_slmembed_causal_attention"  # the state ``use(model, "bidirectional")`` changed, on the model


def pretrained(model: torch.nn.Module) -> PreTrainedModel | None:
    """The outermost transformers model inside ``model`` (which may be wrapped by PEFT or DDP), if any."""
    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


def modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention modules of ``model`` that carry an ``is_causal`` flag."""
    return [m for m in model.modules() if "Attention" in type(m).__name__ and hasattr(m, "is_causal")]


def bidirectional_config(config: PreTrainedConfig) -> dict:
    """The config attributes (name: value) that make ``config``'s model bidirectional (the module docstring's table).

    Set on a loaded config (``setattr``, after its ``__post_init__``), they make a causal model's folder load as this
    module's switch leaves the model. (Not as ``from_pretrained`` keywords: those that are no attribute of the
    config class, like ``is_causal``, go to the model's ``__init__``, which refuses them.)"""
    arch = config.model_type
    flags = {} if arch in NATIVE_MASKS else {"is_causal": False}
    if arch in NATIVE_FLAG:
        flags["use_bidirectional_attention"] = True
        if getattr(config, "sliding_window", None) is not None:  # the window the config derives for the flag
            native = type(config).from_dict({**config.to_dict(), "use_bidirectional_attention": True})
            flags["sliding_window"] = native.sliding_window
    return flags


def config_bidirectional(config: PreTrainedConfig) -> bool:
    """Whether ``config`` makes its model's self-attention bidirectional."""
    return getattr(config, "is_causal", True) is False or (
        config.model_type in NATIVE_MASKS and bool(getattr(config, "use_bidirectional_attention", False)))


def is_causal(model: torch.nn.Module) -> bool:
    """True if the model has attention modules, every one of them is causal, and its config does not make them
    bidirectional (decoders as pre-trained; not BERT-like encoders, not bidirectional decoders)."""
    flags = [m.is_causal for m in modules(model)]
    base = pretrained(model)
    return (bool(flags) and all(flag is True for flag in flags)
            and not (base is not None and config_bidirectional(base.config)))


def use(model: torch.nn.Module, mode: str) -> None:
    """Make ``model``'s self-attention ``bidirectional``, or undo that (``causal``; see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"attention must be one of {MODES}, got {mode!r}")
    base = pretrained(model)
    saved = getattr(base, _SAVED, None) if base is not None else None
    if mode == "causal":
        if saved is not None:
            _restore(base, saved)
        return
    if base is None:
        raise ValueError(f"{type(model).__name__} holds no transformers model: its attention cannot be switched")
    config = base.config
    flags = bidirectional_config(config)
    if saved is None:
        missing = object()
        # Kept on the model, not the config: a config's attributes are saved with it.
        setattr(base, _SAVED, {
            "config": {name: getattr(config, name, missing) for name in flags},
            "modules": [(m, m.is_causal, getattr(m, "sliding_window", missing)) for m in modules(base)],
            "missing": missing})
    window = getattr(config, "sliding_window", None)
    for name, value in flags.items():
        setattr(config, name, value)
    for m in modules(base):
        m.is_causal = False
        if "sliding_window" in flags and getattr(m, "sliding_window", None) == window and window is not None:
            m.sliding_window = flags["sliding_window"]  # Gemma-3's sliding layers copy the config's at init


def _restore(base: PreTrainedModel, saved: dict) -> None:
    missing = saved["missing"]
    for name, value in saved["config"].items():
        if value is missing:
            if name in vars(base.config):
                delattr(base.config, name)
        else:
            setattr(base.config, name, value)
    for m, causal, window in saved["modules"]:
        m.is_causal = causal
        if window is not missing:
            m.sliding_window = window
    delattr(base, _SAVED)
