"""AnglE's objective (losses/angle.py) against sentence-transformers' AnglELoss and AnglE's own complex-quotient
formula; its recipe fields; a short training run with it and the PromptEOL prompt, and that run's export. (The
objective's two-process gather: tests/test_loss.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from slmembed.cli import main
from slmembed.config import Recipe, load_recipe, recipe_from_dict, with_overrides
from slmembed.errors import SlmembedError
from slmembed.loading import load_embedder
from slmembed.losses import objective
from slmembed.losses.angle import angle_info_nce, angle_similarity
from slmembed.losses.infonce import info_nce

CPU = torch.device("cpu")


def _triplets(rows: int = 6, dim: int = 16, seed: int = 0, columns: int = 1) -> list[torch.Tensor]:
    """Anchors, positives and ``columns`` x ``rows`` negatives."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows * k, dim, generator=g) * 2).double() for k in (1, 1, columns)]


def anglE_quotient(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """AnglE's angle_loss similarity as its code writes it: the halves as complex numbers, x / y divided out and
    rescaled by |y| / |x|, then |sum of real and imaginary parts|."""
    a, b = x.chunk(2, dim=1)
    c, d = y.chunk(2, dim=1)
    z = (c**2 + d**2).sum(1, keepdim=True)
    re, im = (a * c + b * d) / z, (b * c - a * d) / z
    scale = (a**2 + b**2).sum(1, keepdim=True) ** 0.5 / z**0.5
    return (torch.cat([re / scale, im / scale], dim=1).sum(1)).abs()


def st_angle_term(a, p, n, mask, tau: float) -> torch.Tensor:
    """sentence-transformers' AnglELoss: on (anchor, positive, negatives...) tuples where every negative is there
    (``n`` [kB, D], column-major), else on the pairs (a_i, p_i) labelled 1 and the kept (a_i, n_r) labelled 0."""
    from sentence_transformers.sentence_transformer.losses import AnglELoss

    loss = AnglELoss(None, scale=tau)
    if mask is None:
        return loss.compute_loss_from_embeddings([a, p, *n.split(len(a))], None)
    labels = torch.cat([torch.ones(len(a)), torch.zeros(int(mask.sum()))])
    pairs = [torch.cat([a, a.repeat(len(n) // len(a), 1)[mask]]), torch.cat([p, n[mask]])]
    return loss.compute_loss_from_embeddings(pairs, labels)


@pytest.mark.parametrize("dim", [16, 15])
def test_similarity_is_anglEs(dim: int) -> None:
    from sentence_transformers.util import pairwise_angle_sim

    x, y, _ = _triplets(dim=dim)
    torch.testing.assert_close(angle_similarity(x, y).double(), pairwise_angle_sim(x, y).double(), rtol=1e-5, atol=1e-6)
    if dim % 2 == 0:  # AnglE's own code splits an even dimension only
        torch.testing.assert_close(angle_similarity(x, y).double(), anglE_quotient(x, y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tau", [20.0, 1.0])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("columns", [1, 2])
def test_angle_term_and_its_gradient_equal_sentence_transformers(tau: float, masked: bool, columns: int) -> None:
    """(loss - info_nce) / w is AnglELoss's value on the same pairs, missing negatives left out; so is its gradient.
    With one negative column (hard negatives) and two (and neutrals)."""
    mask = torch.tensor([1, 0, 1, 1, 0, 1] * columns, dtype=torch.bool) if masked else None
    ours = [t.clone().requires_grad_(True) for t in _triplets(columns=columns)]
    w = 0.7
    loss = angle_info_nce(*ours, 0.05, mask, angle_weight=w, angle_tau=tau)
    term = (loss - info_nce(*ours, 0.05, mask)) / w
    theirs = [t.clone().requires_grad_(True) for t in _triplets(columns=columns)]
    want = st_angle_term(*theirs, mask, tau)
    assert term.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    term.backward()
    want.backward()
    for got, ref in zip(ours, theirs, strict=True):
        torch.testing.assert_close(got.grad, ref.grad, rtol=1e-4, atol=1e-6)
    if masked:  # a missing negative's row takes no part
        assert torch.count_nonzero(ours[2].grad[~mask]) == 0


def test_weight_zero_or_no_negatives_is_info_nce() -> None:
    a, p, n = _triplets()
    mask = torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool)
    assert torch.equal(angle_info_nce(a, p, n, 0.05, mask, angle_weight=0.0), info_nce(a, p, n, 0.05, mask))
    assert torch.equal(angle_info_nce(a, p, None, 0.05, angle_weight=5.0), info_nce(a, p, None, 0.05))


def test_all_negatives_missing_leaves_a_zero_term_and_finite_gradients() -> None:
    a, p, n = (t.requires_grad_(True) for t in _triplets())
    none = torch.zeros(6, dtype=torch.bool)
    loss = angle_info_nce(a, p, n, 0.05, none, angle_weight=1.0)
    assert loss.item() == pytest.approx(info_nce(a, p, n, 0.05, none).item(), abs=1e-7)
    loss.backward()
    assert all(torch.isfinite(t.grad).all() for t in (a, p, n)) and torch.count_nonzero(n.grad) == 0


def test_the_recipe_sets_the_weight_and_scale() -> None:
    a, p, n = _triplets()
    recipe = with_overrides(Recipe(), ["train.loss=angle_infonce", "train.angle_weight=0.5", "train.angle_tau=3"])
    got = objective("angle_infonce", recipe.train)(a, p, n, 0.05)
    assert got.item() == pytest.approx(angle_info_nce(a, p, n, 0.05, angle_weight=0.5, angle_tau=3.0).item())
    default = objective("angle_infonce", Recipe().train)(a, p, n, 0.05)  # AnglE's NLI settings: 0.02, 20
    want = info_nce(a, p, n, 0.05) + 0.02 * st_angle_term(a, p, n, None, 20.0)
    assert default.item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize(("fields", "message"), [
    ({"angle_weight": 0.1}, "recipe: train.angle_weight: 0.1 is used by train.loss: angle_infonce only, not infonce; "
                            "set train.loss: angle_infonce, or leave train.angle_weight at 0.02"),
    ({"loss": "angle_infonce", "angle_weight": -1}, "recipe: train.angle_weight: expected a finite number >= 0, got "
                                                    "-1.0"),
    ({"loss": "angle_infonce", "angle_tau": 0}, "recipe: train.angle_tau: expected a finite number > 0, got 0.0"),
])
def test_bad_angle_fields_are_one_error(fields: dict, message: str) -> None:
    data = Recipe().to_dict()
    data["train"].update(fields)
    with pytest.raises(SlmembedError) as exc:
        recipe_from_dict(data)
    assert str(exc.value) == message


PROMPT_EOL = 'This sentence : "{}" means in one word:"'  # Jiang et al. 2023, as their code writes it


@pytest.fixture(scope="module")
def angle_run(tmp_path_factory, tiny_models, data_dir) -> tuple[int, object]:
    """``slmembed train`` of a recipe with ``prompt: PromptEOL``, its loss set to angle_infonce on the command line:
    ten steps on one batch of 8 triplets (the same batch each step). Its exit code and folder."""
    root = tmp_path_factory.mktemp("angle-run")
    recipe = root / "tiny.yaml"
    recipe.write_text(f"model: {{name: {tiny_models['llama']}, max_length: 32, prompt: PromptEOL}}\n"
                      "data: {sources: [cad_snli], max_triplets: 8}\n"
                      "train: {batch_size: 8, max_steps: 10, warmup_steps: 1, lr: 5.0e-3, bf16: false, log_every: 1, "
                      "save_every: 10, epochs: 10}\n")
    code = main(["train", "--recipe", str(recipe), "--output", str(root / "run"), "--data-dir", str(data_dir),
                 "--device", "cpu", "--set", "train.loss=angle_infonce", "--set", "train.angle_weight=1.0"])
    return code, root / "run"


def test_cli_train_with_the_angle_objective_lowers_its_loss(angle_run) -> None:
    code, run = angle_run
    assert code == 0
    losses = [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.5, losses  # 20.5 -> 5.5 when written
    assert load_recipe(run / "recipe.yaml").train.loss == "angle_infonce"


def test_a_promptEOL_run_tokenises_as_the_template_says(angle_run) -> None:
    _, run = angle_run
    assert json.loads((run / "embed.json").read_text())["spec"]["prompt"] == "PromptEOL"
    emb = load_embedder(None, run, device=CPU, dtype=torch.float32)
    texts = ["A man is playing a guitar.", "Hi"]
    assert emb.tokenize(texts) == [emb.tokenizer(PROMPT_EOL.format(t))["input_ids"] + [emb.tokenizer.eos_token_id]
                                   for t in texts]


def test_a_promptEOL_run_exports_with_equal_vectors(angle_run, tmp_path) -> None:
    """Text after {}: --format st writes it as the tokenizer's chat template, which sentence-transformers applies;
    --format hf leaves it to the user, its card naming the template. Both embed as the run does."""
    _, run = angle_run
    assert main(["export", "--run", str(run), "--output", str(tmp_path / "st")]) == 0
    assert main(["export", "--run", str(run), "--output", str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert f"`{PROMPT_EOL}`" in (tmp_path / "hf/README.md").read_text()
    texts = ["A man is playing a guitar.", "Someone plays an instrument.", "Hi"]
    want = load_embedder(None, run, device=CPU, dtype=torch.float32).encode(texts)
    got = load_embedder(str(tmp_path / "hf"), device=CPU, dtype=torch.float32).encode(texts)
    np.testing.assert_allclose(got, want, atol=1e-5)
    st = SentenceTransformer(str(tmp_path / "st"), device="cpu", local_files_only=True)
    np.testing.assert_allclose(st.encode(texts), want, atol=1e-5)
