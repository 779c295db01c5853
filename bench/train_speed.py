"""Training speed: slmembed against sentence-transformers, same GPU, model, LoRA, loss, batch and data, one process.

For each batch size: slmembed's own ``train`` in the chosen variants (eager; ``compile``: regional torch.compile;
``grad_cache``: cached negatives; ``compile_grad_cache``: both; each also as ``..._padded``, with packing off) and
the peer's SentenceTransformerTrainer with MultipleNegativesRankingLoss and/or its cached variant (which is how a
peer user reaches large batches). Rates are triplets/s between a step after warm-up and the last step, both timed
after the GPU finished; with ``--packed-attention``, each packed variant once per attention kernel of packed
batches (``train.packed_attention``: varlen, flex; packing.py). Model FLOPs per step are counted from the actual
token lengths (see ``model_flops``); MFU divides them by the measured bf16 matmul ceiling. Then, if asked,
GradCache's peak memory against batch size, and a quality check: both tools train the same number of steps on the
same triplets with the same schedule, and both are scored on the nine STS sets.

    python bench/train_speed.py --model gemma-3-270m --batches 60 --variants eager compile \
        --quality-steps 200 --output results/bench/train-gemma-3-270m-b60.json
    python bench/train_speed.py --model gemma-3-270m --batches 512 --variants grad_cache compile_grad_cache \
        --peer-losses cached --peer-warmup 2 --peer-steps 4 --cache-sweep 1024 2048 4096 \
        --output results/bench/train-gemma-3-270m-b512.json
    python bench/train_speed.py --model gemma-3-270m --batches 512 --variants eager compile --packed-attention \
        varlen flex --peer-losses --profile 'results/bench/profile-b512-{variant}.txt' --profile-variants compile \
        --output results/bench/train-gemma-3-270m-b512-flex.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import StEncoder, check_same_tokens, log_window, matmul_ceiling_tflops, save, st_model, st_texts
from torch.utils.data import BatchSampler, SequentialSampler
from transformers import AutoConfig, TrainerCallback

from slmembed import models
from slmembed.config import Recipe, load_recipe, with_overrides
from slmembed.data.nli import load_triplets
from slmembed.data.sts import TASKS, load_all
from slmembed.embedder import Embedder
from slmembed.evaluate import evaluate
from slmembed.loading import load_embedder
from slmembed.report import read_log
from slmembed.run import RunDir
from slmembed.spec import EmbedSpec
from slmembed.train import batch_indices, train


def model_flops(config, lengths: np.ndarray) -> float:
    """FLOPs of one LoRA training step over sequences of these real lengths.

    Frozen weights need no weight gradients, so each linear layer costs its forward (2 N L) and its input gradient
    (2 N L); attention scores and mixing cost 4 L^2 d per layer forward and twice that backward. LoRA's own
    matrices (under 1% of N) and elementwise work are not counted.
    """
    h, layers = config.hidden_size, config.num_hidden_layers
    dq = config.num_attention_heads * getattr(config, "head_dim", h // config.num_attention_heads)
    dkv = config.num_key_value_heads * getattr(config, "head_dim", h // config.num_attention_heads)
    n_linear = layers * (h * dq + 2 * h * dkv + dq * h + 3 * h * config.intermediate_size)
    return float(4 * n_linear * lengths.sum() + 3 * 4 * layers * dq * (lengths.astype(np.float64) ** 2).sum())


def step_tokens(recipe: Recipe, triplets, embedder: Embedder, steps: range) -> tuple[np.ndarray, int]:
    """Real token lengths of every sequence in ``steps``, and the tokens the chunked forward computes when padded
    (packed, it computes the real ones)."""
    lengths, padded = [], 0
    for step in steps:
        rows = batch_indices(len(triplets), recipe.train.batch_size, step, recipe.train.seed)
        ids = embedder.tokenize([triplets[i][c] for c in range(3) for i in rows])
        lengths += [len(x) for x in ids]
        padded += sum(len(chunk) * -(-max(len(ids[i]) for i in chunk) // 8) * 8
                      for chunk in embedder.chunks(ids, recipe.train.chunk_tokens))
    return np.array(lengths), padded


def _peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else float("nan")


def _reset() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


VARIANTS = {"eager": [], "compile": ["train.compile=true"], "grad_cache": ["train.grad_cache=true"],
            "compile_grad_cache": ["train.compile=true", "train.grad_cache=true"],
            # liger-kernel's fused norms, MLP and rotary (kernels.py); it patches the architecture for the rest of
            # the process, so list these after the others (compile_liger is refused: kernels.check)
            "liger": ["train.kernels=liger"], "compile_liger": ["train.compile=true", "train.kernels=liger"],
            # each step's forward and backward replayed as a CUDA graph (cuda_graphs.py; packed only)
            "graphs": ["train.cuda_graphs=true"], "compile_graphs": ["train.compile=true", "train.cuda_graphs=true"]}
VARIANTS.update({f"{name}_padded": [*overrides, "train.packing=false"] for name, overrides in list(VARIANTS.items())
                 if "graphs" not in name})
KERNELS = ("auto", "varlen", "flex", "flex64")  # train.packed_attention (packing.py)


def configurations(variants: list[str], kernels: list[str]) -> dict[str, list[str]]:
    """Each variant's overrides with each packed-attention kernel, by name: the variant's own name where ``kernels``
    is ``auto`` alone, else ``VARIANT_KERNEL``; padded variants (no packed attention) once, as they are."""
    if kernels == ["auto"]:
        return {variant: VARIANTS[variant] for variant in variants}
    out = {}
    for variant in variants:
        if variant.endswith("_padded"):
            out[variant] = VARIANTS[variant]
            continue
        for kernel in kernels:
            out[f"{variant}_{kernel}"] = [*VARIANTS[variant], f"train.packed_attention={kernel}"]
    return out


def run_ours(recipe: Recipe, warmup: int, steps: int, data_dir: str | None, run_dir: Path,
             log_every: int | None = None, profile: tuple[int, int] | None = None) -> dict:
    log_every = log_every or math.gcd(warmup, steps)
    recipe = with_overrides(recipe, [f"train.max_steps={warmup + steps}", f"train.log_every={log_every}",
                                     "train.save_every=1000000"])
    _reset()
    t = time.perf_counter()
    try:
        train(recipe, run_dir, data_dir=data_dir, progress=False, profile=profile)
    except torch.OutOfMemoryError:
        _reset()
        return {"oom": True}
    except Exception as exc:  # noqa: BLE001 - one failed variant is a result too; the others still run
        _reset()
        return {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    last, seconds = log_window(run_dir, warmup, warmup + steps)
    return {"triplets_per_s": round(steps * recipe.train.batch_size / seconds, 1),
            "ms_per_step": round(1000 * seconds / steps, 1), "peak_gib": _peak_gib(),
            "final_loss": last["loss"], "wall_s_with_load": round(time.perf_counter() - t, 1)}


class _Timer(TrainerCallback):
    """Times the peer between the end of step ``warmup`` and the end of the last step, GPU work included."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.marks = warmup, {}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup or state.global_step == state.max_steps:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks[state.global_step] = time.perf_counter()


