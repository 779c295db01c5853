"""Fused GPU kernels for a decoder's memory-bound work, from liger-kernel (``train.kernels: liger``).

At large batches a small decoder's step is not bound by its matrix products but by the elementwise work around them
(bench/NOTES.md: about 45% of Gemma-3-270M's GPU time at batch 512 goes to RMSNorms in fp32, the gated MLP's
activation and rotary embeddings). liger-kernel has Triton kernels for exactly these (RMSNorm, GeGLU/SwiGLU, RoPE),
checked against transformers' modules, so slmembed uses them rather than its own: this module only checks that they
can run and applies them to the loaded backbone, before LoRA wraps it.

liger patches the model's transformers module as well as the instance (its functions and classes for that
architecture), so every model of that architecture loaded later in the same process gets the kernels too.
"""

from __future__ import annotations

import importlib.util
import inspect

import torch

from slmembed.errors import SlmembedError

# model_type -> liger's function for it (each also patches the given instance's already-built modules)
LIGER = {
    "gemma": "apply_liger_kernel_to_gemma",
    "gemma2": "apply_liger_kernel_to_gemma2",
    "gemma3_text": "apply_liger_kernel_to_gemma3_text",
    "llama": "apply_liger_kernel_to_llama",
    "mistral": "apply_liger_kernel_to_mistral",
    "qwen2": "apply_liger_kernel_to_qwen2",
}
# What slmembed asks of liger: the block's norms, gated MLP and rotary embeddings; never its loss functions or the
# language-model head's forward (an embedding model has neither).
_WANTED = {"rope": True, "rms_norm": True, "geglu": True, "swiglu": True, "cross_entropy": False,
           "fused_linear_cross_entropy": False}


def check(kernels: str, compiled: bool, device: torch.device) -> None:
    """Refuse, in one line and before anything loads, kernels that cannot run here."""
    if kernels == "none":
        return
    if compiled:  # torch.compile cannot trace them (bench/NOTES.md); custom ops around liger's kernels would fix it
        raise SlmembedError(f"train.kernels: {kernels} cannot run compiled yet (torch.compile fails to trace "
                            "liger-kernel's Triton kernels): set train.compile=false or train.kernels=none")
    if device.type != "cuda":
        raise SlmembedError(f"train.kernels: {kernels} runs Triton kernels on a GPU; this run is on the "
                            f"{device.type}: set train.kernels=none")
    if importlib.util.find_spec("liger_kernel") is None:
        raise SlmembedError("train.kernels: liger needs liger-kernel: .venv/bin/pip install liger-kernel "
                            "(or set train.kernels=none)")


def apply(model: torch.nn.Module, kernels: str) -> None:
    """Swap ``model``'s norms, gated MLPs and rotary embeddings for the named library's fused kernels, in place."""
    if kernels == "none":
        return
    model_type = getattr(model.config, "model_type", None)
    if model_type not in LIGER:
        raise SlmembedError(f"train.kernels: liger has no kernels for model type {model_type!r} in slmembed "
                            f"(supported: {', '.join(sorted(LIGER))}); set train.kernels=none")
    import liger_kernel.transformers as liger

    fn = getattr(liger, LIGER[model_type])
    params = inspect.signature(fn).parameters
    fn(model=model, **{k: v for k, v in _WANTED.items() if k in params})
