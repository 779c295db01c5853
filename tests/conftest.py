"""Shared fixtures: the packaged SmolLM2 folder, tiny random models of the paper's architectures, and unsafe
variants of one (pickle weights, remote code)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GemmaConfig, LlamaConfig, PhiConfig

from slmembed import models, reproduce, soup
from slmembed.data import sts
from slmembed.data.sts import StsSet

# The data directory as slmembed finds it (SLMEMBED_DATA, as on the GPU machine; else ../shared/data).
DATA = Path(os.environ.get("SLMEMBED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")

# Tiny random stand-ins for the paper's models: Gemma-2B (gemma), Phi-2 (phi) and MiniCPM-2B, whose remote code is a
# Llama-style decoder with q_proj/v_proj (llama).
TINY = {
    "gemma": GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=1, head_dim=8),
    "phi": PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    "llama": LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2),
}


# The longest tests (pytest --durations, 2 cores), longest first, and the modules whose shared fixtures make them long
# together. They run first, so that xdist's workers do not end with one of them running alone.
LONGEST = (
    "test_train.py::test_real_training_on_smollm2_lowers_the_loss",
    "test_evaluate.py::test_all_minilm_l6_v2_agrees_with_mteb_on_all_nine_sets",
    "test_sharding.py::test_fsdp_lora_equals_ddp_and_resumes_exactly",
    "test_kill_resume.py::test_killed_runs_resume_to_the_uninterrupted_result",
    "test_multinode.py::test_two_launchers_equal_one_and_resume_after_one_is_killed",
    "test_sharding.py::test_fsdp_full_fine_tuning_equals_ddp",
    "test_gradcache.py::test_compiled_training_matches_eager_training",
    "test_reproduce.py::test_reproduce_writes_json_table_plot_and_curve",
    "test_train.py::test_torchrun_two_cpu_ranks_equal_one_process_at_twice_the_batch",
    "test_cli.py::test_eval_writes_the_documented_json",
    "test_export.py::",  # whole modules: their module-scoped fixtures are built once per worker that runs them
    "test_serve.py::",
)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (the README's ``-n auto``), each test process takes its share of the cores, not all of them:
    torch's threads here, OMP_NUM_THREADS for the processes tests start. Tests are handed to the workers one at a
    time as they free up (the longest first: ``pytest_collection_modifyitems``), not in chunks of a quarter of the
    suite, which would give one worker all of the longest."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    if getattr(config.option, "maxschedchunk", False) is None:
        config.option.maxschedchunk = 1


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The LONGEST tests first, in its order; the others keep theirs."""
    def rank(item: pytest.Item) -> int:
        name = item.nodeid.rpartition("/")[2]
        return next((i for i, prefix in enumerate(LONGEST) if name.startswith(prefix)), len(LONGEST))

    items.sort(key=rank)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    assert DATA.is_dir(), f"tests need the data in {DATA}"
    return DATA


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The packaged SmolLM2-135M, converted once from GGUF into the cache; or, where the package is not installed
    (a GPU machine), $SLMEMBED_TEST_TOKENIZER: a folder with its tokenizer alone, for the tests of tiny models."""
    tokenizer = os.environ.get("SLMEMBED_TEST_TOKENIZER")
    return Path(tokenizer) if tokenizer else Path(models.resolve("smollm2-135m"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, smollm2_dir) -> dict[str, Path]:
    """Folders with a tiny random model per architecture, sharing SmolLM2's tokenizer (right padding)."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    out = {}
    for arch, config in TINY.items():
        folder = tmp_path_factory.mktemp(f"tiny-{arch}")
        config = config.__class__(**{**config.to_dict(), "vocab_size": len(tokenizer),
                                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.eos_token_id})
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        out[arch] = folder
    return out


def _copy(src: Path, dest: Path, skip_suffix: str = "") -> Path:
    dest.mkdir()
    for f in src.iterdir():
        if not skip_suffix or f.suffix != skip_suffix:
            shutil.copy(f, dest / f.name)
    return dest


@pytest.fixture
def pickle_model(tmp_path, tiny_models) -> Path:
    """The tiny Llama with its weights as a pickle, pytorch_model.bin, and no safetensors."""
    folder = _copy(tiny_models["llama"], tmp_path / "pickle-model", skip_suffix=".safetensors")
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).state_dict(), folder / "pytorch_model.bin")
    return folder


@pytest.fixture
def remote_code_model(tmp_path, tiny_models) -> Path:
    """The tiny Llama as a model that needs its own code (as MiniCPM-2B does); that code raises if it ever runs."""
    folder = _copy(tiny_models["llama"], tmp_path / "remote-code-model")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "minicpm"  # a type transformers only knows through remote code
    config["auto_map"] = {"AutoModel": "modeling_custom.CustomModel", "AutoConfig": "modeling_custom.CustomConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_custom.py").write_text("raise RuntimeError('remote code ran')\n")
    return folder


@pytest.fixture
def few_pairs(monkeypatch) -> None:
    """Every STS set cut to its first 40 pairs where reproduce, soup and the tests load it: the scores compared are
    computed alike, in a fraction of the time."""
    full = sts.load_sts

    def cut(task: str, data_dir=None, split: str = "test") -> StsSet:
        whole = full(task, data_dir, split)
        return StsSet(whole.name, whole.sentences1[:40], whole.sentences2[:40], whole.scores[:40])

    for module in (sts, reproduce, soup):
        monkeypatch.setattr(module, "load_sts", cut)
