"""The serving benchmark's parts (bench/common.py, bench/serve_gpu.py) without a real server: the reply checker, the
load generator against a stub HTTP server, the long-text builder and the latency percentiles."""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import common  # noqa: E402
import serve_gpu  # noqa: E402


def _unit(rng: np.random.Generator, n: int, dim: int = 16) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _reply(vectors: np.ndarray, indices: list[int] | None = None) -> dict:
    indices = list(range(len(vectors))) if indices is None else indices
    return {"data": [{"index": i, "embedding": v.tolist()} for i, v in zip(indices, vectors, strict=True)]}


def test_reply_checker_flags_a_wrong_vector_a_reordered_reply_and_a_missing_one() -> None:
    expected = _unit(np.random.default_rng(0), 3)
    problem, cos = common.reply_problem(_reply(expected * 2.5), expected, 0.999)  # scale does not matter
    assert problem is None and cos == pytest.approx(1.0, abs=1e-6)
    wrong = expected.copy()
    wrong[1] = _unit(np.random.default_rng(1), 1)[0]
    problem, cos = common.reply_problem(_reply(wrong), expected, 0.999)
    assert problem == "mismatch" and cos == pytest.approx(float(wrong[1] @ expected[1]), abs=1e-6)
    assert common.reply_problem(_reply(expected[[1, 0, 2]]), expected, 0.999)[0] == "mismatch"  # swapped vectors
    assert common.reply_problem(_reply(expected[[1, 0, 2]], [1, 0, 2]), expected, 0.999)[0] == "reordered"
    assert common.reply_problem(_reply(expected[:2]), expected, 0.999)[0] == "missing"
    assert common.reply_problem({"data": []}, expected, 0.999)[0] == "missing"


class _Stub(BaseHTTPRequestHandler):
    """Answers /v1/embeddings with each text's vector from ``vectors``; ``drop_last`` leaves a multi-text reply's
    last vector out."""

    vectors: dict[str, list[float]] = {}
    drop_last = False

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        texts = body["input"][:-1] if self.drop_last and len(body["input"]) > 1 else body["input"]
        payload = json.dumps(_reply(np.array([self.vectors[t] for t in texts]))).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("drop_last", [False, True])
def test_drive_counts_texts_and_mismatched_replies(drop_last: bool) -> None:
    texts = [f"text {i}" for i in range(8)]
    expected = _unit(np.random.default_rng(0), len(texts))
    handler = type("Stub", (_Stub,), {"vectors": dict(zip(texts, expected.tolist(), strict=True)),
                                      "drop_last": drop_last})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sizes: list[int] = []

    def request(rng) -> common.Request:
        picks = rng.sample(range(len(texts)), rng.randint(1, 4))
        sizes.append(len(picks))
        return {"model": "m", "input": [texts[i] for i in picks]}, expected[picks]

    try:
        load = common.drive(server.server_address[1], request, clients=2, seconds=0.5, min_cosine=0.999)
    finally:
        server.shutdown()
    assert load["requests"] == len(sizes) > 0 and load["errors"] == 0
    multi = sum(n > 1 for n in sizes)
    assert load["mismatches"] == (multi if drop_last else 0)
    assert load["texts"] == sum(n for n in sizes if not (drop_last and n > 1))


def test_long_texts_have_200_to_500_tokens_of_consecutive_sentences(tiny_models) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    rng = np.random.default_rng(0)
    words = ["cat", "river", "mountain", "blue", "quickly", "the", "a", "of", "seventeen", "unbelievable"]
    sentences = [" ".join(rng.choice(words, size=rng.integers(3, 40))) + "." for _ in range(400)]
    sentences.insert(50, " ".join(["word"] * 700))  # longer than 500 tokens by itself: never part of a text

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    texts = serve_gpu.long_texts(sentences, count, 12)
    assert len(texts) == 12
    assert all(200 <= count(t) <= 500 for t in texts), [count(t) for t in texts]
    assert all(sentences[50] not in t for t in texts)
    joined = " ".join(sentences)
    assert all(t in joined for t in texts)  # consecutive sentences


def test_latency_percentiles_match_numpy() -> None:
    seconds = np.random.default_rng(0).exponential(0.05, size=999).tolist()
    ms = np.array(seconds) * 1000
    got = common.latency_ms(seconds)
    assert list(got) == ["p50", "p90", "p99", "max"]
    for (key, value), p in zip(got.items(), (50, 90, 99, 100), strict=True):
        assert value == pytest.approx(np.percentile(ms, p), abs=0.05), key
    # 1..100 ms: numpy's linear interpolation between order statistics, by hand
    assert common.latency_ms([i / 1000 for i in range(1, 101)]) == {"p50": 50.5, "p90": 90.1, "p99": 99.0,
                                                                     "max": 100.0}


def test_default_prompt_is_read_from_the_sentence_transformers_config(tmp_path) -> None:
    assert serve_gpu.default_prompt(tmp_path) == ""
    (tmp_path / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"default": "Represent: ", "other": "x"}, "default_prompt_name": "default"}))
    assert serve_gpu.default_prompt(tmp_path) == "Represent: "


def test_transformers5_rope_parameters_are_spelled_for_transformers4() -> None:
    smollm2 = {"model_type": "llama", "dtype": "float32", "rope_parameters": {"rope_theta": 100000.0,
                                                                            "rope_type": "default"}}
    assert serve_gpu._transformers4_config(smollm2) == {"model_type": "llama", "torch_dtype": "float32",
                                                        "rope_theta": 100000.0, "rope_scaling": None}
    gemma3 = {"rope_parameters": {"full_attention": {"rope_theta": 1e6, "rope_type": "linear", "factor": 8.0},
                                  "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}}
    assert serve_gpu._transformers4_config(gemma3) == {"rope_theta": 1e6, "rope_local_base_freq": 1e4,
                                                       "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
