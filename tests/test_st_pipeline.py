"""sentence-transformers folders: slmembed's vectors are sentence-transformers' own (cosine > 0.9999, same dimension),
or the folder is refused in one line naming what slmembed cannot apply, before the model loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Dense, Dropout, Normalize, Pooling, Transformer

from slmembed import models
from slmembed.cli import main
from slmembed.embedder import Embedder
from slmembed.loading import load_embedder

CPU = torch.device("cpu")
TEXTS = ["A man is playing a guitar.", "Hi", "THE Quick Brown Fox jumps over the lazy dog near the river bank today, "
         "and then it runs far away into the deep, dark forest beyond the hills.", "Ünïcode ÇAPITALS ǅ"]
MINILM_DIM = 384
PLAIN = {"method": "forward", "method_output_name": "last_hidden_state"}


def _dense(n_in: int, n_out: int, seed: int, **kwargs) -> Dense:
    torch.manual_seed(seed)
    return Dense(n_in, n_out, **kwargs)


def _minilm(max_seq_length: int = 16) -> Transformer:
    return Transformer(models.resolve("all-minilm-l6-v2"), max_seq_length=max_seq_length)


def _decoder(folder: Path) -> Transformer:
    """The tiny decoder, embedding texts as they are (not through its tokenizer's chat template)."""
    return Transformer(str(folder), modality_config={"text": PLAIN}, module_output_name="token_embeddings")


# each case: the backbone ("minilm", or "llama": the tiny random decoder), the modules after it, and the
# SentenceTransformer's own settings (config_sentence_transformers.json)
CASES = {
    "dense_tanh": ("minilm", lambda: [Pooling(MINILM_DIM, "mean"), _dense(MINILM_DIM, 128, 0), Normalize()], {}),
    "dense_identity_no_bias_no_normalize": (
        "minilm", lambda: [Pooling(MINILM_DIM, "mean"),
                           _dense(MINILM_DIM, 64, 1, bias=False, activation_function=torch.nn.Identity())], {}),
    "normalize_between_residual_denses": (
        "minilm", lambda: [Pooling(MINILM_DIM, "cls"), Dropout(0.5),
                           _dense(MINILM_DIM, MINILM_DIM, 2, activation_function=torch.nn.ReLU(), use_residual=True),
                           Normalize(), _dense(MINILM_DIM, 32, 3, activation_function=torch.nn.GELU(),
                                               use_residual=True)], {}),
    "cls": ("minilm", lambda: [Pooling(MINILM_DIM, "cls")], {}),
    "mean_sqrt_len_tokens": ("minilm", lambda: [Pooling(MINILM_DIM, "mean_sqrt_len_tokens"), Normalize()], {}),
    "default_prompt": ("minilm", lambda: [Pooling(MINILM_DIM, "mean"), Normalize()],
                       {"prompts": {"query": "query: {braces} ", "passage": "passage: "},
                        "default_prompt_name": "query"}),
    "prompt_not_pooled": ("minilm", lambda: [Pooling(MINILM_DIM, "mean", include_prompt=False)],
                          {"prompts": {"query": "Represent this sentence for retrieval: "},
                           "default_prompt_name": "query"}),
    "truncate_dim": ("minilm", lambda: [Pooling(MINILM_DIM, "mean"), _dense(MINILM_DIM, 96, 4), Normalize()],
                     {"truncate_dim": 48}),
    "lasttoken_decoder": ("llama", lambda: [Pooling(32, "lasttoken")], {}),  # the last token is the text's own
    "lasttoken_decoder_dense": ("llama", lambda: [Pooling(32, "lasttoken"), _dense(32, 16, 5)], {}),
    "decoder_prompt_not_pooled": ("llama", lambda: [Pooling(32, "mean", include_prompt=False), _dense(32, 24, 6)],
                                  {"prompts": {"q": "Instruct: find the same meaning\nQuery: "},
                                   "default_prompt_name": "q"}),
}


def _save(folder: Path, backbone: Transformer, case: str) -> Path:
    _, modules, settings = CASES[case]
    SentenceTransformer(modules=[backbone, *modules()], **settings).save(str(folder))
    return folder


def _compare(folder: Path, dim: int | None = None, **loading) -> None:
    """slmembed's vectors of TEXTS from ``folder``, checked against sentence-transformers' own."""
    ours = load_embedder(str(folder), device=CPU, dtype=torch.float32, **loading).encode(TEXTS, batch_size=3)
    theirs = SentenceTransformer(str(folder), device="cpu").encode(TEXTS, normalize_embeddings=True, batch_size=3)
    assert ours.shape == theirs.shape and (dim is None or ours.shape[1] == dim)
    assert np.min(np.sum(ours * theirs, axis=1)) > 0.9999


@pytest.mark.parametrize("case", CASES)
def test_vectors_are_sentence_transformers_own(case, tmp_path, tiny_models) -> None:
    backbone = _minilm() if CASES[case][0] == "minilm" else _decoder(tiny_models["llama"])
    folder = _save(tmp_path / case, backbone, case)
    expected = {"dense_tanh": 128, "dense_identity_no_bias_no_normalize": 64, "truncate_dim": 48,
                "normalize_between_residual_denses": 32, "lasttoken_decoder_dense": 16}.get(case)
    _compare(folder, expected)


def test_dense_head_runs_packed_and_leaves_the_prompt_out(tmp_path, tiny_models) -> None:
    """The head and the prompt left out of pooling on the packed path (packing.py) too."""
    folder = _save(tmp_path / "packed", _decoder(tiny_models["llama"]), "decoder_prompt_not_pooled")
    padded = load_embedder(str(folder), device=CPU, dtype=torch.float32)
    assert padded.skip > 1 and not padded.packed
    expected = padded.encode(TEXTS)
    pooled_prompt = Embedder(padded.model, padded.tokenizer, padded.spec, head=padded.head).encode(TEXTS)
    assert np.min(np.sum(pooled_prompt * expected, axis=1)) < 0.999  # the prompt's tokens matter
    packed = Embedder(padded.model, padded.tokenizer, padded.spec, packed=True, head=padded.head, include_prompt=False)
    np.testing.assert_allclose(packed.encode(TEXTS), expected, atol=1e-5)


def test_do_lower_case_of_older_folders(tmp_path, tiny_models) -> None:
    """sentence-transformers < 6 kept do_lower_case in sentence_bert_config.json; the cased tokenizer is lower-cased."""
    folder = _save(tmp_path / "lower", _decoder(tiny_models["llama"]), "lasttoken_decoder")
    config = json.loads((folder / "sentence_bert_config.json").read_text())
    (folder / "sentence_bert_config.json").write_text(json.dumps({**config, "do_lower_case": True}))
    _compare(folder)
    lowered = load_embedder(str(folder), device=CPU, dtype=torch.float32)
    assert lowered.tokenize(["ABC Def"]) == lowered.tokenize(["abc def"])


def test_max_seq_length_of_older_folders(tmp_path) -> None:
    """Older folders say max_seq_length in sentence_bert_config.json; newer ones in the tokenizer's config."""
    folder = _save(tmp_path / "older", _minilm(max_seq_length=512), "cls")
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 9, "do_lower_case": False}))
    assert load_embedder(str(folder), device=CPU, dtype=torch.float32).spec.max_length == 9
    _compare(folder)


