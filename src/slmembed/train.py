"""Contrastive fine-tuning, top to bottom, in named phases.

* **checks**: the recipe and the run folder, before any work;
* **environment** (``_environment``): the accelerator (one process, or torchrun's), what the recipe asks of it
  checked, bf16 where the device computes it, the seed; with several processes, the liveness watcher (liveness.py);
* **data** (``_examples``): NLI examples (anchor, positive, hard negative, optional neutral) from data/nli.py;
* **plan** (``Plan``): the global batch, the steps, the checkpoint interval;
* **reference** (``_reference``): with ``train.reference``, every unique sentence embedded once by the reference
  (reference.py), before the model loads;
* **adapt** (``_adapt``): with the recipe's ``adapt`` stages, LLM2Vec's MNTP and unsupervised SimCSE on the unique
  sentences (adapt.py), the adapted model saved into the run folder, from which the next phase loads the backbone;
* **model** (``_setup_model``): the backbone made trainable as ``train.finetune`` says (tuning.py: LoRA adapters or
  every weight), AdamW and the schedule, the Embedder that runs it (pooling, prompt, attention: embedder.py); then
  (``_setup_data``) every unique sentence tokenised once;
* **run folder** (``_open_run``): continue from the newest checkpoint (``resume=True``: exactly where it stopped), or
  start it;
* **loop**: the step's global batch (a fixed, seeded permutation per epoch, so the order is a function of the step
  alone: batch.py), and one ``Step`` (step.py): this rank's slice, embeddings in length-sorted chunks
  (``grad_cache``: backward chunk by chunk, gradcache.py, so the batch is bounded by time, not memory;
  ``cuda_graphs``: the step's forward and backward replayed as a CUDA graph, cuda_graphs.py), the loss
  (``batch_loss``: ``train.loss`` names the objective in losses/), AdamW. The log (train_log.py) reads losses every
  ``log_every`` steps only, so the GPU never waits for Python; a logged loss is the mean over ranks. Checkpoints
  (weights, optimizer, schedule, RNG, step) are written atomically every ``save_every`` steps, STSBenchmark dev
  scores every ``dev_every`` (selection.py);
* **selection and saving** (``_finish``): the weights the run keeps (the last, the best on dev, or an average) into
  ``adapter/`` or ``model/``.

Whatever a run opens (the log's bar and TensorBoard writer, the profiler, the liveness watcher, the output's lock) is
closed when it ends or fails: one ``ExitStack`` in ``train``. A new objective is a module in losses/; a new pooling or
attention is the Embedder's; both reach the loop through the recipe. Runs unchanged under ``torchrun`` (accelerate
sets up the process group and DDP).
"""

from __future__ import annotations

import json
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import get_scheduler

from slmembed import (
    adapt,
    cuda_graphs,
    kernels,
    liveness,
    models,
    outputs,
    packing,
    profiling,
    reference,
    run,
    sharding,
    train_output,
    tuning,
)
from slmembed.atomic import atomic_dir, clean_leftovers, clean_temporaries, write_json, write_text
from slmembed.batch import StepBatch as StepBatch  # re-exported, with batch_loss and rank_rows: tests and bench/
from slmembed.batch import TrainData, batch_indices
from slmembed.batch import batch_loss as batch_loss
from slmembed.batch import rank_rows as rank_rows
from slmembed.config import Recipe, TrainConfig, recipe_from_dict
from slmembed.data.nli import Example, load_triplets
from slmembed.device import device_name, resolve_device
from slmembed.embedder import Embedder
from slmembed.errors import SlmembedError
from slmembed.run import Checkpoint, RunDir
from slmembed.selection import DevSelection
from slmembed.spec import EmbedSpec
from slmembed.step import Step
from slmembed.train_log import TrainLog


