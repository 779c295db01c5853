"""Contrastive LoRA fine-tuning, top to bottom.

One step: take the step's global batch of triplets (a fixed, seeded permutation per epoch, so the order is a function
of the step alone), give this rank its slice, embed anchors, positives and negatives in length-sorted chunks, compute
InfoNCE against all ranks' candidates, step AdamW and the schedule. With ``grad_cache`` the backward runs chunk by
chunk (gradcache.py), so the batch size is bounded by time, not memory. The host reads losses only every
``log_every`` steps, so the GPU is never left waiting for Python; a logged loss is the mean over ranks, the loss of
the global batch. Runs unchanged under ``torchrun`` (accelerate sets up the process group and DDP). Checkpoints
(adapter, optimizer, schedule, RNG, step) are written atomically every ``save_every`` steps; ``resume=True``
continues from the newest one exactly where it stopped.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import get_scheduler

from slmembed import models, outputs
from slmembed.atomic import atomic_dir, clean_leftovers, write_json, write_text
from slmembed.compile import compile_blocks
from slmembed.config import Recipe, load_recipe, recipe_from_dict, result_changes
from slmembed.data.nli import load_triplets
from slmembed.embedder import Embedder, EmbedSpec
from slmembed.errors import SlmembedError
from slmembed.gradcache import cached_backward
from slmembed.losses import LOSSES
from slmembed.paths import find_data_dir

# What a run folder holds (README, "Usage").
RUN_ENTRIES = ("adapter", "checkpoints", "recipe.yaml", "embed.json", "train_log.jsonl", "data.json", "summary.json",
               "tensorboard")


def batch_indices(n: int, global_batch: int, step: int, seed: int) -> np.ndarray:
    """Triplet indices of the global batch at ``step``: epoch e uses permutation(seed + e), remainder dropped."""
    epoch, k = divmod(step, n // global_batch)
    return _permutation(n, seed + epoch)[k * global_batch : (k + 1) * global_batch]


@functools.lru_cache(maxsize=2)
def _permutation(n: int, seed: int) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(n)
    order.flags.writeable = False
    return order


def add_lora(model: torch.nn.Module, recipe: Recipe) -> torch.nn.Module:
    cfg, n_layers = recipe.lora, model.config.num_hidden_layers
    if cfg.layers is not None and not all(-n_layers <= i < n_layers for i in cfg.layers):
        raise SlmembedError(f"lora.layers: expected layer numbers from {-n_layers} to {n_layers - 1} (the model has "
                            f"{n_layers} layers), got {cfg.layers}")
    layers = sorted({i % n_layers for i in cfg.layers}) if cfg.layers is not None else None
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.targets,
                      layers_to_transform=layers, layers_pattern="layers" if layers is not None else None)
    return get_peft_model(model, lora)


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("step-*"))


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, step: int, keep: int) -> None:
    with atomic_dir(run_dir / "checkpoints" / f"step-{step:07d}") as tmp:
        save_file(get_peft_model_state_dict(model), tmp / "adapter.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step}))
    for old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(ckpt: Path, model, optimizer, scheduler) -> int:
    set_peft_model_state_dict(model, load_file(ckpt / "adapter.safetensors"))
    optim = torch.load(ckpt / "optim.pt", weights_only=True)
    optimizer.load_state_dict(optim["optimizer"])
    scheduler.load_state_dict(optim["scheduler"])
    rng = torch.load(ckpt / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((ckpt / "state.json").read_text())["step"]


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


def _check_resumable(run_dir: Path, recipe: Recipe) -> None:
    """Refuse to resume a folder that holds no run (no recipe.yaml; a run without checkpoints restarts at step 0),
    or with a recipe that changes the run's result (config.NOT_RESULT lists the fields that may change)."""
    saved = run_dir / "recipe.yaml"
    if not saved.is_file():
        raise SlmembedError(f"cannot resume {run_dir}: it holds no run (no recipe.yaml); start one without --resume")
    changes = result_changes(load_recipe(saved), recipe)
    if changes:
        raise SlmembedError(f"cannot resume {run_dir} with a recipe that changes its result: {'; '.join(changes)}; "
                            "resume with its recipe.yaml, or start a new run in another folder")


