"""device.py: the device a command runs on, CUDA's set-up in the background, and where bf16 is native."""

from __future__ import annotations

import threading

import pytest
import torch

from slmembed import device, tuning
from slmembed.config import Recipe
from slmembed.errors import SlmembedError


def test_a_gpu_started_in_the_background_never_raises_there(monkeypatch) -> None:
    """``start`` asks CUDA to set up in a thread of its own, and only for a CUDA device; a failure there (here, on a
    machine without CUDA, every time) is left to the model's load to report, not printed from the thread."""
    raised = []
    monkeypatch.setattr(threading, "excepthook", raised.append)
    device.start(torch.device("cpu"))
    assert not [t for t in threading.enumerate() if t.name == "slmembed-cuda-start"]
    device.start(torch.device("cuda"))
    for thread in [t for t in threading.enumerate() if t.name == "slmembed-cuda-start"]:
        thread.join()
    assert raised == []


@pytest.mark.parametrize("avx512_bf16, amx, native", [(False, False, False), (True, False, True), (False, True, True)])
def test_bf16_only_where_the_cpu_computes_it(monkeypatch, avx512_bf16: bool, amx: bool, native: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cpu = torch.device("cpu")
    assert device.computes_bf16(cpu) is native
    assert device.best_dtype(cpu) == (torch.bfloat16 if native else torch.float32)
    recipe = Recipe()
    assert recipe.train.bf16 and tuning.uses_bf16(recipe, cpu) is native
    assert tuning.weights_dtype(recipe, cpu) == (torch.bfloat16 if native else torch.float32)
    recipe.train.bf16 = False
    assert not tuning.uses_bf16(recipe, cpu) and tuning.weights_dtype(recipe, cpu) == torch.float32


def test_auto_is_the_gpu_where_one_is_visible_and_cuda_without_one_is_refused(monkeypatch) -> None:
    for visible in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda visible=visible: visible)
        assert device.resolve_device() == torch.device("cuda" if visible else "cpu")
        assert device.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SlmembedError, match=r"^--device cuda: no CUDA GPU is visible on this machine$"):
        device.resolve_device("cuda")


def test_result_files_name_the_cpu_with_its_threads() -> None:
    assert device.device_name(torch.device("cpu")) == f"cpu ({torch.get_num_threads()} threads)"