def run_peer(recipe: Recipe, triplets, warmup: int, steps: int, embedder: Embedder, out_dir: Path,
             cached: int | None = None) -> tuple[dict, object]:
    """The peer trained on the batches of slmembed's first ``warmup + steps`` steps, in the same order."""
    from datasets import Dataset
    from peft import LoraConfig, inject_adapter_in_model
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments, losses

    tc, total = recipe.train, warmup + steps
    rows = np.concatenate([batch_indices(len(triplets), tc.batch_size, s, tc.seed) for s in range(total)])
    columns = {name: st_texts([triplets[i][c] for i in rows], embedder)
               for c, name in enumerate(("anchor", "positive", "negative"))}
    model = st_model(models.resolve(recipe.model.name), EmbedSpec.of(recipe.model))
    mismatches = check_same_tokens(model, embedder, [t for trip in triplets[:300] for t in trip])
    # peft's injection, which the peer's add_adapter reaches through transformers (whose wrapper, from 5.24, refuses
    # the peft 0.21 of the GPU machine): the same LoRA layers, the backbone frozen
    inject_adapter_in_model(LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                                       target_modules=recipe.lora.targets), model[0].auto_model)
    for param in model.parameters():  # PEFT's get_peft_model (and slmembed) keep adapters in float32; add_adapter
        if param.requires_grad:  # leaves them in the backbone's bf16, where AdamW's small updates round away
            param.data = param.data.float()
    scale = 1 / tc.temperature
    loss = (losses.CachedMultipleNegativesRankingLoss(model, scale=scale, mini_batch_size=cached) if cached
            else losses.MultipleNegativesRankingLoss(model, scale=scale))
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=tc.batch_size, max_steps=total, learning_rate=tc.lr,
        lr_scheduler_type=tc.schedule, warmup_steps=tc.warmup_steps, weight_decay=tc.weight_decay, bf16=tc.bf16,
        max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to="none", seed=tc.seed,
        dataloader_drop_last=True, disable_tqdm=True, use_cpu=not torch.cuda.is_available())

    class SameBatches(SentenceTransformerTrainer):
        """The peer's trainer fed slmembed's batches in slmembed's order (its default sampler shuffles)."""

        def get_batch_sampler(self, dataset, batch_size, drop_last, *args, **kwargs):
            return BatchSampler(SequentialSampler(range(len(dataset))), batch_size, drop_last)

    timer = _Timer(warmup)
    trainer = SameBatches(model=model, args=args, train_dataset=Dataset.from_dict(columns), loss=loss,
                          callbacks=[timer])
    _reset()
    try:
        trainer.train()
    except torch.OutOfMemoryError:
        del trainer, model, loss
        _reset()
        return {"oom": True}, None
    seconds = timer.marks[total] - timer.marks[warmup]
    losses_logged = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    result = {"triplets_per_s": round(steps * tc.batch_size / seconds, 1),
              "ms_per_step": round(1000 * seconds / steps, 1),
              "peak_gib": _peak_gib(), "final_loss": losses_logged[-1],
              "token_mismatches_of_900": mismatches, "losses": losses_logged}
    return result, model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--batches", type=int, nargs="+", default=[60, 512])
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--variants", nargs="*", default=["eager", "compile"], choices=sorted(VARIANTS))
    p.add_argument("--packed-attention", nargs="+", default=["auto"], choices=KERNELS,
                   help="run each packed variant with each of these kernels (train.packed_attention), named "
                        "VARIANT_KERNEL, e.g. --packed-attention varlen flex")
    p.add_argument("--peer-losses", nargs="*", default=["mnrl"], choices=["mnrl", "cached"],
                   help="the peer's MultipleNegativesRankingLoss and/or its cached variant (mini-batch 64)")
    p.add_argument("--peer-warmup", type=int, help="the peer's warm-up steps (default: --warmup)")
    p.add_argument("--peer-steps", type=int, help="the peer's timed steps (default: --steps)")
    p.add_argument("--cache-sweep", type=int, nargs="*", default=[], help="GradCache batch sizes for memory vs batch")
    p.add_argument("--quality-steps", type=int, default=0, help="train both this many steps at the first batch size")
    p.add_argument("--quality-variant", default="compile", choices=sorted(VARIANTS))
    p.add_argument("--quality-lr", type=float, default=5e-4)
    p.add_argument("--quality-tasks", nargs="+", default=list(TASKS), help="STS sets of the quality check")
    p.add_argument("--profile", help="write torch.profiler tables of slmembed's first variant at the first batch "
                   "here; with --profile-variants, of each of those, '{variant}' in the path naming it")
    p.add_argument("--profile-variants", nargs="*", choices=sorted(VARIANTS),
                   help="the variants to profile (each with each --packed-attention kernel)")
    p.add_argument("--sync-check", action="store_true",
                   help="run the first variant at the first batch again, recording where the host waits for the GPU")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for every slmembed run, e.g. train.chunk_tokens=16384")
    p.add_argument("--data-dir")
    p.add_argument("--output", required=True)
    args = p.parse_args()

    base = with_overrides(load_recipe(args.model), args.set)
    triplets = load_triplets(base.data.sources, data_dir=args.data_dir).triplets
    folder = models.resolve(base.model.name)
    config = AutoConfig.from_pretrained(folder)
    from transformers import AutoTokenizer

    tokenizer_only = Embedder(torch.nn.Linear(1, 1), AutoTokenizer.from_pretrained(folder), EmbedSpec.of(base.model))
    ceiling = matmul_ceiling_tflops() if torch.cuda.is_available() else float("nan")
    runs = configurations(args.variants, args.packed_attention)
    result = {"model": args.model, "overrides": args.set, "matmul_ceiling_tflops": round(ceiling, 1),
              "warmup_steps": args.warmup,
              "timed_steps": args.steps, "lora": base.lora.__dict__, "batches": {}}
    print(f"bf16 matmul ceiling: {ceiling:.0f} TFLOP/s")
    scratch = Path(tempfile.mkdtemp(prefix="bench-"))

    for batch in args.batches:
        recipe = with_overrides(base, [f"train.batch_size={batch}"])
        lengths, padded = step_tokens(recipe, triplets, tokenizer_only, range(args.warmup, args.warmup + args.steps))
        flops = model_flops(config, lengths) / args.steps
        row = {"tokens_per_step": int(lengths.sum()) // args.steps, "padded_tokens_per_step": padded // args.steps,
               "model_tflop_per_step": round(flops / 1e12, 3)}
        def first_variant(name: str, recipe=recipe, batch=batch) -> tuple:
            """The first variant again, as a run_ours argument tuple (this iteration's recipe and batch bound)."""
            return (with_overrides(recipe, next(iter(runs.values()))), args.warmup, args.steps, args.data_dir,
                    scratch / f"{name}-{batch}")

        if args.profile and args.profile_variants:  # steps warmup+1..warmup+10 under slmembed's step profiler,
            # before the timed variants: a liger variant patches the architecture for the rest of the process
            profiles = configurations(args.profile_variants, args.packed_attention)
            row["profiled"] = {name: step_profiled(with_overrides(recipe, overrides), args,
                                                   scratch / f"profile-{batch}-{name}",
                                                   args.profile.format(variant=name))
                               for name, overrides in profiles.items()}
            args.profile = None
        for variant, overrides in runs.items():
            ours = run_ours(with_overrides(recipe, overrides), args.warmup, args.steps, args.data_dir,
                            scratch / f"ours-{batch}-{variant}")
            if "triplets_per_s" in ours:
                ours["mfu"] = round(flops / (ours["ms_per_step"] / 1000) / (ceiling * 1e12), 4)
            row[f"slmembed_{variant}"] = ours
            print(batch, variant, ours)
        if args.profile:
            row["profiled"] = profiled(first_variant("profile"), args.profile)
            args.profile = None
        if args.sync_check:
            row["host_syncs"] = host_syncs(first_variant("syncs"), args.warmup + args.steps)
            args.sync_check = False
        for loss in args.peer_losses:
            name, cached = ("st_cached_mnrl", 64) if loss == "cached" else ("st_mnrl", None)
            peer, _ = run_peer(recipe, triplets, args.peer_warmup or args.warmup, args.peer_steps or args.steps,
                               tokenizer_only, scratch / name, cached)
            peer.pop("losses", None)
            row[name] = peer
            print(batch, name, peer)
        rates = {k: v["triplets_per_s"] for k, v in row.items() if isinstance(v, dict) and "triplets_per_s" in v}
        ours_rates = [v for k, v in rates.items() if k.startswith("slmembed_")]
        peer_rates = [v for k, v in rates.items() if k.startswith("st_")]
        if ours_rates and peer_rates:
            row["speedup_vs_best_peer"] = round(max(ours_rates) / max(peer_rates), 2)
        result["batches"][str(batch)] = row

    for batch in args.cache_sweep:
        recipe = with_overrides(base, [f"train.batch_size={batch}", *VARIANTS["compile_grad_cache"]])
        sweep = run_ours(recipe, 2, 2, args.data_dir, scratch / f"sweep-{batch}")
        result.setdefault("grad_cache_memory", {})[str(batch)] = sweep
        print("grad cache", batch, sweep)

    if args.quality_steps:
        result["quality"] = quality(base, triplets, tokenizer_only, args, scratch)
    save(args.output, result)


