"""Where a compiled encode's time goes: tokenising, then the GPU against the host, for the nine STS sets' unique
sentences (what ``bench/encode_speed.py`` times), with torch.profiler's tables.

    python bench/encode_profile.py --model gemma-3-270m --output results/bench/encode-profile-gemma-3-270m-h200.txt
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from slmembed.compile import compile_blocks
from slmembed.data.sts import TASKS, load_all
from slmembed.embedder import PIECE, batching
from slmembed.evaluate import unique_sentences
from slmembed.loading import load_embedder
from slmembed.profiling import busy_union


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--data-dir")
    p.add_argument("--output", required=True)
    args = p.parse_args()

    texts = unique_sentences(load_all(args.tasks, args.data_dir))
    ours = load_embedder(args.model, dtype=torch.bfloat16)
    batch_size, max_tokens = batching(ours)
    compile_blocks(ours.model)
    ours.encode(texts, batch_size=batch_size, max_tokens=max_tokens)  # compile and warm-up
    t = time.perf_counter()
    ids = ours.tokenize(texts)
    tokenise_s = time.perf_counter() - t
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        ours.encode(texts, batch_size=batch_size, max_tokens=max_tokens)
        sync()
        wall = time.perf_counter() - t
    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    averages = prof.key_averages()
    summary = (f"{' '.join(sys.argv)}\n{len(texts)} sentences, {sum(map(len, ids))} tokens, "
               f"{-(-len(texts) // PIECE)} pieces of at most {PIECE} texts; device {ours.device}, "
               f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC\n"
               f"encode wall under the profiler {wall:.3f} s; tokenising alone {tokenise_s:.3f} s; GPU busy "
               f"{busy_union(kernels) / 1e6:.3f} s; kernels {len(kernels)}\n")
    tables = [averages.table(sort_by=key, row_limit=25, max_name_column_width=70)
              for key in ("self_device_time_total", "self_cpu_time_total")]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(summary + "\n" + "\n\n".join(tables))
    print(summary)


if __name__ == "__main__":
    main()