def save_checkpoint(run_dir: Path, model, recipe: Recipe, optimizer, scheduler, step: int, keep: int,
                    write: bool = True) -> None:
    """Write the step's checkpoint. A sharded model's state is gathered first, so every process calls this and only
    the one with ``write`` writes."""
    weights = tuning.state(model, recipe)
    optim = sharding.gather_optimizer(model, optimizer) if sharding.is_sharded(model) else optimizer.state_dict()
    if not write:
        return
    with atomic_dir(RunDir(run_dir).checkpoint(step)) as tmp:
        files = Checkpoint(tmp)
        save_file(weights, files.weights(recipe.train.finetune))
        torch.save({"optimizer": optim, "scheduler": scheduler.state_dict()}, files.optimizer)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, files.rng)
        files.state.write_text(json.dumps({"step": step}))
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
    files = Checkpoint(ckpt)
    optim = _read(files.optimizer, ("optimizer", "scheduler"),
                  "the optimizer and schedule states slmembed saves (tensors, numbers and dicts only)")
    rng = _read(files.rng, ("cpu",), "the random states slmembed saves (tensors only)")
    step = _read(files.state, ("step",), 'JSON like {"step": 4}')["step"]
    try:
        weights = load_file(files.weights(recipe.train.finetune))
    except (OSError, SafetensorError) as exc:
        raise SlmembedError(f"{files.weights(recipe.train.finetune)}: expected a safetensors file of the trained "
                            f"weights ({exc}); delete this checkpoint folder to resume from the one before") from None
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
class Plan:
    """Phase "plan": the run's global batch (over the processes), its steps, its checkpoint interval and how many
    checkpoints it keeps."""

    global_batch: int
    total: int
    save_every: int
    keep: int

    @classmethod
    def of(cls, tc: TrainConfig, triplets: int, world: int, spaced_checkpoints: int | None) -> Plan:
        """The plan for ``triplets`` examples on ``world`` processes; ``spaced_checkpoints=k``: k evenly spaced
        checkpoints are kept instead of the recipe's interval."""
        global_batch = tc.batch_size * world
        if triplets < global_batch:
            raise SlmembedError(f"{triplets} triplets are fewer than one global batch of {global_batch}")
        total = tc.max_steps or tc.epochs * (triplets // global_batch)
        if spaced_checkpoints:
            return cls(global_batch, total, max(1, -(-total // (spaced_checkpoints + 1))), spaced_checkpoints + 1)
        return cls(global_batch, total, tc.save_every, tc.keep_checkpoints)


def _environment(recipe: Recipe, device: str) -> tuple[Accelerator, bool]:
    """Phase "environment": the accelerator, what the recipe asks of it checked (kernels, CUDA graphs, sharding), the
    seed; and whether to compute in bf16 (where the device computes it natively)."""
    tc = recipe.train
    # bf16 autocast is ours (step.py), not accelerate's, whose process-wide state would fix one precision per process.
    # DDP without the per-forward broadcast of buffers (the rotary tables, equal everywhere: a collective per forward
    # for nothing) and with gradients that are views of its all-reduce buckets (no copy in and out).
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False, gradient_as_bucket_view=True)
    acc = _accelerator(resolve_device(device).type == "cpu", ddp)
    kernels.check(tc.kernels, tc.compile, acc.device)
    packing.check(tc.packed_attention, acc.device)
    sharded = tc.sharding == "fsdp"
    cuda_graphs.check(tc.cuda_graphs, device=acc.device, sharded=sharded, grad_cache=tc.grad_cache,
                      packing=tc.packing, reference=tc.reference is not None)
    bf16 = tuning.uses_bf16(recipe, acc.device)
    if tc.bf16 and not bf16:
        acc.print(f"train.bf16: this {acc.device.type} has no native bf16 (AVX512-BF16 or AMX on a CPU): training in "
                  "float32, which is faster here")
    if sharded and acc.num_processes == 1:
        raise SlmembedError("train.sharding: fsdp splits the model across processes: start several with torchrun "
                            "(e.g. torchrun --nproc_per_node=2 -m slmembed train ...), or set train.sharding=none")
    torch.manual_seed(tc.seed)
    return acc, bf16


def _setup_model(recipe: Recipe, acc: Accelerator, total: int, base: Path | None = None,
                 ) -> tuple[Embedder, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Phase "model": the backbone (the recipe's model, or the adapted ``base``; bf16 under LoRA, fp32 for full
    fine-tuning), made trainable as the recipe says, AdamW over the trainable weights and the schedule of ``total``
    steps; the Embedder that runs the model (wrapped for the processes as the recipe says), the optimizer and the
    schedule."""
    tc = recipe.train
    attn = None if acc.device.type == "cuda" else "eager"  # SDPA where supported; eager trains faster on the CPU
    sharded = tc.sharding == "fsdp"
    empty = sharded and not acc.is_main_process  # sharded, the first process alone reads the weights
    base, tokenizer = models.load(str(base or recipe.model.name), dtype=tuning.weights_dtype(recipe, acc.device),
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
    size = getattr(acc.unwrap_model(model).config, "hidden_size", None)
    if tc.matryoshka_dims and size is not None and max(tc.matryoshka_dims) >= size:
        raise SlmembedError(f"train.matryoshka_dims: {max(tc.matryoshka_dims)} is not below the model's embedding "
                            f"size {size}; list the smaller prefix sizes (the full size is always trained)")
    scheduler = get_scheduler(tc.schedule, optimizer, num_warmup_steps=tc.warmup_steps, num_training_steps=total)
    # Several processes: DDP through accelerate; a sharded model is already distributed (sharding.py); with CUDA
    # graphs, no wrapper: the graph averages the gradients itself (cuda_graphs.py).
    if cuda_graphs.replicated(tc.cuda_graphs, acc.num_processes):
        model.to(acc.device)
        optimizer = acc.prepare(optimizer)
        cuda_graphs.broadcast_parameters([p for p in model.parameters() if p.requires_grad])
    elif not sharded:
        model, optimizer = acc.prepare(model, optimizer)
    return (Embedder(model, tokenizer, EmbedSpec.of(recipe.model), packed=tc.packing, kernel=tc.packed_attention),
            optimizer, scheduler)


def _reference(recipe: Recipe, texts: list[str], run_dir: Path, resume: bool,
               acc: Accelerator) -> tuple[reference.Reference | None, bool]:
    """Phase "reference": with ``train.reference``, its vectors of ``texts`` (the unique sentences), made before the
    model loads, as only they stay (reference.py); and whether they were made now (a resumed run reads its own)."""
    if recipe.train.reference is None:
        return None, False
    return reference.vectors(recipe, texts, run_dir if resume else None, acc.device, acc.process_index,
                             acc.num_processes)


def _start_folder(run_dir: Path, replace: bool) -> None:
    """The run folder made ready by the main process: an earlier run cleared first (``replace``), the folder made and
    marked as train's output (outputs.py)."""
    if replace:
        outputs.clear(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / outputs.MARKER).exists():
        outputs.mark(run_dir, "train", run.ENTRIES)


def _adapt(recipe: Recipe, texts: list[str], run_dir: Path, replace: bool, acc: Accelerator,
           bf16: bool) -> tuple[dict | None, bool]:
    """Phase "adapt": with the recipe's ``adapt`` stages, the run folder started (an earlier run cleared if
    ``replace``) and the adapted model written into it, or reused (adapt.py). The stages' record (None without
    stages) and whether an earlier run is still to be cleared."""
    if not recipe.adapt.on:
        return None, replace
    if acc.is_main_process:
        _start_folder(run_dir, replace)
        clean_temporaries(RunDir(run_dir).adapted)  # the adapted model as it was, if a run was killed replacing it
    acc.wait_for_everyone()
    return adapt.adapt(recipe, texts, RunDir(run_dir), acc, bf16), False


def _setup_data(recipe: Recipe, examples: list[Example], texts: list[str], embedder: Embedder,
                table: reference.Reference | None) -> TrainData:
    """Phase "data", continued: every unique sentence (``texts``) tokenised once, each example's tokens, and the
    reference's vectors (``table``) if the objective takes them."""
    token_ids = dict(zip(texts, embedder.tokenize(texts), strict=True))
    cols = columns(recipe)
    cost = np.array([sum(len(token_ids[e[c]]) for c in cols if e[c] is not None) for e in examples])  # tokens
    return TrainData(examples, token_ids, cols, cost, table)


def _open_run(recipe: Recipe, run_dir: Path, replace: bool, resume: bool, acc: Accelerator, embedder: Embedder,
              optimizer, scheduler, data_record: dict, new_table: reference.Reference | None) -> int:
    """Phase "run folder": continue from the newest checkpoint (``resume``), or start the folder (``replace``: clear
    the earlier run first); its recipe, data record and the reference's vectors made now (``new_table``)
    written. The step the run starts from."""
    if resume and acc.is_main_process:
        clean_leftovers(run_dir)  # half-written files of a run killed while saving
    acc.wait_for_everyone()
    start, kept = 0, RunDir(run_dir).checkpoints() if resume else []
    if kept:
        start = load_checkpoint(kept[-1], acc.unwrap_model(embedder.model), recipe, optimizer, scheduler)
        acc.print(f"resumed from step {start}")
    if acc.is_main_process:
        _start_folder(run_dir, replace)
        write_text(RunDir(run_dir).recipe_file, recipe.to_yaml())
        write_json(RunDir(run_dir).data_record, data_record)
        if new_table is not None:
            new_table.save(run_dir)
    acc.wait_for_everyone()
    return start


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
    """Train the recipe's model into ``run_dir``; return the run summary (also written into the run folder).

    ``force`` replaces an earlier run in ``run_dir`` (once the model has loaded); ``spaced_checkpoints=k`` replaces
    the recipe's checkpoint interval: k evenly spaced checkpoints are kept. ``profile=(first, count)`` profiles
    steps first+1..first+count into ``profile/`` (profiling.py).
    """
    run_dir = Path(run_dir)
    recipe = recipe_from_dict(recipe.to_dict())  # a recipe built in code gets the checks a loaded one had
    tc = recipe.train
    with ExitStack() as stack:  # what the run opens is closed, or stopped, when it fails too
        # Phase "checks": everything that can be wrong with the request fails here, before any data or model
        # loads; no other process writes the run folder meanwhile (outputs.writing).
        replace = stack.enter_context(outputs.writing(run_dir, lambda: train_output.check(
            recipe, run_dir, data_dir=data_dir, resume=resume, force=force)))
        acc, bf16 = _environment(recipe, device)
        stack.enter_context(liveness.watching(acc.process_index, acc.num_processes))  # a lost machine stops the rest
        examples, data_record = _examples(recipe, data_dir, acc)
        plan = Plan.of(tc, len(examples), acc.num_processes, spaced_checkpoints)
        texts = sorted({t for example in examples for t in example if t is not None})
        table, encoded = _reference(recipe, texts, run_dir, resume, acc)
        adapted, replace = _adapt(recipe, texts, run_dir, replace, acc, bf16)
        embedder, optimizer, scheduler = _setup_model(recipe, acc, plan.total,
                                                      RunDir(run_dir).adapted if adapted is not None else None)
        data = _setup_data(recipe, examples, texts, embedder, table)
        start = _open_run(recipe, run_dir, replace, resume, acc, embedder, optimizer, scheduler, data_record,
                          table if encoded else None)
        trained = acc.unwrap_model(embedder.model)
        takes_part = acc.is_main_process or tc.sharding == "fsdp"  # a sharded model's gathers need every process
        dev = DevSelection.open(run_dir, recipe, data_dir, start) if tc.dev_every else None
        # Scored by the main process alone, on the model without DDP's wrapper (whose forward would wait for the
        # others); by every process when sharded, as each forward gathers the shards.
        dev_embedder = (Embedder(trained, embedder.tokenizer, embedder.spec, packed=embedder.packed,
                                 kernel=embedder.kernel) if dev else None)
        step = Step(recipe, acc, embedder, optimizer, scheduler, data, bf16)
        log = stack.enter_context(TrainLog(RunDir(run_dir).log, RunDir(run_dir).tensorboard, acc=acc,
                                           scheduler=scheduler, start=start, total=plan.total,
                                           log_every=tc.log_every, global_batch=plan.global_batch, progress=progress))
        profiler = stack.enter_context(profiling.StepProfiler(RunDir(run_dir).profile, *profile, acc.process_index,
                                                              acc.device)) if profile else None

        # Phase "loop": the step (batch, embeddings, loss, update); then the log, checkpoints and dev scores when due.
        for done in range(start + 1, plan.total + 1):
            log.step(step(batch_indices(len(examples), plan.global_batch, done - 1, tc.seed)))
            if profiler is not None:
                profiler.after(done)
            scored = dev is not None and dev.due(done, plan.total)
            saved = done % plan.save_every == 0 and done < plan.total
            if not (log.due(done) or saved or scored):
                continue
            record = log.read(done)  # the losses read on the host: the first non-finite one stops the run
            score = (dev.record(done, dev_embedder, trained, write=acc.is_main_process) if scored and takes_part
                     else None)
            log.write(done, record, stsb_dev=score)
            if saved:
                if takes_part:
                    save_checkpoint(run_dir, trained, recipe, optimizer, scheduler, done, plan.keep,
                                    write=acc.is_main_process)
                acc.wait_for_everyone()
        log.close()  # the bar's last line before the final phase's
        return _finish(recipe, run_dir, acc, embedder, dev, dev_embedder, plan, len(examples), bf16, log.elapsed(),
                       adapted)


def _finish(recipe: Recipe, run_dir: Path, acc: Accelerator, embedder: Embedder, dev: DevSelection | None,
            dev_embedder: Embedder | None, plan: Plan, triplets: int, bf16: bool, elapsed: float,
            adapted: dict | None = None) -> dict:
    """Phase "selection and saving": the weights the run keeps (selection.py), written atomically, then how to load
    them (``RunDir.write_info``: over the adapted model if the run has one) and the run's summary (returned; with the
    adapt stages' record, ``adapted``)."""
    tc = recipe.train
    sharded = tc.sharding == "fsdp"
    summary = {"steps": plan.total, "batch_size": plan.global_batch, "triplets": triplets,
               "triplets_seen": plan.total * plan.global_batch, "minutes": round(elapsed / 60, 3),
               "device": device_name(acc.device), "world_size": acc.num_processes, "finetune": tc.finetune,
               "bf16": bf16, **({"adapt": adapted} if adapted is not None else {})}
    final = acc.unwrap_model(embedder.model)
    if dev is not None and (acc.is_main_process or sharded):
        if sharded:
            acc.wait_for_everyone()  # the main process's last snapshot is written before the others read it
        summary["dev"] = dev.choose(dev_embedder, final)
    gathered = tuning.state(final, recipe) if sharded else None  # every process takes part in the gather
    peaks = acc.gather(torch.tensor([profiling.host_peak_gib()], device=acc.device))  # in rank order
    summary["host_peak_gib"] = [round(v, 3) for v in peaks.tolist()]
    if acc.is_main_process:
        run = RunDir(run_dir)
        with atomic_dir(run.weights_folder(tc.finetune)) as tmp:
            tuning.save_final(final, embedder.tokenizer, tmp, recipe, gathered)
        run.write_info(recipe.model.name, embedder.spec, tc.finetune, adapted=adapted is not None)
        write_json(run.summary_file, summary)
    acc.wait_for_everyone()
    return summary