def step_profiled(recipe: Recipe, args, run_dir: Path, path: str) -> dict:
    """``run_ours`` with ten steps after the warm-up under slmembed's step profiler (profiling.py): its per-step
    summary (wall, host busy, GPU busy, kernels) in the result, its operator tables copied to ``path``."""
    result = run_ours(recipe, args.warmup, args.steps, args.data_dir, run_dir, profile=(args.warmup, 10))
    summary = RunDir(run_dir).profile / "rank0.json"
    if summary.exists():
        result["profile"] = json.loads(summary.read_text())
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(summary.with_suffix(".txt"), path)
        result["profile_tables"] = path
    return result


def profiled(run: tuple, path: str) -> dict:
    """``run_ours(*run)`` under torch.profiler: kernel time against wall time, and the top operators."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        result = run_ours(*run)
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events)
    header = (f"{' '.join(sys.argv)}\nslmembed run: {result}\nGPU kernel time {kernel_us / 1e6:.2f} s in all "
              "(model load and warm-up included)\n\n")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tables = [events.table(sort_by=key, row_limit=40, max_name_column_width=70)
              for key in ("self_device_time_total", "self_cpu_time_total")]
    Path(path).write_text(header + "\n\n".join(tables))
    result["profile"] = path
    return result


def host_syncs(run: tuple, steps: int) -> dict:
    """``run_ours(*run)`` under CUDA's sync debug mode: each place where the host waited for the GPU (model loading
    and logging included), with how many times it did in the run's ``steps`` steps."""
    import collections
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_ours(*run)
    torch.cuda.set_sync_debug_mode(0)
    places = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                                 if "synchronizing" in str(w.message))
    return {"run": result, "steps": steps, "syncs": sum(places.values()), "places": dict(places.most_common(20))}


