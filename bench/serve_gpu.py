"""Serving benchmark: `slmembed serve` against infinity-emb on one exported model, every reply checked.

Both servers load the same `slmembed export --format st` folder (or packaged model folder) and run one after the other
as processes on loopback; the load generator is load_test.py's (common.drive): CLIENTS threads on keep-alive
connections sending requests of 1-4 texts (one in the ``single`` mix) for SECONDS, for each client count and input
mix. The clients are spread over --client-processes forked processes (default: half the cores, at most 8), so that
parsing and checking the replies, which holds a process's GIL, does not cap the rates of a fast server; each cell
records ``client_cpu_per_wall_max``, the busiest client process's CPU seconds per second (near 1: it may have been
the limit).

The input mixes:

* ``sts``: STSBenchmark test sentences;
* ``long``: texts of 200-500 tokens (the model's tokenizer), NLI training sentences joined until in range;
* ``single``: one STSBenchmark test sentence a request (the latency of a lone short text).

Every reply is compared with slmembed's direct embedding of its inputs in this process (cosine > --min-cosine, one
vector per input, in order). infinity's torch engine runs the folder's sentence-transformers modules (its pooling,
normalisation) but not its default prompt (it calls the modules' forward, not ``encode``), so its clients send the
prompt prefix themselves; slmembed applies it server-side. GPU memory is nvidia-smi's memory.used, sampled, the
highest in each cell. With --adapter-runs RUN1 RUN2 slmembed also serves both runs' LoRA adapters over one base
(requests to a random one of them) and then RUN1's alone. Writes results/bench/serve-gpu-<model>.json (or --output)
and prints a table; exits 1 on any error or mismatch.

    python bench/serve_gpu.py --model exports/gemma-st --infinity-site /tmp/infsite --dtype bfloat16
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from common import Request, drive, free_port, start_server, stop_server

from slmembed import __version__ as slmembed_version
from slmembed.atomic import write_json
from slmembed.device import resolve_device

ROOT = Path(__file__).resolve().parents[1]
MIXES = {"sts": ("sts", 4), "long": ("long", 4), "single": ("sts", 1)}  # mix -> (its texts' pool, most a request)
# on a 16-core GPU host: 8 client processes beside the server under test
CLIENT_PROCESSES = max(1, min(8, (os.cpu_count() or 2) // 2))
LONG_TOKENS = (200, 500)


def long_texts(sentences: Sequence[str], count_tokens: Callable[[str], int], n: int,
               lo: int = LONG_TOKENS[0], hi: int = LONG_TOKENS[1]) -> list[str]:
    """Up to ``n`` texts of ``lo``-``hi`` tokens: consecutive ``sentences`` joined with spaces until the count reaches
    ``lo``; a text that overshoots ``hi`` is dropped and the next one starts at the sentence that overshot."""
    out: list[str] = []
    parts: list[str] = []
    for sentence in sentences:
        if len(out) == n:
            break
        parts.append(sentence)
        tokens = count_tokens(" ".join(parts))
        if tokens > hi:
            parts = [sentence] if count_tokens(sentence) < lo else []
        elif tokens >= lo:
            out.append(" ".join(parts))
            parts = []
    return out


class GpuMemory:
    """nvidia-smi's memory.used (MiB) of the visible GPU, sampled every ``every`` seconds; None without nvidia-smi."""

    def __init__(self, every: float = 0.25) -> None:
        self.every, self.peak = every, None
        self.available = shutil.which("nvidia-smi") is not None and torch.cuda.is_available()

    @staticmethod
    def used() -> int:
        index = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", index],
                             capture_output=True, text=True, check=True).stdout
        return int(out.split()[0])

    @contextmanager
    def sampling(self) -> Iterator[None]:
        """Sample while the block runs; ``peak`` is then its highest reading."""
        if not self.available:
            yield
            return
        self.peak, stop = self.used(), threading.Event()

        def sample() -> None:
            while not stop.wait(self.every):
                self.peak = max(self.peak, self.used())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


