"""Where the wall time of a nine-set ``slmembed eval`` goes: the command's steps, timed one by one in a fresh process.

    python bench/eval_phases.py --model gemma-3-270m      # prints one JSON line of seconds per phase
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--data-dir")
    args = p.parse_args()
    phases, last = {}, START

    def mark(name: str) -> None:
        nonlocal last
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        phases[name] = round(now - last, 2)
        last = now

    import torch

    mark("import torch")
    from slmembed import cli  # noqa: F401 - what the command imports first
    from slmembed.data.sts import TASKS, load_all
    from slmembed.embedder import batching
    from slmembed.evaluate import score, unique_sentences
    from slmembed.loading import load_embedder

    mark("import slmembed, transformers")
    torch.zeros(1, device="cuda" if torch.cuda.is_available() else "cpu")
    mark("CUDA start")
    sets = load_all(TASKS, args.data_dir)
    texts = unique_sentences(sets)
    mark("read the nine sets")
    embedder = load_embedder(args.model)
    mark("load model")
    batch, max_tokens = batching(embedder)
    vecs = embedder.encode(texts, batch_size=batch, max_tokens=max_tokens)
    mark("tokenise and encode, first pass")
    embedder.encode(texts, batch_size=batch, max_tokens=max_tokens)
    mark("tokenise and encode, second pass")
    score(sets, dict(zip(texts, vecs)))
    mark("score")
    print(json.dumps({"phases_s": phases, "sentences": len(texts)}))


if __name__ == "__main__":
    main()
