"""Contrastive fine-tuning, top to bottom, in named phases.

* **checks**: the recipe and the run folder, before any work;
* **data** (``_examples``): NLI examples (anchor, positive, hard negative, optional neutral) from data/nli.py, every
  unique sentence tokenised once;
* **model** (``_setup_model``): the backbone made trainable as ``train.finetune`` says (tuning.py: LoRA adapters or
  every weight), AdamW and the schedule, the Embedder that runs it (pooling, prompt, attention: embedder.py);
* **run folder**: continue from the newest checkpoint (``resume=True``: exactly where it stopped), or start it;
* **loop**: the step's global batch (a fixed, seeded permutation per epoch, so the order is a function of the step
  alone), this rank's slice, embeddings in length-sorted chunks (``grad_cache``: backward chunk by chunk,
  gradcache.py, so the batch is bounded by time, not memory; ``cuda_graphs``: the step's forward and backward
  replayed as a CUDA graph, cuda_graphs.py), the loss (``batch_loss``: ``train.loss`` names the objective in
  losses/), AdamW. The host reads losses every ``log_every`` steps only, so the GPU never waits for
  Python; a logged loss is the mean over ranks. Checkpoints (weights, optimizer, schedule, RNG, step) are written
  atomically every ``save_every`` steps, STSBenchmark dev scores every ``dev_every`` (selection.py);
* **selection and saving**: the weights the run keeps (the last, the best on dev, or an average) into ``adapter/``
  or ``model/``.

A new objective is a module in losses/; a new pooling or attention is the Embedder's; both reach the loop through
the recipe. Runs unchanged under ``torchrun`` (accelerate sets up the process group and DDP).
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import get_scheduler

from slmembed import cuda_graphs, kernels, liveness, models, outputs, profiling, run, sharding, train_output, tuning
from slmembed.atomic import atomic_dir, clean_leftovers, disk_errors, write_json, write_text
from slmembed.compile import compile_blocks
from slmembed.config import Recipe, recipe_from_dict
from slmembed.data.nli import Example, load_triplets
from slmembed.embedder import Embedder
from slmembed.errors import SlmembedError
from slmembed.gradcache import cached_backward
from slmembed.losses import objective as named_objective
from slmembed.losses.matryoshka import matryoshka
from slmembed.run import RunDir
from slmembed.selection import DevSelection
from slmembed.spec import EmbedSpec


def batch_indices(n: int, global_batch: int, step: int, seed: int) -> np.ndarray:
    """Triplet indices of the global batch at ``step``: epoch e uses permutation(seed + e), remainder dropped."""
    epoch, k = divmod(step, n // global_batch)
    return _permutation(n, seed + epoch)[k * global_batch : (k + 1) * global_batch]


def rank_rows(rows: np.ndarray, cost: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's share of a global batch's ``rows``: dealt by decreasing ``cost`` (tokens) in snake order (ranks
    0..W-1, then W-1..0, ...), so every rank gets the same number of rows and nearly the same tokens. Each step ends
    in collectives, so the rank with the most tokens sets the pace; which rank holds a row does not change the loss
    (every rank's candidates are gathered) and depends on the step alone."""
    if world == 1:
        return rows
    order = rows[np.argsort(-cost[rows], kind="stable")]
    lap = np.arange(len(rows)) % (2 * world)
    return order[np.where(lap < world, lap, 2 * world - 1 - lap) == rank]


@functools.lru_cache(maxsize=2)
def _permutation(n: int, seed: int) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(n)
    order.flags.writeable = False
    return order


def weights_file(recipe: Recipe) -> str:
    """A checkpoint's file of trained weights: ``adapter.safetensors`` or ``model.safetensors``."""
    return f"{tuning.final_folder(recipe)}.safetensors"


