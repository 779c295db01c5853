"""Models made of several runs through `reproduce` (composite.py): a soup of seeds, a student of a recipe's run, and
their one-line refusals before anything trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from slmembed import composite, outputs, soup
from slmembed import train as train_mod
from slmembed.cli import main
from slmembed.config import Recipe, load_recipe, recipe_from_dict, recipe_reference, result_changes
from slmembed.data.sts import TASKS, load_all
from slmembed.errors import SlmembedError
from slmembed.evaluate import evaluate
from slmembed.loading import load_embedder
from slmembed.reproduce import reproduce
from slmembed.run import PARTS, RunDir

RESULTS = Path(__file__).parents[1] / "results" / "reproduce"


def _tiny(tiny_models, **train) -> Recipe:
    """A tiny recipe: 4 steps of 8 triplets."""
    recipe = Recipe(name="tiny")
    recipe.model.name, recipe.model.max_length = str(tiny_models["llama"]), 32
    recipe.data.sources, recipe.data.max_triplets = ["cad_snli"], 32
    for key, value in {"batch_size": 8, "max_steps": 4, "warmup_steps": 1, "lr": 5e-3, "bf16": False,
                       "save_every": 2, **train}.items():
        setattr(recipe.train, key, value)
    return recipe


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(RunDir(run).adapter / "adapter_model.safetensors")


def test_soup_recipe_trains_each_seed_soups_them_and_reuses_finished_members(
        tmp_path, tiny_models, data_dir, monkeypatch, few_pairs) -> None:
    recipe = _tiny(tiny_models)
    recipe.soup.seeds = [1, 2]
    out, run = tmp_path / "results" / "tiny-soup", tmp_path / "run"
    members = [RunDir(run).member(1), RunDir(run).member(2)]

    # Stopped once the members are trained (before the soup): they are finished runs of the recipe with their seed.
    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(soup, "soup", stop)
        with pytest.raises(KeyboardInterrupt):
            reproduce(recipe, out, run, data_dir=str(data_dir), device="cpu")
    assert [RunDir(m).finished() for m in members] == [4, 4]
    assert [RunDir(m).recipe().train.seed for m in members] == [1, 2]
    assert RunDir(members[0]).recipe().soup.seeds is None and _adapter(members[0]) != {}
    logs = [(RunDir(m).log.read_bytes(), RunDir(m).log.stat().st_mtime_ns) for m in members]

    # Run again: the members are reused as they are, and soup.py averages them into the run folder itself.
    result = reproduce(recipe, out, run, data_dir=str(data_dir), device="cpu")
    assert [(RunDir(m).log.read_bytes(), RunDir(m).log.stat().st_mtime_ns) for m in members] == logs
    direct = soup.soup(members, tmp_path / "direct", data_dir=str(data_dir), device="cpu", tasks=["BIOSSES"])
    got, want = _adapter(run), _adapter(tmp_path / "direct")
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    assert direct["soup"]["members"] == [str(m) for m in members] == result["soup"]["members"]

    # "after" is the soup as eval loads it; each member is recorded with its nine-set and dev scores.
    sets = load_all(TASKS, str(data_dir))
    scored = evaluate(load_embedder(None, adapter=run, device=torch.device("cpu")), sets)
    assert result["after"]["scores"] == pytest.approx(scored["scores"], abs=1e-6)
    assert result["after"]["stsb_dev"] == result["soup"]["dev"] == pytest.approx(direct["soup"]["dev"], abs=1e-6)
    for member, folder in zip(result["members"], members, strict=True):
        alone = evaluate(load_embedder(None, adapter=folder, device=torch.device("cpu")), sets)
        assert member["run"] == str(folder) and member["scores"] == pytest.approx(alone["scores"], abs=1e-6)
        assert member["train"]["steps"] == 4 and -100 <= member["stsb_dev"] <= 100
    saved = json.loads((out / "tiny-soup.json").read_text())
    assert [m["seed"] for m in saved["members"]] == [1, 2] and saved["soup"]["greedy"] is False
    assert "| seed 1 | seed 2 | soup |" in (out / "tiny-soup.md").read_text()
    assert (out / "tiny-soup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_student_of_a_recipe_trains_the_teacher_first_and_learns_from_its_run(
        tmp_path, tiny_models, data_dir, few_pairs) -> None:
    teacher_file = tmp_path / "teacher.yaml"
    teacher_file.write_text(_tiny(tiny_models).to_yaml())
    student = _tiny(tiny_models, loss="distill_infonce", reference=[f"recipe:{teacher_file}@1"])
    run = tmp_path / "run"
    result = reproduce(student, tmp_path / "results" / "student", run, data_dir=str(data_dir), device="cpu")

    teacher = RunDir(run).teacher("teacher", 1)
    assert RunDir(teacher).finished() == 4 and RunDir(teacher).recipe().train.seed == 1
    assert result["teachers"] == [{"reference": f"recipe:{teacher_file}@1", "run": str(teacher),
                                   "train": RunDir(teacher).summary()}]
    assert RunDir(run).recipe().train.reference == [str(teacher)]
    with safe_open(RunDir(run).reference, framework="pt") as fh:
        made_from, vectors = fh.metadata(), fh.get_tensor("vectors")
    assert json.loads(made_from["reference"]) == [str(teacher)]

    # The same student trained with the teacher's run folder named directly learns from the same vectors.
    student.train.reference = [str(teacher)]
    train_mod.train(student, tmp_path / "direct", data_dir=str(data_dir), device="cpu", progress=False)
    with safe_open(RunDir(tmp_path / "direct").reference, framework="pt") as fh:
        assert torch.equal(fh.get_tensor("vectors"), vectors) and fh.metadata() == made_from
    for key, value in _adapter(tmp_path / "direct").items():
        torch.testing.assert_close(_adapter(run)[key], value)

    # A finished teacher is reused only if its recipe computes what the teacher's recipe does now.
    teacher_file.write_text(_tiny(tiny_models, lr=1e-3).to_yaml())
    student.train.reference = [f"recipe:{teacher_file}@1"]
    with pytest.raises(SlmembedError, match=r"teacher-seed1 \(recipe:.*@1\) finished with a recipe that computes "
                                            r"another result: train.lr: 0.005 -> 0.001; pass --force"):
        reproduce(student, tmp_path / "results" / "other", run, data_dir=str(data_dir), device="cpu")
    # --force trains the teacher again (into its folder, which the student's replaced run keeps), then the student.
    before = RunDir(teacher).log.stat().st_mtime_ns
    reproduce(student, tmp_path / "results" / "student", run, data_dir=str(data_dir), device="cpu", force=True)
    assert RunDir(teacher).log.stat().st_mtime_ns != before and RunDir(teacher).recipe().train.lr == 1e-3
    assert RunDir(run).finished() == 4 and sorted(p.name for p in (run / "teachers").iterdir()) == ["teacher-seed1"]


@pytest.mark.parametrize("change, message", [
    ({"soup": {"seeds": []}}, "soup.seeds: expected a list of two or more distinct integers in [0, 2**64) (a soup "
                              "averages two or more runs), or null, got []"),
    ({"soup": {"seeds": [3, 3]}}, "soup.seeds: expected a list of two or more distinct integers"),
    ({"soup": {"seeds": [3]}}, "soup.seeds: expected a list of two or more distinct integers"),
    ({"soup": {"greedy": True}}, "soup.greedy: true needs soup.seeds"),
    ({"soup": {"seeds": [1, 2]}, "model": {"attention": "bidirectional"}, "adapt": {"mntp_steps": 2}},
     "soup.seeds: each seed's run would adapt its own base model (adapt stages), and a soup averages runs of one base "
     "model"),
    ({"train": {"loss": "distill_infonce", "reference": ["recipe:nope"]}}, "train.reference: recipe:nope: no recipe "
                                                                           "'nope': give a YAML file or one of "),
    ({"train": {"loss": "distill_infonce", "reference": "recipe:SELF@7"}}, "the recipe is its own reference"),
    ({"train": {"loss": "distill_infonce", "reference": "recipe:smollm2-135m-soup@7"}},
     "train.reference: recipe:smollm2-135m-soup@7: smollm2-135m-soup is a soup of the seeds [42, 7, 1234]; name it "
     "without @7"),
])
def test_bad_values_are_one_line_before_anything_trains(change, message, tmp_path, tiny_models, data_dir,
                                                        capsys) -> None:
    recipe = _tiny(tiny_models).to_dict()
    for section, fields in change.items():
        recipe[section].update({k: str(v).replace("SELF", str(tmp_path / "r.yaml")) if k == "reference" and
                                isinstance(v, str) else v for k, v in fields.items()})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    args = ["--recipe", str(tmp_path / "r.yaml"), "--data-dir", str(data_dir), "--device", "cpu"]
    assert main(["reproduce", *args, "--output", str(tmp_path / "out"), "--run", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slmembed: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_train_refuses_a_recipe_reference_and_a_soup(tmp_path, tiny_models, data_dir, capsys) -> None:
    for sets, message in ((["train.loss=distill_infonce", "train.reference=recipe:smollm2-135m"],
                           "train.reference: recipe:smollm2-135m names a recipe, not a trained model: `slmembed "
                           "reproduce` trains its run first"),
                          (["soup.seeds=[1, 2]"], "is a soup of 2 runs (soup.seeds): `slmembed reproduce` trains and "
                                                  "soups them")):
        assert main(["train", "--recipe", "smollm2-135m", "--output", str(tmp_path / "run"),
                     *(a for s in sets for a in ("--set", s))]) == 2
        err = capsys.readouterr().err
        assert err.startswith("slmembed: error: ") and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "run").exists()


def test_recipe_references_parse_in_one_place() -> None:
    assert recipe_reference("recipe:smollm2-135m-plus@7") == ("smollm2-135m-plus", 7)
    assert recipe_reference("recipe:dir/my.yaml") == ("dir/my.yaml", None)
    assert recipe_reference("recipe:a@b.yaml") == ("a@b.yaml", None)
    assert recipe_reference("smollm2-135m") is None and recipe_reference("runs/recipe:x") is None
    for bad in ("recipe:", "recipe: @7", f"recipe:x@{2**64}"):
        with pytest.raises(SlmembedError, match=r"train.reference: expected .*recipe:NAME or recipe:NAME@SEED"):
            recipe_from_dict({"train": {"loss": "distill_infonce", "reference": bad}})


def test_shipped_soup_recipe_is_the_measured_members(tmp_path) -> None:
    """smollm2-135m-soup is smollm2-135m-plus with three seeds; each member computes what the run behind the measured
    soup ran (results/reproduce/smollm2-135m-plus-seedS)."""
    recipe, plus = load_recipe("smollm2-135m-soup"), load_recipe("smollm2-135m-plus")
    assert (recipe.soup.seeds, recipe.soup.greedy) == ([42, 7, 1234], False)
    assert result_changes(plus, recipe) == ["soup.seeds: null -> [42, 7, 1234]"]
    build = composite.plan(recipe, tmp_path / "soup")
    assert [m.path for m in build.members] == [tmp_path / "soup" / "members" / f"seed-{s}" for s in (42, 7, 1234)]
    for member in build.members:
        seed = member.recipe.train.seed
        measured = json.loads((RESULTS / f"smollm2-135m-plus-seed{seed}" / f"smollm2-135m-plus-seed{seed}.json")
                              .read_text())["recipe"]
        assert result_changes(recipe_from_dict(measured), member.recipe) == []


def test_only_train_and_soup_keep_the_runs_a_model_is_made_of(tmp_path) -> None:
    """A run folder that holds only members/ or teachers/ is empty to the commands that keep them (run.PARTS), and
    the runs there may be their inputs; to any other command it is a foreign folder, which it refuses."""
    run = tmp_path / "run"
    member = RunDir(run).member(1)
    member.mkdir(parents=True)
    (member / "summary.json").write_text("{}")
    assert outputs.check_folder(run, "soup", inputs=[member], keep=PARTS) is False
    with pytest.raises(SlmembedError, match=r"output .*run contains the input .*seed-1"):
        outputs.check_folder(run, "soup", inputs=[member])
    with pytest.raises(SlmembedError, match="is a folder that `slmembed export` did not write and is not empty"):
        outputs.check_folder(run, "export")
    (run / outputs.MARKER).write_text(json.dumps({"command": "train", "entries": ["adapter"]}))
    (run / "adapter").mkdir()
    assert outputs.check_folder(run, "train", force=True, keep=PARTS) is True
    outputs.clear(run)
    assert [p.name for p in run.iterdir()] == ["members"] and (member / "summary.json").is_file()