def _peak_rss_mib(pid: int) -> float | None:
    """A process's peak resident memory (VmHWM), from /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def _infinity_env(site: str) -> dict[str, str]:
    """infinity's environment: its own site dir, no telemetry, offline, and its transformers 4 kept to torch (it
    otherwise imports any jax or TensorFlow the machine has, and a jaxlib that fails to load stops the server)."""
    env = {**os.environ, "PYTHONPATH": site, "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1",
           "HF_HUB_OFFLINE": "1", "USE_TORCH": "1", "USE_FLAX": "0", "USE_TF": "0"}
    env.pop("SLMEMBED_API_KEY", None)
    return env


def infinity_versions(python: str, site: str) -> dict:
    code = ("import json, infinity_emb, torch, transformers, sentence_transformers, numpy; print(json.dumps({"
            "'infinity_emb': infinity_emb.__version__, 'torch': torch.__version__, "
            "'transformers': transformers.__version__, 'sentence_transformers': sentence_transformers.__version__, "
            "'numpy': numpy.__version__}))")
    out = subprocess.run([python, "-c", code], env=_infinity_env(site), capture_output=True, text=True)
    if out.returncode:  # recorded; its server will then fail to start and be reported as well
        return {"error": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def slmembed_versions() -> dict:
    import sentence_transformers
    import transformers
    return {"slmembed": slmembed_version, "torch": torch.__version__, "transformers": transformers.__version__,
            "sentence_transformers": sentence_transformers.__version__, "numpy": np.__version__}


def default_prompt(folder: Path) -> str:
    """The sentence-transformers folder's default prompt (the text slmembed puts before each input), or ''."""
    path = folder / "config_sentence_transformers.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    name = config.get("default_prompt_name")
    return (config.get("prompts") or {}).get(name, "") if name else ""


ST3_MODULES = {"Transformer", "Pooling", "Normalize"}  # our exports' modules: sentence_transformers.models.X in 3.x


