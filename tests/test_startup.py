"""Commands whose work needs no model answer before the heavy libraries load: checked in a fresh process, where
``sys.modules`` shows what an import (or a whole refused command) pulled in."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "peft", "accelerate")
# What an evaluation of a plain model has no use for: adapters (peft), scipy.stats (evaluate.spearman), plots,
# sentence-transformers (compact vectors only), onnxruntime (ONNX exports only), the hub's datasets (no data folder),
# gguf (converting a packaged model, done once) and what transformers may import but does not need to.
EVAL_UNUSED = ("peft", "scipy.stats", "matplotlib", "sentence_transformers", "onnxruntime", "datasets", "gguf",
               "pandas", "sklearn")


def _loaded_after(code: str, modules: tuple[str, ...] = HEAVY) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {modules!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.splitlines()[-1].split())  # the last line: a command prints its own output first


@pytest.mark.parametrize("module", ["slmembed.report", "slmembed.config", "slmembed.cli", "slmembed.tables",
                                    "slmembed.spec", "slmembed.losses", "slmembed.outputs", "slmembed.run",
                                    "slmembed.train_output", "slmembed.reproduce", "slmembed.composite",
                                    "slmembed.demo", "slmembed.export", "slmembed.embed_file", "slmembed.endpoint"])
def test_light_modules_import_no_torch(module: str) -> None:
    assert _loaded_after(f"import {module}") == set()


def test_a_bad_recipe_is_refused_without_loading_torch(tmp_path) -> None:
    code = ("from slmembed.cli import main\n"
            f"assert main(['train', '--recipe', 'smollm2-135m', '--output', {str(tmp_path / 'run')!r}, "
            "'--set', 'train.temperature=-0.05', '--set', 'model.pooling=mean']) == 2")
    assert _loaded_after(code) == set()


def test_a_bad_reference_is_refused_without_loading_torch(tmp_path) -> None:
    code = ("from slmembed.cli import main\n"
            f"assert main(['train', '--recipe', 'smollm2-135m', '--output', {str(tmp_path / 'run')!r}, "
            f"'--set', 'train.loss=guided_infonce', '--set', 'train.reference={tmp_path / 'missing'}']) == 2")
    assert _loaded_after(code) == set()


@pytest.mark.parametrize("sets", [["soup.seeds=[7, 7]"], ["train.loss=distill_infonce", "train.reference=recipe:nope"]])
def test_a_bad_soup_or_teacher_recipe_is_refused_without_loading_torch(sets: list[str], tmp_path) -> None:
    options = [a for s in sets for a in ("--set", s)]
    code = ("from slmembed.cli import main\n"
            f"assert main(['reproduce', '--recipe', 'smollm2-135m', '--output', {str(tmp_path / 'out')!r}, "
            f"'--run', {str(tmp_path / 'run')!r}, *{options!r}]) == 2")
    assert _loaded_after(code) == set()


@pytest.mark.parametrize("command", [["train", "--recipe", "smollm2-135m"], ["demo"],
                                     ["reproduce", "--model", "smollm2-135m"]])
def test_an_output_that_is_refused_loads_no_torch(command: list[str], tmp_path) -> None:
    """The output checks of the commands that train run before the heavy imports."""
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    code = f"from slmembed.cli import main\nassert main({[*command, '--output', str(foreign)]!r}) == 2"
    assert _loaded_after(code) == set()


def test_eval_of_a_model_imports_nothing_it_does_not_use(tiny_models) -> None:
    code = ("from slmembed.cli import main\n"
            f"assert main(['eval', '--model', {str(tiny_models['llama'])!r}, '--tasks', 'BIOSSES', '--device', 'cpu']) "
            "== 0")
    loaded = _loaded_after(code, ("torch", "transformers", *EVAL_UNUSED))
    assert loaded == {"torch", "transformers"}  # the model was loaded and scored, with none of the others