def quality(base: Recipe, triplets, embedder: Embedder, args, scratch: Path) -> dict:
    """Both tools, same batches, steps and schedule: the nine-set averages must agree within 1 point.

    LoRA's B matrices start at zero, so the first step's loss is the base model's on the first batch: close first
    losses (bf16 arithmetic differs) show that both tools saw the same batch.
    """
    recipe = with_overrides(base, [f"train.batch_size={args.batches[0]}", f"train.lr={args.quality_lr}",
                                   "train.warmup_steps=20", *VARIANTS[args.quality_variant]])
    steps = args.quality_steps
    ours = run_ours(recipe, steps // 2, steps - steps // 2, args.data_dir, scratch / "quality-ours", log_every=1)
    ours_losses = [r["loss"] for r in read_log(RunDir(scratch / "quality-ours").log)]
    sets = load_all(args.quality_tasks, args.data_dir)
    ours["nine_set"] = evaluate(load_embedder(None, scratch / "quality-ours"), sets)
    peer, model = run_peer(recipe, triplets, steps // 2, steps - steps // 2, embedder, scratch / "quality-peer")
    peer_losses = peer.pop("losses")
    peer["nine_set"] = evaluate(StEncoder(model, embedder), sets)
    # Each tool's trained adapter scored by the other tool's encoder too, so that training and inference differences
    # can be told apart.
    peer_run = RunDir(scratch / "quality-peer-adapter")  # laid out as a LoRA run of slmembed's
    backbone = model[0]
    (getattr(backbone, "auto_model", None) or backbone.model).save_pretrained(peer_run.adapter)  # the adapter only
    peer_run.write_info(recipe.model.name, EmbedSpec.of(recipe.model), "lora")
    peer["nine_set_by_slmembed_encoder"] = evaluate(load_embedder(None, peer_run.path), sets)
    del model
    _reset()
    ours_in_peer = st_model(models.resolve(recipe.model.name), EmbedSpec.of(recipe.model))
    ours_in_peer[0].auto_model.load_adapter(str(scratch / "quality-ours/adapter"))
    ours["nine_set_by_peer_encoder"] = evaluate(StEncoder(ours_in_peer, embedder), sets)
    return {"steps": steps, "batch_size": recipe.train.batch_size, "lr": recipe.train.lr,
            "slmembed_variant": args.quality_variant,
            "schedule": recipe.train.schedule,
            "slmembed": ours, "sentence_transformers": peer,
            "first_step_loss": {"slmembed": ours_losses[0], "sentence_transformers": peer_losses[0]},
            "mean_loss_last_20": {"slmembed": round(float(np.mean(ours_losses[-20:])), 4),
                                  "sentence_transformers": round(float(np.mean(peer_losses[-20:])), 4)},
            "average_difference": round(ours["nine_set"]["average"] - peer["nine_set"]["average"], 2),
            "average_difference_by_slmembed_encoder": round(
                ours["nine_set"]["average"] - peer["nine_set_by_slmembed_encoder"]["average"], 2),
            "average_difference_by_peer_encoder": round(
                ours["nine_set_by_peer_encoder"]["average"] - peer["nine_set"]["average"], 2)}


if __name__ == "__main__":
    main()
