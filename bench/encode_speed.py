"""Encoding speed: slmembed against sentence-transformers' ``encode`` over the nine STS sets' unique sentences.

Same model, pooling (last token with EOS), precision (bf16) and device; each tool's vectors are compared with
slmembed's float32 ones (cosine) to show both compute the same thing. Each tool batches the way it does by
default for throughput (slmembed: length-sorted batches under a token budget; the peer: its own length sorting at
batch size 256). Both are timed after a warm-up pass, with the GPU finished: the fastest of three passes.
slmembed packs its batches where it can (packing.py): it is then timed padded as well, on the same batches.
With ``--budgets``, slmembed again with other token budgets a chunk; with ``--compile``, with its blocks compiled
(compile.py; the warm-up pass pays the compile). The speed-up is slmembed's fastest of these against the peer. Then
the end-to-end nine-set evaluation, timed as a user runs it: a fresh ``slmembed eval`` process, model loaded from the
cached folder.

    python bench/encode_speed.py --model gemma-3-270m --output results/bench/encode-gemma-3-270m.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import StEncoder, save, st_model

from slmembed import models
from slmembed.compile import compile_blocks
from slmembed.data.sts import TASKS, load_all
from slmembed.embedder import Embedder, batching
from slmembed.evaluate import unique_sentences
from slmembed.loading import load_embedder

REPEATS = 3  # timed calls of each variant, the fastest kept (the same for the peer)


def timed(fn, *args, **kwargs) -> tuple[np.ndarray, float]:
    """``fn``'s output and its fastest of ``REPEATS`` calls after a warm-up call (kernels chosen, caches filled): a
    pass takes about a second, and on a shared host one call's time moves by a third between calls."""
    fn(*args, **kwargs)
    best = float("inf")
    for _ in range(REPEATS):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return out, best


def _cosines(vecs: np.ndarray, reference: np.ndarray) -> dict:
    cos = (vecs * reference).sum(1)
    return {"min": round(float(cos.min()), 5), "mean": round(float(cos.mean()), 5)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--batch-size", type=int,
                   help="slmembed's cap on texts a batch, with 32 tokens a text (default: as `slmembed eval` batches, "
                        "evaluate.batching)")
    p.add_argument("--peer-batch-size", type=int, default=256)
    p.add_argument("--compile", action="store_true", help="also time slmembed with compiled blocks")
    p.add_argument("--budgets", type=int, nargs="*", default=[], metavar="TOKENS",
                   help="also time slmembed (eager) with chunks of at most this many tokens and any number of texts: "
                        "fewer, larger chunks mean fewer kernel launches")
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--data-dir")
    p.add_argument("--output", required=True)
    args = p.parse_args()

    sets = load_all(args.tasks, args.data_dir)
    texts = unique_sentences(sets)
    t = time.perf_counter()
    ours = load_embedder(args.model, dtype=torch.bfloat16)
    load_s = time.perf_counter() - t
    batch_size, max_tokens = batching(ours, args.batch_size)
    vecs, seconds = timed(ours.encode, texts, batch_size=batch_size, max_tokens=max_tokens)
    result = {"model": args.model, "sentences": len(texts), "dtype": "bfloat16",
              "slmembed": {"sentences_per_s": round(len(texts) / seconds), "seconds": round(seconds, 2),
                           "batch_size": batch_size, "max_tokens": max_tokens,
                           "load_s_with_cuda_start": round(load_s, 2)}}
    result["slmembed"]["packed"] = ours.packed
    print("slmembed", result["slmembed"])
    if ours.packed:  # the same model and batches, padded instead of packed
        padded, padded_seconds = timed(Embedder(ours.model, ours.tokenizer, ours.spec, packed=False).encode, texts,
                                       batch_size=batch_size, max_tokens=max_tokens)
        result["slmembed_padded"] = {"sentences_per_s": round(len(texts) / padded_seconds),
                                     "seconds": round(padded_seconds, 2), "cosine_to_packed": _cosines(padded, vecs)}
        print("slmembed padded", result["slmembed_padded"])
        ours = Embedder(ours.model, ours.tokenizer, ours.spec)
    for tokens in args.budgets:
        budget_vecs, budget_seconds = timed(ours.encode, texts, batch_size=None, max_tokens=tokens)
        result.setdefault("slmembed_budgets", {})[str(tokens)] = {
            "sentences_per_s": round(len(texts) / budget_seconds), "seconds": round(budget_seconds, 2),
            "cosine_to_default": _cosines(budget_vecs, vecs)}
        print("slmembed", tokens, "tokens a chunk", result["slmembed_budgets"][str(tokens)])
        seconds = min(seconds, budget_seconds)
    reference = load_embedder(args.model, dtype=torch.float32).encode(texts, batch_size=256)  # for precision only
    result["slmembed"]["cosine_to_float32"] = _cosines(vecs, reference)
    if args.compile:
        compile_blocks(ours.model)
        t = time.perf_counter()
        compiled, seconds_c = timed(ours.encode, texts, batch_size=batch_size, max_tokens=max_tokens)
        result["slmembed_compiled"] = {"sentences_per_s": round(len(texts) / seconds_c), "seconds": round(seconds_c, 2),
                                       "warm_up_with_compile_s": round(time.perf_counter() - t - seconds_c, 1),
                                       "cosine_to_float32": _cosines(compiled, reference)}
        print("slmembed compiled", result["slmembed_compiled"])
        seconds = min(seconds, seconds_c)

    peer = StEncoder(st_model(models.resolve(args.model), ours.spec), ours, args.peer_batch_size)
    peer_vecs, peer_seconds = timed(peer.encode, texts)
    result["sentence_transformers_cosine_to_float32"] = _cosines(peer_vecs, reference)
    cos = (vecs * peer_vecs).sum(1)
    result["sentence_transformers"] = {"sentences_per_s": round(len(texts) / peer_seconds),
                                       "seconds": round(peer_seconds, 2), "batch_size": args.peer_batch_size}
    result["speedup"] = round(peer_seconds / seconds, 2)  # slmembed's faster variant
    result["cosine_ours_vs_peer"] = {"min": round(float(cos.min()), 5), "mean": round(float(cos.mean()), 5)}
    print("peer", result["sentence_transformers"], "speedup", result["speedup"], result["cosine_ours_vs_peer"])
    del ours, peer

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "eval.json"
        command = [sys.executable, "-m", "slmembed", "eval", "--model", args.model, "--output", str(out)]
        command += ["--tasks", *args.tasks] + (["--data-dir", args.data_dir] if args.data_dir else [])
        t = time.perf_counter()
        subprocess.run(command, check=True, env={**os.environ, "TQDM_DISABLE": "1"}, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t
        scores = json.loads(out.read_text())
    phases = subprocess.run([sys.executable, str(Path(__file__).with_name("eval_phases.py")), "--model", args.model]
                            + (["--data-dir", args.data_dir] if args.data_dir else []),
                            check=True, capture_output=True, text=True).stdout.splitlines()[-1]
    result["nine_set_eval"] = {"wall_s": round(wall, 2), "average": scores["average"],
                               "command": " ".join(["slmembed", *command[3:]]), **json.loads(phases)}
    print("eval", result["nine_set_eval"])
    save(args.output, result)


if __name__ == "__main__":
    main()