def save_checkpoint(run_dir: Path, model, recipe: Recipe, optimizer, scheduler, step: int, keep: int,
                    write: bool = True) -> None:
    """Write the step's checkpoint. A sharded model's state is gathered first, so every process calls this and only
    the one with ``write`` writes."""
    weights = tuning.state(model, recipe)
    optim = sharding.gather_optimizer(model, optimizer) if sharding.is_sharded(model) else optimizer.state_dict()
    if not write:
        return
    with atomic_dir(run_dir / "checkpoints" / f"step-{step:07d}") as tmp:
        save_file(weights, tmp / weights_file(recipe))
        torch.save({"optimizer": optim, "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step}))
    for old in RunDir(run_dir).checkpoints()[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _read(path: Path, keys: tuple[str, ...], expected: str) -> dict:
    """A checkpoint file's dict (torch.save's with ``weights_only``, or JSON), which must hold ``keys``; anything
    else is a one-line error naming the file and what was ``expected``."""
    try:
        data = json.loads(path.read_text()) if path.suffix == ".json" else torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise SlmembedError(f"{path}: missing from the checkpoint; expected {expected}") from None
    except Exception as exc:  # pickle, zip and JSON errors alike: the file is not what slmembed wrote
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise SlmembedError(f"{path}: cannot be read as {expected} ({reason}); delete this checkpoint folder to "
                            "resume from the one before") from None
    if not isinstance(data, dict) or not all(k in data for k in keys):
        raise SlmembedError(f"{path}: expected {expected}; delete this checkpoint folder to resume from the one before")
    return data


def load_checkpoint(ckpt: Path, model, recipe: Recipe, optimizer, scheduler) -> int:
    """Load the checkpoint folder ``ckpt`` into the model, optimizer, schedule and RNG; return its step."""
    optim = _read(ckpt / "optim.pt", ("optimizer", "scheduler"),
                  "the optimizer and schedule states slmembed saves (tensors, numbers and dicts only)")
    rng = _read(ckpt / "rng.pt", ("cpu",), "the random states slmembed saves (tensors only)")
    step = _read(ckpt / "state.json", ("step",), 'JSON like {"step": 4}')["step"]
    try:
        weights = load_file(ckpt / weights_file(recipe))
    except (OSError, SafetensorError) as exc:
        raise SlmembedError(f"{ckpt / weights_file(recipe)}: expected a safetensors file of the trained weights "
                            f"({exc}); delete this checkpoint folder to resume from the one before") from None
    tuning.load_state(model, weights, recipe)
    if sharding.is_sharded(model):
        sharding.scatter_optimizer(model, optimizer, optim["optimizer"])
    else:
        optimizer.load_state_dict(optim["optimizer"])
    scheduler.load_state_dict(optim["scheduler"])
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return step


def _trim_log(path: Path, step: int) -> None:
    """Keep the log's records up to ``step``, where the run continues; later and half-written lines are dropped."""
    kept = []
    for line in path.read_text().splitlines() if step and path.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line + "\n")
    write_text(path, "".join(kept))


def _examples(recipe: Recipe, data_dir: str | None, acc: Accelerator) -> tuple[list[Example], dict]:
    """Phase "data": the recipe's examples (a seeded subsample if asked) and what data.json records of them."""
    dc, seed = recipe.data, recipe.train.seed
    data = load_triplets(dc.sources, data_dir=data_dir, skip_bad_rows=dc.skip_bad_rows, pairing=dc.pairing,
                         neutral_negatives=dc.neutral_negatives, entailment_pairs=dc.entailment_pairs)
    examples = data.triplets
    if dc.max_triplets is not None and dc.max_triplets < len(examples):
        keep = np.random.default_rng(seed).permutation(len(examples))[: dc.max_triplets]
        examples = [examples[i] for i in sorted(keep)]
    acc.print(f"triplets: {len(examples)} used of {len(data.triplets)} from {len(data.counts)} sources "
              f"({data.duplicates} duplicates dropped, {data.skipped_rows} bad rows skipped); per source in data.json")
    return examples, {"triplets": len(examples), "counts": data.counts, "duplicates": data.duplicates,
                      "skipped_rows": data.skipped_rows, "pairs": sum(e[2] is None for e in examples)}


def columns(recipe: Recipe) -> list[int]:
    """The example columns a step embeds: anchor, positive, then the negatives the recipe uses (hard negative,
    neutral)."""
    return [0, 1] + [2] * recipe.train.hard_negatives + [3] * recipe.data.neutral_negatives


@dataclass(frozen=True)
class StepBatch:
    """One step's sequences: anchors, positives, then each negative column's present texts (``ids``). Where some
    negatives are missing, ``slots`` holds the places of the present ones among the ``rows x negative columns``
    (column-major) and ``present`` marks them; both are None when every negative is there (or there are none)."""

    ids: list[list[int]]
    rows: int
    negatives: int  # rows x negative columns
    slots: torch.Tensor | None = None
    present: torch.Tensor | None = None

    @classmethod
    def of(cls, examples: list[Example], rows: np.ndarray, cols: list[int],
           token_ids: dict[str, list[int]]) -> StepBatch:
        texts = [[examples[i][c] for i in rows] for c in cols]
        negatives = [t for col in texts[2:] for t in col]
        ids = [token_ids[t] for col in texts[:2] for t in col] + [token_ids[t] for t in negatives if t is not None]
        present = torch.tensor([t is not None for t in negatives], dtype=torch.bool)
        if bool(present.all()):
            return cls(ids, len(rows), len(negatives))
        return cls(ids, len(rows), len(negatives), present.nonzero().squeeze(1), present)


def batch_loss(objective: Callable, batch: StepBatch, emb: torch.Tensor, temperature: float) -> torch.Tensor:
    """Phase "loss": the objective of a step's embeddings [N, D] (in the order of ``batch.ids``). Missing negatives
    (entailment-only pairs, groups without a neutral) are masked out of the candidates. The places are computed on
    the host (``StepBatch.of``): a boolean index on the GPU would make the host wait for it."""
    b = batch.rows
    anchors, positives, negatives, mask = emb[:b], emb[b : 2 * b], None, None
    if batch.negatives and batch.slots is None:
        negatives = emb[2 * b :]
    elif batch.negatives:
        slots = batch.slots.to(emb.device, non_blocking=True)
        negatives = emb.new_zeros((batch.negatives, emb.shape[1])).index_put((slots,), emb[2 * b :])
        mask = batch.present.to(emb.device, non_blocking=True)
    return objective(anchors, positives, negatives, temperature, negative_mask=mask)


def _setup_model(recipe: Recipe, acc: Accelerator):
    """Phase "model": the backbone (bf16 under LoRA, fp32 for full fine-tuning), made trainable as the recipe says,
    its tokenizer, and AdamW over the trainable weights."""
    tc = recipe.train
    attn = None if acc.device.type == "cuda" else "eager"  # SDPA where supported; eager trains faster on the CPU
    sharded = tc.sharding == "fsdp"
    empty = sharded and not acc.is_main_process  # sharded, the first process alone reads the weights
    base, tokenizer = models.load(recipe.model.name, dtype=tuning.weights_dtype(recipe, acc.device),
                                  trust_remote_code=recipe.model.trust_remote_code,
                                  allow_pickle=recipe.model.allow_pickle, attn_implementation=attn,
                                  device=torch.device("meta") if empty else None)
    kernels.apply(base, tc.kernels)  # before LoRA wraps the modules liger swaps
    model = tuning.prepare(base, recipe)
    if sharded:  # before the optimizer, which must see the sharded parameters
        model = sharding.shard(model, acc.device)
    params = [p for p in model.parameters() if p.requires_grad]
    # On a GPU, AdamW's fused kernel: one launch for all the adapter's tensors instead of a dozen per step.
    fused = acc.device.type == "cuda" and not sharded
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=fused or None)
    return model, tokenizer, optimizer


def _accelerator(cpu: bool, ddp: DistributedDataParallelKwargs) -> Accelerator:
    """accelerate's Accelerator, on the CPU if ``cpu``. Its state is process-wide: in one process (no torchrun) that
    trained on the CPU before, a later Accelerator would stay there, so the state is reset for the device asked."""
    acc = Accelerator(cpu=cpu, kwargs_handlers=[ddp])
    if (acc.device.type == "cpu") != cpu and acc.num_processes == 1:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        acc = Accelerator(cpu=cpu, kwargs_handlers=[ddp])
    return acc


def train(recipe: Recipe, run_dir: str | Path, *, data_dir: str | None = None, resume: bool = False,
          force: bool = False, device: str = "auto", progress: bool = True,
          spaced_checkpoints: int | None = None, profile: tuple[int, int] | None = None) -> dict:
    """Train the recipe's model into ``run_dir``; return the run summary (also written as summary.json).

    ``force`` replaces an earlier run in ``run_dir`` (once the model has loaded); ``spaced_checkpoints=k`` replaces
    the recipe's checkpoint interval: k evenly spaced checkpoints are kept. ``profile=(first, count)`` profiles
    steps first+1..first+count into ``profile/`` (profiling.py).
    """
    # Phase "checks": everything that can be wrong with the request fails here, before any data or model loads; no
    # other process writes the run folder meanwhile (outputs.writing).
    run_dir = Path(run_dir)
    recipe = recipe_from_dict(recipe.to_dict())  # a recipe built in code gets the checks a loaded one had

    with outputs.writing(run_dir, lambda: train_output.check(recipe, run_dir, data_dir=data_dir, resume=resume,
                                                              force=force)) as replace:
        return _train(recipe, run_dir, replace, data_dir=data_dir, resume=resume, device=device, progress=progress,
                      spaced_checkpoints=spaced_checkpoints, profile=profile)


def _train(recipe: Recipe, run_dir: Path, replace: bool, *, data_dir: str | None, resume: bool, device: str,
           progress: bool, spaced_checkpoints: int | None, profile: tuple[int, int] | None) -> dict:
    """``train`` once its checks have passed: ``replace`` clears an earlier run first."""
    tc = recipe.train
    # bf16 autocast is ours (below), not accelerate's, whose process-wide state would fix one precision per process.
    # DDP without the per-forward broadcast of buffers (the rotary tables, equal everywhere: a collective per forward
    # for nothing) and with gradients that are views of its all-reduce buckets (no copy in and out).
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False, gradient_as_bucket_view=True)
    acc = _accelerator(models.resolve_device(device).type == "cpu", ddp)
    watcher = liveness.start(acc.process_index, acc.num_processes)  # a lost machine stops the others (liveness.py)
    kernels.check(tc.kernels, tc.compile, acc.device)
    sharded = tc.sharding == "fsdp"
    cuda_graphs.check(tc.cuda_graphs, device=acc.device, sharded=sharded, grad_cache=tc.grad_cache,
                      packing=tc.packing)
    bf16 = tuning.uses_bf16(recipe, acc.device)
    if tc.bf16 and not bf16:
        acc.print(f"train.bf16: this {acc.device.type} has no native bf16 (AVX512-BF16 or AMX on a CPU): training in "
                  "float32, which is faster here")
    if sharded and acc.num_processes == 1:
        raise SlmembedError("train.sharding: fsdp splits the model across processes: start several with torchrun "
                            "(e.g. torchrun --nproc_per_node=2 -m slmembed train ...), or set train.sharding=none")
    torch.manual_seed(tc.seed)

    examples, data_record = _examples(recipe, data_dir, acc)
    global_batch = tc.batch_size * acc.num_processes
    if len(examples) < global_batch:
        raise SlmembedError(f"{len(examples)} triplets are fewer than one global batch of {global_batch}")
    total = tc.max_steps or tc.epochs * (len(examples) // global_batch)
    save_every, keep = tc.save_every, tc.keep_checkpoints
    if spaced_checkpoints:
        save_every, keep = max(1, -(-total // (spaced_checkpoints + 1))), spaced_checkpoints + 1

    model, tokenizer, optimizer = _setup_model(recipe, acc)
    size = getattr(acc.unwrap_model(model).config, "hidden_size", None)
    if tc.matryoshka_dims and size is not None and max(tc.matryoshka_dims) >= size:
        raise SlmembedError(f"train.matryoshka_dims: {max(tc.matryoshka_dims)} is not below the model's embedding "
                            f"size {size}; list the smaller prefix sizes (the full size is always trained)")
    scheduler = get_scheduler(tc.schedule, optimizer, num_warmup_steps=tc.warmup_steps, num_training_steps=total)
    # Several processes: DDP through accelerate; a sharded model is already distributed (sharding.py); with CUDA
    # graphs, no wrapper: the graph averages the gradients itself (cuda_graphs.py).
    replicas = tc.cuda_graphs and acc.num_processes > 1
    if replicas:
        model.to(acc.device)
        optimizer = acc.prepare(optimizer)
        cuda_graphs.broadcast_parameters([p for p in model.parameters() if p.requires_grad])
    elif not sharded:
        model, optimizer = acc.prepare(model, optimizer)
    spec = EmbedSpec.of(recipe.model)
    embedder = Embedder(model, tokenizer, spec, packed=tc.packing)
    texts = sorted({t for example in examples for t in example if t is not None})
    token_ids = dict(zip(texts, embedder.tokenize(texts)))  # every unique sentence tokenised once
    cols = columns(recipe)
    cost = np.array([sum(len(token_ids[e[c]]) for c in cols if e[c] is not None) for e in examples])  # tokens

    # Phase "run folder": continue from the newest checkpoint, or start the folder.
    if resume and acc.is_main_process:
        clean_leftovers(run_dir)  # half-written files of a run killed while saving
    acc.wait_for_everyone()
    start = 0
    kept = RunDir(run_dir).checkpoints() if resume else []
    if kept:
        start = load_checkpoint(kept[-1], acc.unwrap_model(model), recipe, optimizer, scheduler)
        acc.print(f"resumed from step {start}")
    if acc.is_main_process:
        if replace:
            outputs.clear(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / outputs.MARKER).exists():
            outputs.mark(run_dir, "train", run.ENTRIES)
        write_text(run_dir / "recipe.yaml", recipe.to_yaml())
        write_json(run_dir / "data.json", data_record)
    log_path = run_dir / "train_log.jsonl"
    if acc.is_main_process:
        _trim_log(log_path, start)
    acc.wait_for_everyone()
    dev = DevSelection.open(run_dir, recipe, data_dir, start) if tc.dev_every else None
    # Scored by the main process alone, on the model without DDP's wrapper (whose forward would wait for the others);
    # by every process when sharded, as each forward gathers the shards.
    dev_embedder = Embedder(acc.unwrap_model(model), tokenizer, spec, packed=embedder.packed) if dev else None

    # Phase "loop": batch, embeddings, loss, update; then logging, checkpoints and dev scores when due.
    model.train()
    if tc.compile:
        compile_blocks(model)
    objective = named_objective(tc.loss, tc)
    if tc.matryoshka_dims:
        objective = matryoshka(objective, tc.matryoshka_dims, tc.matryoshka_weights)
    trained = [p for p in model.parameters() if p.requires_grad]
    graphed = (cuda_graphs.GraphedStep(embedder, objective, tc.temperature, trained, bf16, tc.chunk_tokens)
               if tc.cuda_graphs else None)
    no_sync = functools.partial(sharding.no_sync if sharded else acc.no_sync, model)
    board = _tensorboard(run_dir / "tensorboard", start) if acc.is_main_process else None
    t0, seen_t0 = time.time(), start
    pending: list[torch.Tensor] = []  # losses not yet read on the host: reading one waits for the GPU
    profiler = (profiling.StepProfiler(run_dir / "profile", *profile, acc.process_index, acc.device)
                if profile else None)
    bar = None
    if progress and acc.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc="train", unit="step")
    try:
        for step in range(start, total):
            rows = batch_indices(len(examples), global_batch, step, tc.seed)
            batch = StepBatch.of(examples, rank_rows(rows, cost, acc.process_index, acc.num_processes), cols, token_ids)
            loss = None
            if graphed is not None:  # None: a step over chunk_tokens, run the ordinary way
                largest = None
                if replicas:  # every process replays the bucket of the step's largest share: their collectives pair up
                    shares = (rank_rows(rows, cost, rank, acc.num_processes) for rank in range(acc.num_processes))
                    largest = max(graphed.size(StepBatch.of(examples, share, cols, token_ids)) for share in shares)
                loss = graphed(batch, largest)
            if loss is None:
                loss_of = functools.partial(batch_loss, objective, batch, temperature=tc.temperature)
                with torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=bf16):
                    if tc.grad_cache:
                        loss = cached_backward(embedder, batch.ids, tc.chunk_tokens, loss_of, no_sync)
                    else:
                        loss = loss_of(embedder.forward_ids(batch.ids, tc.chunk_tokens))
                        acc.backward(loss)
                if replicas:
                    cuda_graphs.average_gradients(trained)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            pending.append(loss.detach())
            done = step + 1
            if profiler is not None:
                profiler.after(done)
            if bar is not None:
                bar.update(1)
            scored = dev is not None and dev.due(done, total)
            if done % tc.log_every and done % save_every and done != total and not scored:
                continue
            # Every log_every steps, before a checkpoint or dev score and at the end: read the losses, stop on the
            # first non-finite one.
            losses = acc.reduce(torch.stack(pending), reduction="mean").tolist()  # each rank's loss covers its anchors
            bad = next((i for i, v in enumerate(losses) if not np.isfinite(v)), None)
            if bad is not None:
                raise SlmembedError(f"loss is {losses[bad]} at step {done - len(losses) + bad + 1}; the last good "
                                    "checkpoint is kept, fix the cause and continue with --resume")
            pending.clear()
            record = None
            if done % tc.log_every == 0 or done == total:
                elapsed = time.time() - t0
                rate = (done - seen_t0) * global_batch / max(elapsed, 1e-9)
                record = {"step": done, "loss": round(losses[-1], 6), "lr": scheduler.get_last_lr()[0],
                          "triplets_per_s": round(rate, 2), "elapsed_s": round(elapsed, 2)}
                if acc.device.type == "cuda":
                    record["peak_gib"] = round(torch.cuda.max_memory_allocated(acc.device) / 2**30, 3)
            if scored and (acc.is_main_process or sharded):
                value = dev.record(done, dev_embedder, acc.unwrap_model(model), write=acc.is_main_process)
                record = (record or {"step": done}) | {"stsb_dev": value}
            if record is not None and acc.is_main_process:
                _log(record, log_path, board, bar)
            if done % save_every == 0 and done < total:
                if acc.is_main_process or sharded:
                    save_checkpoint(run_dir, acc.unwrap_model(model), recipe, optimizer, scheduler, done, keep,
                                    write=acc.is_main_process)
                acc.wait_for_everyone()
    finally:
        if bar is not None:
            bar.close()  # before an error is printed, so that it is the last line on the terminal
    if board is not None:
        board.close()

    # Phase "selection and saving": the weights the run keeps (selection.py), written atomically.
    summary = {"steps": total, "batch_size": global_batch, "triplets": len(examples),
               "triplets_seen": total * global_batch, "minutes": round((time.time() - t0) / 60, 3),
               "device": models.device_name(acc.device), "world_size": acc.num_processes, "finetune": tc.finetune,
               "bf16": bf16}
    final = acc.unwrap_model(model)
    if dev is not None and (acc.is_main_process or sharded):
        if sharded:
            acc.wait_for_everyone()  # the main process's last snapshot is written before the others read it
        summary["dev"] = dev.choose(dev_embedder, final)
    gathered = tuning.state(final, recipe) if sharded else None  # every process takes part in the gather
    peaks = acc.gather(torch.tensor([profiling.host_peak_gib()], device=acc.device))  # in rank order
    summary["host_peak_gib"] = [round(v, 3) for v in peaks.tolist()]
    if acc.is_main_process:
        with atomic_dir(run_dir / tuning.final_folder(recipe)) as tmp:
            tuning.save_final(final, tokenizer, tmp, recipe, gathered)
        write_json(run_dir / "embed.json", {"model": recipe.model.name, "spec": spec.__dict__,
                                           "finetune": tc.finetune})
        write_json(run_dir / "summary.json", summary)
    acc.wait_for_everyone()
    if watcher is not None:
        watcher.stop()
    return summary


def _log(record: dict, path: Path, board, bar) -> None:
    """One train_log.jsonl line, its scalars in TensorBoard, the loss on the progress bar."""
    with disk_errors(path), open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
    if board is not None:
        for key in ("loss", "lr", "triplets_per_s", "stsb_dev"):
            if key in record:
                board.add_scalar(f"train/{key}" if key != "stsb_dev" else "dev/stsb", record[key], record["step"])
    if bar is not None and "loss" in record:
        bar.set_postfix(loss=f"{record['loss']:.4f}")


def _tensorboard(folder: Path, start: int):
    """A TensorBoard writer for the logged scalars when tensorboard is installed, else None; a resumed run drops
    the events past its checkpoint."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(folder), purge_step=start or None, flush_secs=10)
