"""A reference model's vectors in training (reference.py): the guided objective (GISTEmbed) and the distillation
objective against independent computations and sentence-transformers' losses; tiny runs that learn from a model and
from a run, cache the vectors in the run folder, resume without encoding again and refuse a cache that no longer
matches; and the one-line refusals of a bad ``train.reference``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from slmembed import reference as reference_mod
from slmembed import train as train_mod
from slmembed.cli import main
from slmembed.config import Recipe
from slmembed.digest import weights_sha256
from slmembed.errors import SlmembedError
from slmembed.loading import load_embedder
from slmembed.losses import objective
from slmembed.losses.distill import distill_info_nce
from slmembed.losses.guided import guided_info_nce
from slmembed.losses.infonce import info_nce
from slmembed.losses.matryoshka import matryoshka
from slmembed.run import RunDir

B, D, R = 6, 8, 5


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _inputs(seed: int, related: bool = True):
    """Trained vectors (a, p, n) [B, D] and reference vectors (a', p', n') [B, R]; with ``related``, each
    reference positive near its anchor, so that some candidates rank above it and others below."""
    g = torch.Generator().manual_seed(seed)
    a, p, n = (torch.randn(B, D, generator=g, dtype=torch.float64) for _ in range(3))
    ra, rn = (torch.randn(B, R, generator=g, dtype=torch.float64) for _ in range(2))
    rp = ra + (0.9 if related else 3.0) * torch.randn(B, R, generator=g, dtype=torch.float64)
    return (a, p, n), (ra, rp, rn)


def _numpy_guided(student, ref, mask, tau: float, margin: float) -> tuple[float, int]:
    """GISTEmbed's InfoNCE built loop by loop in float64: the candidates [p; n] less the missing negatives and those
    whose reference similarity to the anchor exceeds the positive's minus ``margin``; and how many were dropped."""
    a, p, n = (_unit(x.numpy()) for x in student)
    ra, rp, rn = (_unit(x.numpy()) for x in ref)
    s, g = a @ np.concatenate([p, n]).T, ra @ np.concatenate([rp, rn]).T
    present = np.concatenate([np.ones(B, bool), np.ones(B, bool) if mask is None else mask.numpy()])
    total, dropped = 0.0, 0
    for i in range(B):
        keep = [j for j in range(2 * B) if present[j] and (j == i or g[i, j] <= g[i, i] - margin)]
        dropped += int(present.sum()) - len(keep)
        logits = s[i, keep] / tau
        total += np.log(np.exp(logits - logits.max()).sum()) + logits.max() - s[i, i] / tau
    return total / B, dropped


@pytest.mark.parametrize("margin", [0.0, 0.1])
@pytest.mark.parametrize("masked", [False, True])
def test_guided_info_nce_equals_the_mask_built_in_numpy(margin: float, masked: bool) -> None:
    student, ref = _inputs(0)
    mask = torch.tensor([True, False, True, True, False, True]) if masked else None
    got = guided_info_nce(*student, 0.05, negative_mask=mask, reference=ref, guide_margin=margin).item()
    want, dropped = _numpy_guided(student, ref, mask, 0.05, margin)
    assert 0 < dropped < B * (2 * B - 1) // 2  # some candidates go, most stay
    assert got == pytest.approx(want, rel=1e-6)
    assert got != pytest.approx(info_nce(*student, 0.05, negative_mask=mask).item(), rel=1e-3)


def test_guided_info_nce_equals_sentence_transformers_gist_anchor_blocks(tiny_models) -> None:
    """sentence-transformers' GISTEmbedLoss without its anchor-anchor and positive-positive blocks (the candidates
    are then InfoNCE's), on the same trained and guide vectors."""
    from sentence_transformers.base.losses.merged_forward import column_merging_disabled
    from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss
    from transformers import AutoTokenizer

    class Given(torch.nn.Module):
        """A stand-in model whose embedding of column k is given."""

        def __init__(self, columns, tokenizer) -> None:
            super().__init__()
            self.columns, self.tokenizer, self.max_seq_length = columns, tokenizer, 32

        def forward(self, features: dict) -> dict:
            return {"sentence_embedding": self.columns[features["column"]]}

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    student, ref = _inputs(1)
    for margin in (0.0, 0.2):
        st = GISTEmbedLoss(Given(student, tokenizer), Given(ref, tokenizer), temperature=0.05, margin=margin,
                           contrast_anchors=False, contrast_positives=False)
        with column_merging_disabled():
            want = st([{"column": k} for k in range(3)], None).item()
        got = guided_info_nce(*student, 0.05, reference=ref, guide_margin=margin).item()
        assert got == pytest.approx(want, rel=1e-6)


def test_guided_info_nce_is_info_nce_when_nothing_ranks_above_the_positive() -> None:
    student, _ = _inputs(2)
    basis = torch.eye(B, R + B, dtype=torch.float64)  # each positive is its anchor, the rest orthogonal or opposite
    ref = (basis, basis.clone(), -basis)
    mask = torch.tensor([True, True, False, True, True, True])
    for m in (None, mask):
        torch.testing.assert_close(guided_info_nce(*student, 0.05, negative_mask=m, reference=ref),
                                   info_nce(*student, 0.05, negative_mask=m))
    # a margin below every similarity leaves each anchor its positive alone
    assert guided_info_nce(*student, 0.05, reference=ref, guide_margin=3.0).item() == 0.0


def _numpy_distill(student, ref, mask, tau: float, tau_t: float) -> tuple[float, float]:
    """InfoNCE and mean KL(teacher || student) over the in-batch candidates, in float64 numpy."""
    a, p, n = (_unit(x.numpy()) for x in student)
    ra, rp, rn = (_unit(x.numpy()) for x in ref)
    s, t = a @ np.concatenate([p, n]).T, ra @ np.concatenate([rp, rn]).T
    keep = np.concatenate([np.ones(B, bool), np.ones(B, bool) if mask is None else mask.numpy()])
    ce = kl = 0.0
    for i in range(B):
        zs, zt = s[i, keep] / tau, t[i, keep] / tau_t
        log_q = zs - zs.max() - np.log(np.exp(zs - zs.max()).sum())
        log_p = zt - zt.max() - np.log(np.exp(zt - zt.max()).sum())
        ce -= log_q[i]  # the positive is column i, before any negative
        kl += (np.exp(log_p) * (log_p - log_q)).sum()
    return ce / B, kl / B


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("weight, tau_t", [(1.0, 0.05), (0.3, 0.1)])
def test_distill_info_nce_equals_info_nce_plus_the_numpy_kl(masked: bool, weight: float, tau_t: float) -> None:
    student, ref = _inputs(3)
    mask = torch.tensor([False, True, True, True, False, True]) if masked else None
    got = distill_info_nce(*student, 0.05, negative_mask=mask, reference=ref, distill_weight=weight,
                           distill_temperature=tau_t)
    ce, kl = _numpy_distill(student, ref, mask, 0.05, tau_t)
    assert kl > 0.1 and got.item() == pytest.approx(ce + weight * kl, rel=1e-6)


def test_distill_info_nce_matches_sentence_transformers_kl_over_the_in_batch_candidates() -> None:
    """DistillKLDivLoss scores each row against its own columns: give every row all candidates as its columns and the
    teacher's cosines as labels; it multiplies the KL by the student temperature squared, which ours does not."""
    from sentence_transformers.sentence_transformer.losses import DistillKLDivLoss
    from sentence_transformers.util import pairwise_cos_sim

    student, ref = _inputs(4)
    candidates, teacher = torch.cat(student[1:]), torch.cat(ref[1:])
    labels = torch.nn.functional.normalize(ref[0], dim=1) @ torch.nn.functional.normalize(teacher, dim=1).T
    st = DistillKLDivLoss(None, similarity_fct=pairwise_cos_sim, student_temperature=0.05, teacher_temperature=0.1)
    columns = [student[0], *(c.expand(B, D) for c in candidates)]
    want = st.compute_loss_from_embeddings(columns, labels).item() / 0.05**2
    kl = (distill_info_nce(*student, 0.05, reference=ref, distill_temperature=0.1) - info_nce(*student, 0.05)).item()
    assert kl == pytest.approx(want, rel=1e-5)


def test_distill_info_nce_without_weight_or_from_itself_is_info_nce() -> None:
    student, ref = _inputs(5)
    mask = torch.tensor([True, True, False, True, True, False])
    plain = info_nce(*student, 0.05, negative_mask=mask)
    unweighted = distill_info_nce(*student, 0.05, negative_mask=mask, reference=ref, distill_weight=0.0)
    torch.testing.assert_close(unweighted, plain)
    itself = distill_info_nce(*student, 0.05, negative_mask=mask, reference=student, distill_temperature=0.05)
    torch.testing.assert_close(itself, plain)  # the same distribution: KL 0


def test_matryoshka_gives_every_prefix_the_whole_reference() -> None:
    student, ref = _inputs(7)
    cut = [x[:, :4] for x in student]
    for loss in (guided_info_nce, distill_info_nce):
        got = matryoshka(loss, [4], [0.5])(*student, 0.05, reference=ref)
        torch.testing.assert_close(got, loss(*student, 0.05, reference=ref) + 0.5 * loss(*cut, 0.05, reference=ref))


def test_the_registry_binds_the_recipe_fields() -> None:
    student, ref = _inputs(6)
    recipe = Recipe()
    recipe.train.guide_margin, recipe.train.distill_weight, recipe.train.distill_temperature = 0.2, 0.5, 0.1
    torch.testing.assert_close(objective("guided_infonce", recipe.train)(*student, 0.05, reference=ref),
                               guided_info_nce(*student, 0.05, reference=ref, guide_margin=0.2))
    torch.testing.assert_close(objective("distill_infonce", recipe.train)(*student, 0.05, reference=ref),
                               distill_info_nce(*student, 0.05, reference=ref, distill_weight=0.5,
                                                distill_temperature=0.1))
    assert objective("infonce", recipe.train) is info_nce


def _recipe(tiny_models, reference: Path | str | None, **train) -> Recipe:
    """A tiny run on one batch of 8 triplets (the same examples every step, so its loss must fall)."""
    recipe = Recipe()
    recipe.model.name, recipe.model.max_length = str(tiny_models["llama"]), 32
    recipe.data.sources, recipe.data.max_triplets = ["cad_snli"], 8
    recipe.lora.dropout = 0.0
    for key, value in {"batch_size": 8, "max_steps": 6, "warmup_steps": 1, "lr": 5e-3, "save_every": 2,
                       "bf16": False, "log_every": 1, "loss": "guided_infonce",
                       "reference": None if reference is None else str(reference), **train}.items():
        setattr(recipe.train, key, value)
    return recipe


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def _texts(recipe: Recipe, data_dir: Path) -> list[str]:
    """The sorted unique sentences of the run's examples: the rows of its reference table."""
    examples, _ = train_mod._examples(recipe, str(data_dir), SimpleNamespace(print=lambda *a: None))
    return sorted({t for e in examples for t in e if t is not None})


def _cache(run: Path) -> tuple[torch.Tensor, dict]:
    with safe_open(RunDir(run).reference, framework="pt") as fh:
        return fh.get_tensor("vectors"), fh.metadata()


def test_guided_run_caches_the_vectors_resumes_without_encoding_and_refuses_another_reference(
        tmp_path, tiny_models, data_dir, monkeypatch) -> None:
    guide = shutil.copytree(tiny_models["gemma"], tmp_path / "guide")  # a model folder, changed below
    recipe = _recipe(tiny_models, guide)
    train_mod.train(recipe, tmp_path / "a", data_dir=data_dir, progress=False)
    losses = _losses(tmp_path / "a")
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.1, losses

    # The cache: the reference's own vectors of the sorted unique sentences, and what they were made from.
    vectors, made_from = _cache(tmp_path / "a")
    texts = _texts(recipe, data_dir)
    expected = load_embedder(str(guide), device=torch.device("cpu")).encode(texts)
    assert vectors.dtype == torch.float16 and vectors.shape == expected.shape
    np.testing.assert_allclose(vectors.float().numpy(), expected, atol=1e-3)
    assert made_from["weights"] == weights_sha256([guide]) and json.loads(made_from["reference"]) == str(guide)

    # Interrupted after its step-4 checkpoint, a copy of the run resumes from the cache (nothing is encoded again)
    # with GradCache, which passes the reference through: the same last steps as the uninterrupted run.
    def interrupt(run: Path) -> None:
        for name in ("adapter", "summary.json", "embed.json"):
            shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()

    interrupt(shutil.copytree(tmp_path / "a", tmp_path / "b"))
    recipe.train.grad_cache, recipe.train.chunk_tokens = True, 64  # the batch embedded in chunks of 64 tokens
    monkeypatch.setattr(reference_mod, "_encode", lambda *a, **k: pytest.fail("encoded again on resume"))
    train_mod.train(recipe, tmp_path / "b", data_dir=data_dir, resume=True, progress=False)
    assert _losses(tmp_path / "b") == pytest.approx(losses, rel=1e-4)
    a, b = (load_file(tmp_path / run / "adapter/adapter_model.safetensors") for run in ("a", "b"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)

    # A reference whose weights changed since the run started: its cache is refused, in one line.
    interrupt(tmp_path / "b")
    weights = load_file(guide / "model.safetensors")
    save_file({k: v + 0.01 for k, v in weights.items()}, guide / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SlmembedError, match=r"reference.safetensors was made from other weight files than"):
        train_mod.train(recipe, tmp_path / "b", data_dir=data_dir, resume=True, progress=False)
    RunDir(tmp_path / "b").reference.write_bytes(b"not safetensors")  # and one that is damaged
    with pytest.raises(SlmembedError, match=r"reference.safetensors: cannot be read as the reference's vectors \("):
        train_mod.train(recipe, tmp_path / "b", data_dir=data_dir, resume=True, progress=False)


def test_distillation_from_an_ensemble_of_a_run_and_a_model(tmp_path, tiny_models, data_dir) -> None:
    """The teacher is the ensemble of a training run (its LoRA adapter on its base) and a model: the cache holds the
    members' unit vectors side by side, each scaled by 1/sqrt(2) (so that a dot product is the mean of their
    cosines), and the student's loss falls."""
    teacher = tmp_path / "teacher"
    recipe = _recipe(tiny_models, None, loss="infonce", max_steps=1)
    recipe.model.name = str(tiny_models["gemma"])
    train_mod.train(recipe, teacher, data_dir=data_dir, progress=False)
    student = _recipe(tiny_models, None, loss="distill_infonce", distill_weight=0.5, distill_temperature=0.1)
    student.train.reference = [str(teacher), str(tiny_models["phi"])]
    train_mod.train(student, tmp_path / "student", data_dir=data_dir, progress=False)
    losses = _losses(tmp_path / "student")
    assert losses[-1] < losses[0] - 0.1, losses
    vectors, made_from = _cache(tmp_path / "student")
    members = [load_embedder(None, adapter=teacher, device=torch.device("cpu")),
               load_embedder(str(tiny_models["phi"]), device=torch.device("cpu"))]
    texts = _texts(student, data_dir)
    expected = np.concatenate([m.encode(texts) for m in members], axis=1) / np.sqrt(2)
    np.testing.assert_allclose(vectors.float().numpy(), expected, atol=1e-3)
    assert made_from["weights"] == weights_sha256([*members[0].sources, *members[1].sources])
    assert len(members[0].sources) == 2  # the run's base model and its adapter


def test_an_unknown_reference_name_is_one_line_before_the_model_loads(tmp_path, tiny_models, data_dir,
                                                                       monkeypatch) -> None:
    monkeypatch.setattr(train_mod, "_setup_model", lambda *a: pytest.fail("the trained model loaded"))
    with pytest.raises(SlmembedError, match=r"^train.reference: unknown model 'all-minilm': give a folder"):
        train_mod.train(_recipe(tiny_models, "all-minilm"), tmp_path / "run", data_dir=data_dir, progress=False)


def _fake_encode(texts: list[str]) -> np.ndarray:
    """Unit vectors that tell the texts ("t0", "t1", ...) apart: a picklable stand-in for a reference's encode."""
    k = np.array([float(t[1:]) for t in texts])
    return _unit(np.stack([np.cos(k), np.sin(k), np.ones_like(k)], axis=1)).astype(np.float32)


def test_each_process_encodes_a_share_and_the_gathered_shares_are_the_whole_table(monkeypatch) -> None:
    """Two processes' shares (every other text), through a stand-in for the collective that hands each process the
    shares of both in rank order, as losses.infonce.gather does (tests/test_loss.py runs it across processes)."""
    texts = [f"t{k}" for k in range(11)]  # not a multiple of the processes: the last share is padded
    shares = []
    monkeypatch.setattr(reference_mod, "gather", lambda x: (shares.append(x), (torch.cat([x, x]),))[1])
    for rank in range(2):
        reference_mod._encode(_fake_encode, texts, rank, 2, torch.device("cpu"))
    monkeypatch.setattr(reference_mod, "gather", lambda x: (torch.cat(shares),))
    expected = torch.from_numpy(_fake_encode(texts)).half()
    for rank in range(2):
        assert torch.equal(reference_mod._encode(_fake_encode, texts, rank, 2, torch.device("cpu")), expected)


def _one_error_line(capsys) -> str:
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and err.count("\n") == 1 and err.startswith("slmembed: error: "), err
    return err


@pytest.mark.parametrize("case, expected", [("missing", "is not a folder"), ("unfinished", "has not finished"),
                                            ("foreign", "neither a model folder"), ("output", "is the input")])
def test_a_bad_reference_is_one_line_before_any_work(case: str, expected: str, tmp_path, capsys) -> None:
    folder = tmp_path / "ref"
    if case != "missing":
        folder.mkdir()
    if case == "unfinished":  # a run that has saved a checkpoint, not yet its summary
        (folder / "checkpoints").mkdir()
        (folder / "recipe.yaml").write_text(Recipe().to_yaml())
    elif case == "foreign":
        (folder / "notes.txt").write_text("not a model")
    elif case == "output":  # a model folder, given as the run's output as well
        (folder / "config.json").write_text("{}")
    before = sorted(tmp_path.rglob("*"))
    output = folder if case == "output" else tmp_path / "run"
    assert main(["train", "--recipe", "smollm2-135m", "--output", str(output), "--set", "train.loss=guided_infonce",
                 "--set", f"train.reference={folder}"]) == 2
    err = _one_error_line(capsys)
    assert expected in err and str(folder) in err, err
    assert sorted(tmp_path.rglob("*")) == before
