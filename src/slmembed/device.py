"""The device, its set-up and its precision: which device a command runs on, CUDA's set-up in the background, how
result files name the hardware, and whether bf16 is computed natively there."""

from __future__ import annotations

import contextlib
import threading

import torch

from slmembed.errors import SlmembedError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda if visible, else cpu; asking for cuda without a GPU is a user error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SlmembedError("--device cuda: no CUDA GPU is visible on this machine")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def start(device: torch.device) -> None:
    """Have CUDA set up ``device`` (its context, the memory allocator) in a background thread, which overlaps what
    the caller does next (importing transformers, reading the tokenizer) instead of delaying the model's load: torch
    leaves Python's lock while it allocates, and the first CUDA call after it waits for it. Nothing for other
    devices."""
    if device.type == "cuda":
        threading.Thread(target=_start_cuda, args=(device,), name="slmembed-cuda-start").start()


def _start_cuda(device: torch.device) -> None:
    with contextlib.suppress(Exception):  # whatever fails here fails again where the model loads, and is told there
        torch.zeros(1, device=device)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU and its thread count: how result files name the machine part that ran them."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def computes_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX. Other CPUs
    run bf16 through oneDNN's emulation, at a fraction of float32's speed (``bench/cpu_times.py`` records both on the
    development machine, an AVX-512 CPU without them: about a fifth)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(getattr(torch.cpu, probe, lambda: False)()
                   for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def best_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device computes it natively (``computes_bf16``), else fp32."""
    return torch.bfloat16 if computes_bf16(device) else torch.float32