def infinity_folder(folder: Path) -> Path:
    """``folder`` as infinity's sentence-transformers 3 (and transformers 4) read it, in a new temporary folder: the
    same weights and tokenizer (linked), its module list, pooling and tokenizer configs in their 3.x / 4.x spelling.
    An export written by sentence-transformers 6 names modules 3.x has not (``sentence_transformers.base.modules...``),
    spells the pooling config ``embedding_dimension``/``pooling_mode`` (3.x: ``word_embedding_dimension``, and
    ``pooling_mode`` only as a string), has no ``max_seq_length`` (3.x: the model's maximum), a tokenizer class
    transformers 4 lacks or reads differently (below) and a model config whose RoPE settings transformers 4 does not
    read (see ``_transformers4_config``). A folder 3.x reads already is returned as it is."""
    modules = json.loads((folder / "modules.json").read_text())
    if all(m["type"].startswith("sentence_transformers.models.") for m in modules):
        return folder
    dest = Path(tempfile.mkdtemp(prefix="serve-gpu-infinity-")) / folder.name
    dest.mkdir()
    rewritten = {"modules.json", "sentence_bert_config.json", "tokenizer_config.json", "config.json"}
    config = _transformers4_config(json.loads((folder / "config.json").read_text()))
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    for m in modules:
        kind = m["type"].rsplit(".", 1)[1]
        if kind not in ST3_MODULES:
            raise SystemExit(f"{folder}: module {m['type']} has no sentence-transformers 3 counterpart here")
        m["type"] = f"sentence_transformers.models.{kind}"
        if kind == "Pooling":
            config = json.loads((folder / m["path"] / "config.json").read_text())
            mode = config.pop("pooling_mode", "mean")
            if not isinstance(mode, str):
                raise SystemExit(f"{folder}: pooling modes {mode} together: sentence-transformers 3 reads one")
            (dest / m["path"]).mkdir(exist_ok=True)
            (dest / m["path"] / "config.json").write_text(json.dumps(
                {"word_embedding_dimension": config.pop("embedding_dimension"),
                 "pooling_mode": mode, **config}, indent=2))
            rewritten.add(m["path"])
    (dest / "modules.json").write_text(json.dumps(modules, indent=2))
    tokenizer = json.loads((folder / "tokenizer_config.json").read_text())
    # tokenizer.json as it is, post-processor included: transformers 4's GemmaTokenizerFast rebuilds that from its
    # add_eos_token flag (off), so it would not append the EOS the export's tokenizer appends; and transformers 5 names
    # a plain tokenizer.json TokenizersBackend, a class transformers 4 lacks.
    tokenizer["tokenizer_class"] = "PreTrainedTokenizerFast"
    (dest / "tokenizer_config.json").write_text(json.dumps(tokenizer, indent=2))
    spec = json.loads((folder / "embed.json").read_text())["spec"] if (folder / "embed.json").exists() else {}
    (dest / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": spec.get("max_length", tokenizer.get("model_max_length")), "do_lower_case": False}))
    for path in folder.iterdir():
        if path.name not in rewritten and not path.name.startswith("."):
            (dest / path.name).symlink_to(path.resolve())
    return dest


def _transformers4_config(config: dict) -> dict:
    """A transformers 5 model config in transformers 4's spelling: ``rope_parameters`` (one dict, or one per attention
    type as Gemma-3 has them) becomes ``rope_theta``/``rope_scaling`` (and Gemma-3's ``rope_local_base_freq``);
    transformers 4 ignores ``rope_parameters`` and would take its default base (10,000 where SmolLM2 has 100,000)."""
    config = dict(config)
    rope = config.pop("rope_parameters", None)
    if rope and "full_attention" in rope:
        config["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        rope = rope["full_attention"]
    if rope:
        config["rope_theta"] = rope["rope_theta"]
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        config["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    if "dtype" in config:
        config["torch_dtype"] = config.pop("dtype")
    return config


def pools(folder: Path, embedder, size: int) -> dict[str, list[str]]:
    """The pools of texts the mixes' requests draw from (``MIXES``)."""
    from slmembed.data.nli import load_triplets
    from slmembed.data.sts import load_sts

    sts = load_sts("STSBenchmark")
    sentences = [s for t in load_triplets(["lingnli"]).triplets for s in t[:2]]
    random.Random(0).shuffle(sentences)
    tokenizer = embedder.tokenizer
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    return {"sts": sorted(set(sts.sentences1) | set(sts.sentences2))[:size],
            "long": long_texts(sentences, count, size)}


def serve_limits(args: argparse.Namespace) -> list[str]:
    """`slmembed serve`'s options in every case here: the weights' dtype, the batch, and limits the load never hits."""
    return ["--dtype", args.dtype, "--max-batch", str(args.max_batch), "--max-queue", "100000",
            "--max-connections", "4096", "--request-timeout", "600"]


def _table(cells: list[dict]) -> str:
    head = ("server", "mix", "clients", "texts/s", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors", "mismatch",
            "min cos", "client cpu", "GPU MiB")
    rows = [head] + [(c["server"], c["mix"], c["clients"], c["texts_per_s"], c["requests_per_s"],
                      *(c["latency_ms"][q] if c["latency_ms"] else "-" for q in ("p50", "p90", "p99")),
                      c["errors"], c["mismatches"], c["min_cosine_seen"], c["client_cpu_per_wall_max"],
                      c.get("gpu_mem_used_mib") or "-")
                     for c in cells]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(str(v).rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="an exported sentence-transformers folder (or packaged model)")
    ap.add_argument("--servers", nargs="*",
                    choices=("slmembed", "slmembed-compile", "slmembed-graphs", "slmembed-compile-graphs", "infinity"),
                    default=["slmembed", "infinity"],
                    help="slmembed: serve --no-cuda-graphs; slmembed-compile: --compile; slmembed-graphs: "
                         "--cuda-graphs (the default on a GPU); slmembed-compile-graphs: --compile --cuda-graphs "
                         "(the compiled blocks' fused kernels recorded in the graphs); none: only the adapter case")
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 16, 64, 256])
    ap.add_argument("--mixes", nargs="+", choices=list(MIXES), default=list(MIXES))
    ap.add_argument("--seconds", type=float, default=30, help="per cell")
    ap.add_argument("--client-processes", type=int, default=CLIENT_PROCESSES,
                    help=f"processes the clients are spread over (default here: {CLIENT_PROCESSES}, half the cores, "
                         "at most 8)")
    ap.add_argument("--pool", type=int, default=512, help="distinct texts per mix")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="both servers' weights")
    ap.add_argument("--max-batch", type=int, default=256, help="texts per forward pass: slmembed's --max-batch, "
                                                               "infinity's --batch-size")
    ap.add_argument("--min-cosine", type=float, default=0.999)
    ap.add_argument("--infinity-python", default=sys.executable, help="the python that runs infinity_emb")
    ap.add_argument("--infinity-site", help="infinity's --target site dir, put on its PYTHONPATH")
    ap.add_argument("--adapter-runs", nargs=2, metavar="RUN", help="two training runs: the multi-adapter case")
    ap.add_argument("--adapter-min-cosine", type=float, default=0.995, help="unmerged LoRA against the merged run")
    ap.add_argument("--output", help="default: results/bench/serve-gpu-<model>.json")
    args = ap.parse_args()

    if args.client_processes < 1:
        ap.error("--client-processes must be at least 1")

    from slmembed import models
    from slmembed.loading import load_embedder

    if "infinity" in args.servers and not args.infinity_site:
        ap.error("--infinity-site is needed to run infinity")
    folder = Path(args.model) if Path(args.model).is_dir() else Path(models.resolve(args.model))
    name = folder.name if Path(args.model).is_dir() else args.model
    device = resolve_device().type
    dtype = getattr(torch, args.dtype)
    embedder = load_embedder(str(folder), dtype=dtype)
    texts = pools(folder, embedder, args.pool)
    expected = {name: embedder.encode(pool) for name, pool in texts.items()}
    prompt = default_prompt(folder)
    infinity_model = infinity_folder(folder) if "infinity" in args.servers else None
    versions = {"slmembed": slmembed_versions()}
    if "infinity" in args.servers:
        versions["infinity"] = infinity_versions(args.infinity_python, args.infinity_site)

    ours = [sys.executable, "-m", "slmembed", "serve", "--model", str(folder), "--name", name, *serve_limits(args)]
    commands = {
        "slmembed": ([*ours, "--no-cuda-graphs"], None, ""),  # the eager forward (graphs are the GPU's default)
        "slmembed-compile": ([*ours, "--compile"], None, ""),
        "slmembed-graphs": ([*ours, "--cuda-graphs"], None, ""),
        "slmembed-compile-graphs": ([*ours, "--compile", "--cuda-graphs"], None, ""),
        # --no-bettertransformer: BetterTransformer needs optimum (not installed); it is deprecated upstream.
        "infinity": ([args.infinity_python, "-m", "infinity_emb.cli", "v2", "--model-id", str(infinity_model),
                      "--served-model-name", name, "--url-prefix", "/v1", "--engine", "torch", "--device", device,
                      "--dtype", args.dtype, "--batch-size", str(args.max_batch), "--no-bettertransformer",
                      "--no-vector-disk-cache", "--model-warmup"],
                     _infinity_env(args.infinity_site or ""), prompt),
    }
    gpu = GpuMemory()
    cells: list[dict] = []
    failed: dict[str, str] = {}  # servers that did not start, with the end of their log
    output = args.output or ROOT / f"results/bench/serve-gpu-{name}.json"

    def save() -> None:  # after each server too, so that a later one's failure or a stopped run keeps what was measured
        write_json(output, {
            "command": " ".join(["python", "bench/serve_gpu.py", *sys.argv[1:]]), "model": name,
            "folder": str(folder), "dtype": args.dtype, "device": device, "max_batch": args.max_batch,
            "min_cosine": args.min_cosine, "client_processes": args.client_processes,
            "infinity_client_prompt": prompt, "infinity_folder": infinity_model and str(infinity_model),
            "long_tokens": list(LONG_TOKENS), "pool": {m: len(p) for m, p in texts.items()},
            "servers": {s: " ".join(commands[s][0]) for s in args.servers}, "versions": versions,
            "machine": {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
                        "cores": os.cpu_count(), "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
                        "note": "servers and clients share the machine; one server runs at a time"},
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "failed_servers": failed,
            "cells": cells})

    for server in args.servers:
        cmd, env, prefix = commands[server]
        port = free_port()
        log = Path(tempfile.gettempdir()) / f"serve-gpu-{server}.log"
        idle = gpu.used() if gpu.available else None
        try:
            proc = start_server([*cmd, "--port", str(port)], port, log, env=env)
        except SystemExit as exc:  # start_server's exit: the server died before answering
            failed[server] = str(exc)[-2000:]
            print(f"{server} did not start:\n{failed[server]}", flush=True)
            continue
        for mix in args.mixes:
            source, most = MIXES[mix]
            pool, vectors = [prefix + t for t in texts[source]], expected[source]

            def request(rng: random.Random, pool=pool, vectors=vectors, most=most) -> Request:
                picks = rng.sample(range(len(pool)), rng.randint(1, most))
                return {"model": name, "input": [pool[i] for i in picks]}, vectors[picks]

            for clients in args.clients:
                with gpu.sampling():
                    load = drive(port, request, clients, args.seconds, args.min_cosine, processes=args.client_processes)
                cells.append({"server": server, "mix": mix, **load, "gpu_mem_used_mib": gpu.peak,
                              "gpu_mem_idle_mib": idle})
                print(_table(cells[-1:]).splitlines()[-1], flush=True)
        rss = _peak_rss_mib(proc.pid)
        stop_server(proc)
        for cell in cells:
            if cell["server"] == server:
                cell["server_peak_rss_mib"] = rss
        save()
    if args.adapter_runs:
        cells += adapter_cells(args, load_embedder, texts["sts"], gpu)

    save()
    print(_table(cells))
    print(f"wrote {output}")
    return 0 if not failed and all(c["errors"] == 0 and c["mismatches"] == 0 for c in cells) else 1