def check_run_dir(recipe: Recipe, run_dir: str | Path, *, data_dir: str | None = None, resume: bool | None = False,
                  force: bool = False) -> bool:
    """Check before any work that a run may be written to ``run_dir`` (outputs.py); True if it replaces or continues
    an earlier run. ``resume=None``: the caller has no way to continue a run."""
    return outputs.check_folder(run_dir, "train", inputs=[recipe.model.name, *recipe.data.sources],
                                around=[find_data_dir(data_dir, required=False)], force=force, resume=resume)


def train(recipe: Recipe, run_dir: str | Path, *, data_dir: str | None = None, resume: bool = False,
          force: bool = False, device: str = "auto", progress: bool = True,
          spaced_checkpoints: int | None = None) -> dict:
    """Train the recipe's LoRA adapter into ``run_dir``; return the run summary (also written as summary.json).

    ``force`` replaces an earlier run in ``run_dir`` (once the model has loaded); ``spaced_checkpoints=k`` replaces
    the recipe's checkpoint interval: k evenly spaced checkpoints are kept.
    """
    run_dir = Path(run_dir)
    recipe = recipe_from_dict(recipe.to_dict())  # a recipe built in code gets the checks a loaded one had
    tc = recipe.train
    replace = check_run_dir(recipe, run_dir, data_dir=data_dir, resume=resume, force=force) and not resume
    if resume:
        _check_resumable(run_dir, recipe)
    # bf16 autocast is ours (below), not accelerate's, whose process-wide state would fix one precision per process.
    acc = Accelerator(cpu=models.resolve_device(device).type == "cpu")
    torch.manual_seed(tc.seed)

    # Data: triplets, a seeded subsample if asked, and every unique sentence tokenised once.
    data = load_triplets(recipe.data.sources, data_dir=data_dir, skip_bad_rows=recipe.data.skip_bad_rows)
    triplets = data.triplets
    if recipe.data.max_triplets is not None and recipe.data.max_triplets < len(triplets):
        keep = np.random.default_rng(tc.seed).permutation(len(triplets))[: recipe.data.max_triplets]
        triplets = [triplets[i] for i in sorted(keep)]
    acc.print(f"triplets: {len(triplets)} used of {len(data.triplets)} from {len(data.counts)} sources "
              f"({data.duplicates} duplicates dropped, {data.skipped_rows} bad rows skipped); per source in data.json")
    global_batch = tc.batch_size * acc.num_processes
    if len(triplets) < global_batch:
        raise SlmembedError(f"{len(triplets)} triplets are fewer than one global batch of {global_batch}")
    total = tc.max_steps or tc.epochs * (len(triplets) // global_batch)
    save_every, keep = tc.save_every, tc.keep_checkpoints
    if spaced_checkpoints:
        save_every, keep = max(1, -(-total // (spaced_checkpoints + 1))), spaced_checkpoints + 1

    # Model: backbone in bf16 (if asked), fp32 LoRA adapters on top.
    dtype = torch.bfloat16 if tc.bf16 else torch.float32
    attn = None if acc.device.type == "cuda" else "eager"  # SDPA where supported; eager trains faster on the CPU
    base, tokenizer = models.load(recipe.model.name, dtype=dtype, trust_remote_code=recipe.model.trust_remote_code,
                                  allow_pickle=recipe.model.allow_pickle, attn_implementation=attn)
    model = add_lora(base, recipe)
    spec = EmbedSpec.of(recipe.model)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = get_scheduler(tc.schedule, optimizer, num_warmup_steps=tc.warmup_steps, num_training_steps=total)
    model, optimizer = acc.prepare(model, optimizer)
    embedder = Embedder(model, tokenizer, spec, packed=tc.packing)
    texts = sorted({t for trip in triplets for t in trip})
    token_ids = dict(zip(texts, embedder.tokenize(texts)))  # every unique sentence tokenised once

    if resume and acc.is_main_process:
        clean_leftovers(run_dir)  # half-written files of a run killed while saving
    acc.wait_for_everyone()
    start = 0
    if resume and checkpoints(run_dir):
        start = load_checkpoint(checkpoints(run_dir)[-1], acc.unwrap_model(model), optimizer, scheduler)
        acc.print(f"resumed from step {start}")
    if acc.is_main_process:
        if replace:
            outputs.clear(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / outputs.MARKER).exists():
            outputs.mark(run_dir, "train", RUN_ENTRIES)
        write_text(run_dir / "recipe.yaml", recipe.to_yaml())
        write_json(run_dir / "data.json", {"triplets": len(triplets), "counts": data.counts,
                                          "duplicates": data.duplicates, "skipped_rows": data.skipped_rows})
    log_path = run_dir / "train_log.jsonl"
    if acc.is_main_process:
        _trim_log(log_path, start)
    acc.wait_for_everyone()

    model.train()
    if tc.compile:
        compile_blocks(model)
    columns = 3 if tc.hard_negatives else 2

    objective = LOSSES[tc.loss]

    def loss_of(emb: torch.Tensor) -> torch.Tensor:
        emb = emb.view(columns, -1, emb.shape[-1])
        return objective(emb[0], emb[1], emb[2] if tc.hard_negatives else None, tc.temperature)

    board = _tensorboard(run_dir / "tensorboard", start) if acc.is_main_process else None
    t0, seen_t0 = time.time(), start
    pending: list[torch.Tensor] = []  # losses not yet read on the host: reading one waits for the GPU
    bar = None
    if progress and acc.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc="train", unit="step")
    for step in range(start, total):
        rows = batch_indices(len(triplets), global_batch, step, tc.seed)
        rows = rows[acc.process_index * tc.batch_size : (acc.process_index + 1) * tc.batch_size]
        ids = [token_ids[triplets[i][c]] for c in range(columns) for i in rows]
        with torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=tc.bf16):
            if tc.grad_cache:
                loss = cached_backward(embedder, ids, tc.chunk_tokens, loss_of, lambda: acc.no_sync(model))
            else:
                loss = loss_of(embedder.forward_ids(ids, tc.chunk_tokens))
                acc.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        pending.append(loss.detach())
        done = step + 1
        if bar is not None:
            bar.update(1)
        if done % tc.log_every and done % save_every and done != total:
            continue
        # Every log_every steps, before a checkpoint and at the end: read the losses, stop on the first non-finite.
        losses = acc.reduce(torch.stack(pending), reduction="mean").tolist()  # each rank's loss covers its anchors
        bad = next((i for i, v in enumerate(losses) if not np.isfinite(v)), None)
        if bad is not None:
            if bar is not None:
                bar.close()  # now, so that the error is the last line on the terminal
            raise SlmembedError(f"loss is {losses[bad]} at step {done - len(losses) + bad + 1}; the last good "
                                "checkpoint is kept, fix the cause and continue with --resume")
        pending.clear()
        if done % tc.log_every == 0 or done == total:
            elapsed = time.time() - t0
            rate = (done - seen_t0) * global_batch / max(elapsed, 1e-9)
            record = {"step": done, "loss": round(losses[-1], 6), "lr": scheduler.get_last_lr()[0],
                      "triplets_per_s": round(rate, 2), "elapsed_s": round(elapsed, 2)}
            if acc.device.type == "cuda":
                record["peak_gib"] = round(torch.cuda.max_memory_allocated(acc.device) / 2**30, 3)
            if acc.is_main_process:
                with open(log_path, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
                if board is not None:
                    for key in ("loss", "lr", "triplets_per_s"):
                        board.add_scalar(f"train/{key}", record[key], done)
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
        if done % save_every == 0 and done < total:
            if acc.is_main_process:
                save_checkpoint(run_dir, acc.unwrap_model(model), optimizer, scheduler, done, keep)
            acc.wait_for_everyone()
    if bar is not None:
        bar.close()
    if board is not None:
        board.close()

    summary = {"steps": total, "batch_size": global_batch, "triplets": len(triplets),
               "triplets_seen": total * global_batch, "minutes": round((time.time() - t0) / 60, 3),
               "device": models.device_name(acc.device), "world_size": acc.num_processes}
    if acc.is_main_process:
        with atomic_dir(run_dir / "adapter") as tmp:
            acc.unwrap_model(model).save_pretrained(tmp)
        write_json(run_dir / "embed.json", {"model": recipe.model.name, "spec": spec.__dict__})
        write_json(run_dir / "summary.json", summary)
    acc.wait_for_everyone()
    return summary


def _tensorboard(folder: Path, start: int):
    """A TensorBoard writer for the logged scalars when tensorboard is installed, else None; a resumed run drops
    the events past its checkpoint."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(folder), purge_step=start or None, flush_secs=10)
