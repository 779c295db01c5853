"""Check an exported folder against its training run on real data.

For every STSBenchmark test sentence: sentence-transformers' token ids for ``SentenceTransformer(EXPORT)`` equal
slmembed's ``Embedder.tokenize`` for the run, and the cosine between the two embeddings is at least 0.999 at float32
on both sides. At the default dtypes (bf16 on bf16-capable CPUs and GPUs) the cosines are recorded too, next to a
control: slmembed against itself at another batch size, which shows the noise bf16 brings on its own. Then the
nine-set scores of the exported folder, evaluated by slmembed, against the run's (``--run-scores``, an eval JSON of
the run; computed when not given): every set within 0.1. Writes the figures with the command and date to
results/export/NAME.json and exits 1 if a check fails.

    .venv/bin/python bench/export_check.py --run runs/qs --export runs/qs-st --run-scores runs/qs/eval.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _cosines(a: np.ndarray, b: np.ndarray) -> dict:
    """Row-wise true cosines (sentence-transformers normalises in the model's dtype: bf16 norms are off by ~1e-3)."""
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"min_cosine": round(float(cos.min()), 6), "mean_cosine": round(float(cos.mean()), 6),
            "below_0.999": int((cos < 0.999).sum())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="training run folder")
    ap.add_argument("--export", required=True, help="its `slmembed export` folder (sentence-transformers format)")
    ap.add_argument("--run-scores", help="eval JSON of the run (slmembed eval --adapter RUN --output ...)")
    ap.add_argument("--output", help="default: results/export/<export folder name>.json")
    args = ap.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    from slmembed.atomic import write_json
    from slmembed.data.sts import TASKS, load_all, load_sts
    from slmembed.evaluate import evaluate
    from slmembed.export import st_token_ids
    from slmembed.loading import load_embedder

    sts = load_sts("STSBenchmark")
    texts = sorted(set(sts.sentences1) | set(sts.sentences2))
    out: dict = {"run": args.run, "export": args.export, "stsb_test_sentences": len(texts)}
    for label, dtype in (("default dtype", None), ("float32", torch.float32)):
        run = load_embedder(None, adapter=args.run, dtype=dtype)
        st = SentenceTransformer(args.export, device=str(run.device), local_files_only=True,
                                 model_kwargs={"dtype": dtype} if dtype else None)
        st_ids = st_token_ids(st, texts)
        a, b = st.encode(texts, batch_size=64), run.encode(texts)
        out[label] = {"token_ids_equal": st_ids == run.tokenize(texts), **_cosines(a, b),
                      "st_dtype": str(next(st.parameters()).dtype), "slmembed_dtype": str(run.model.dtype)}
        if dtype is None:
            out[label]["control: slmembed batch 64 vs batch 5"] = _cosines(b, run.encode(texts, batch_size=5))
        print(label, out[label], flush=True)

    sets = load_all(TASKS)
    run_scores = (json.loads(Path(args.run_scores).read_text()) if args.run_scores
                  else evaluate(load_embedder(None, adapter=args.run), sets))
    exported = evaluate(load_embedder(args.export), sets, progress=True)
    diffs = {t: round(exported["scores"][t] - run_scores["scores"][t], 2) for t in run_scores["scores"]}
    out["scores"] = {"run": run_scores["scores"], "export": exported["scores"], "diff": diffs,
                     "run_average": run_scores["average"], "export_average": exported["average"],
                     "max_abs_diff": max(abs(d) for d in diffs.values())}
    ok = (out["default dtype"]["token_ids_equal"] and out["float32"]["token_ids_equal"]
          and out["float32"]["min_cosine"] >= 0.999 and out["scores"]["max_abs_diff"] <= 0.1)
    out.update(passed=ok, command=" ".join(["python", "bench/export_check.py", *sys.argv[1:]]),
               machine=f"{platform.node()}, cpu ({torch.get_num_threads()} threads)",
               date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    target = args.output or ROOT / "results" / "export" / f"{Path(args.export).name}.json"
    write_json(target, out)
    print(json.dumps(out["scores"], indent=2), f"\npassed: {ok}; written to {target}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