def adapter_cells(args: argparse.Namespace, load_embedder, pool: list[str], gpu: GpuMemory) -> list[dict]:
    """slmembed serving two runs' adapters (requests to a random one) and then the first run's alone, STS mix."""
    runs = {"A": args.adapter_runs[0], "B": args.adapter_runs[1]}
    dtype = getattr(torch, args.dtype)
    expected = {n: load_embedder(run, dtype=dtype).encode(pool) for n, run in runs.items()}  # merged, directly
    cells = []
    for served in (["A", "B"], ["A"]):
        port = free_port()
        cmd = [sys.executable, "-m", "slmembed", "serve", *(x for n in served for x in ("--run", f"{n}={runs[n]}")),
               *serve_limits(args), "--port", str(port)]
        proc = start_server(cmd, port, Path(tempfile.gettempdir()) / "serve-gpu-adapters.log")

        def request(rng: random.Random, served=served) -> Request:
            picks, n = rng.sample(range(len(pool)), rng.randint(1, 4)), rng.choice(served)
            return {"model": n, "input": [pool[i] for i in picks]}, expected[n][picks]

        for clients in args.clients:
            with gpu.sampling():
                load = drive(port, request, clients, args.seconds, args.adapter_min_cosine,
                             processes=args.client_processes)
            cells.append({"server": f"slmembed-adapters-{len(served)}", "mix": "sts", **load,
                          "gpu_mem_used_mib": gpu.peak})
            print(_table(cells[-1:]).splitlines()[-1], flush=True)
        stop_server(proc)
    return cells


if __name__ == "__main__":
    sys.exit(main())