def _folder(tmp_path: Path, modules: list[tuple[str, str, dict | None]], files: dict[str, dict] | None = None,
            ) -> Path:
    """A sentence-transformers folder over MiniLM's files (linked): modules.json lists (path, type, config); ``files``
    gives settings of JSON files at the folder's root, added to MiniLM's file of that name where it has one."""
    folder = tmp_path / "st"
    folder.mkdir()
    files = files or {}
    for item in Path(models.resolve("all-minilm-l6-v2")).iterdir():
        if item.is_file() and item.name not in ("modules.json", "config_sentence_transformers.json", *files):
            (folder / item.name).symlink_to(item)
        elif item.name in files:
            (folder / item.name).write_text(json.dumps({**json.loads(item.read_text()), **files.pop(item.name)}))
    listing = [{"idx": i, "name": str(i), "path": path, "type": kind} for i, (path, kind, _) in enumerate(modules)]
    (folder / "modules.json").write_text(json.dumps(listing))
    for path, _, config in modules:
        if config is not None:
            (folder / path).mkdir(exist_ok=True)
            (folder / path / "config.json").write_text(json.dumps(config))
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content))
    return folder


ST = "sentence_transformers.sentence_transformer.modules."
TRANSFORMER = ("", "sentence_transformers.models.Transformer", None)
MEAN = ("1_Pooling", ST + "Pooling", {"embedding_dimension": 384, "pooling_mode": "mean"})
DENSE = {"in_features": 384, "out_features": 8, "bias": True, "activation_function": "torch.nn.modules.activation.Tanh"}
SETTINGS = "config_sentence_transformers.json"
BACKBONE = "sentence_bert_config.json"  # MiniLM's, with these settings added
REFUSED = {  # the modules (after the Transformer) or the folder's files, and what the one line says
    "layer_norm": ([MEAN, ("2_LayerNorm", ST + "LayerNorm", {"dimension": 384})], None,
                   "module 2_LayerNorm is LayerNorm"),
    "word_embeddings": ([("1_WordEmbeddings", ST + "WordEmbeddings", {}), MEAN], None, "is WordEmbeddings"),
    "router": ([MEAN, ("2_Router", "sentence_transformers.base.modules.router.Router", {})], None, "is Router"),
    "custom_class": ([MEAN, ("2_Mine", "my_package.Projection", {})], None, "custom class my_package.Projection"),
    "max_pooling": ([("1_Pooling", ST + "Pooling", {"embedding_dimension": 384, "pooling_mode": "max"})], None,
                    "Pooling mode max"),
    "weightedmean_legacy": ([("1_Pooling", ST + "Pooling", {"word_embedding_dimension": 384,
                                                           "pooling_mode_weightedmean_tokens": True})], None,
                            "Pooling mode weightedmean"),
    "two_modes": ([("1_Pooling", ST + "Pooling", {"embedding_dimension": 384, "pooling_mode": ["mean", "max"]})],
                  None, "concatenates modes mean, max"),
    "mean_sqrt_len_before_dense": (
        [("1_Pooling", ST + "Pooling", {"embedding_dimension": 384, "pooling_mode": "mean_sqrt_len_tokens"}),
         ("2_Dense", ST + "Dense", DENSE)], None, "Pooling mode mean_sqrt_len_tokens before a Dense"),
    "activation": ([MEAN, ("2_Dense", ST + "Dense", {**DENSE, "activation_function": "my_package.Swish"})], None,
                   "activation function 'my_package.Swish'"),
    "dense_on_tokens": ([("1_Dense", ST + "Dense", {**DENSE, "module_input_name": "token_embeddings"}), MEAN], None,
                        "modules Transformer, Dense, Pooling"),
    "dense_width": ([MEAN, ("2_Dense", ST + "Dense", {**DENSE, "in_features": 768})], None,
                    "Dense takes 768 dimensions, but what comes before it gives 384"),
    "dense_pickle": ([MEAN, ("2_Dense", ST + "Dense", DENSE)], None, "pytorch_model.bin is a pickle checkpoint"),
    "dot_unnormalised": ([MEAN], {SETTINGS: {"similarity_fn_name": "dot"}}, "similarity_fn_name 'dot'"),
    "default_prompt_missing": ([MEAN], {SETTINGS: {"prompts": {"query": "q: "}, "default_prompt_name": "passage"}},
                               "default_prompt_name 'passage' is not one of its prompts (query)"),
    "sparse": ([MEAN], {SETTINGS: {"model_type": "SparseEncoder"}}, "a SparseEncoder model"),
    "fill_mask": ([MEAN], {BACKBONE: {"transformer_task": "fill-mask"}},
                  "Transformer setting transformer_task='fill-mask' is not applied"),
    "tokenizer_args": ([MEAN], {BACKBONE: {"tokenizer_args": {"add_eos_token": True}}},
                       "Transformer tokenizer_args add_eos_token=True is not applied"),
    "chat_messages": ([MEAN], {BACKBONE: {"modality_config": {"text": PLAIN, "message": {**PLAIN, "format": "flat"}}}},
                      "modality_config has 'message'"),
    "path_outside": ([("../1_Pooling", ST + "Pooling", None)], None, "a path inside the folder"),
    "chat_template": ([MEAN], {"tokenizer_config.json": {"chat_template": "{{ messages }}"}},
                      "the tokenizer has a chat template"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_slmembed_cannot_apply_is_refused_in_one_line(case, tmp_path, capsys, monkeypatch) -> None:
    modules, files, message = REFUSED[case]
    folder = _folder(tmp_path, [TRANSFORMER, *modules], files)
    if case == "dense_pickle":
        torch.save(torch.nn.Linear(384, 8).state_dict(), folder / "2_Dense" / "pytorch_model.bin")

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(models, "load", no_loading)
    assert main(["eval", "--model", str(folder), "--tasks", "STSBenchmark", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"slmembed: error: {folder}") and message in err and err.count("\n") == 1, err


def test_pickled_dense_loads_with_allow_pickle(tmp_path) -> None:
    """--allow-pickle lets a Dense's pytorch_model.bin load, as it lets a backbone's."""
    folder = _folder(tmp_path, [TRANSFORMER, MEAN, ("2_Dense", ST + "Dense", DENSE)])
    torch.manual_seed(0)
    weights = {f"linear.{k}": v for k, v in torch.nn.Linear(384, 8).state_dict().items()}
    torch.save(weights, folder / "2_Dense" / "pytorch_model.bin")
    _compare(folder, 8, allow_pickle=True)
