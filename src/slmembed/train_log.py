"""What a training run says while it runs: the progress bar, the run's log (``RunDir.log``) and TensorBoard.

The steps' losses stay on the device until they are read (``read``), every ``log_every`` steps and before a
checkpoint or a dev score: reading one makes the host wait for the GPU. A read loss is the mean over the processes,
and the first non-finite one stops the run with one line naming its step. The main process alone writes; a resumed
run's log and TensorBoard events are cut back to the step it continues from.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from slmembed.atomic import disk_errors, write_text
from slmembed.errors import SlmembedError


class TrainLog:
    """The log of a run of ``total`` steps, continued from ``start``, at ``global_batch`` triplets a step: use as a
    context manager (or ``close``) so that the bar and TensorBoard's writer are closed whatever happens."""

    def __init__(self, path: Path, board: Path, *, acc: Accelerator, scheduler, start: int, total: int,
                 log_every: int, global_batch: int, progress: bool) -> None:
        self.path, self.acc, self.scheduler = path, acc, scheduler
        self.total, self.log_every, self.global_batch = total, log_every, global_batch
        self.pending: list[torch.Tensor] = []  # losses not yet read on the host: reading one waits for the GPU
        self.main = acc.is_main_process
        if self.main:
            _trim_log(path, start)
        self.board = _tensorboard(board, start) if self.main else None
        self.t0, self.seen_t0 = time.time(), start
        self.bar = None
        if progress and self.main:
            from tqdm.auto import tqdm  # here, for start-up speed: only a run with a bar needs it

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step")

    def __enter__(self) -> TrainLog:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def close(self) -> None:
        """Close the bar (before an error is printed, so that it is the last line on the terminal) and TensorBoard's
        writer; closing again does nothing."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.board is not None:
            self.board.close()
            self.board = None

    def step(self, loss: torch.Tensor) -> None:
        """A step's loss, kept on the device until read; the bar moves on."""
        self.pending.append(loss)
        if self.bar is not None:
            self.bar.update(1)

    def due(self, done: int) -> bool:
        """Whether a record is due after ``done`` steps: every ``log_every`` steps and at the end."""
        return done % self.log_every == 0 or done == self.total

    def read(self, done: int) -> dict | None:
        """Read the pending losses, stop on the first non-finite one; the record of step ``done`` if one is due."""
        losses = self.acc.reduce(torch.stack(self.pending), reduction="mean").tolist()  # each covers its anchors
        bad = next((i for i, v in enumerate(losses) if not np.isfinite(v)), None)
        if bad is not None:
            raise SlmembedError(f"loss is {losses[bad]} at step {done - len(losses) + bad + 1}; the last good "
                                "checkpoint is kept, fix the cause and continue with --resume")
        self.pending.clear()
        if not self.due(done):
            return None
        elapsed = self.elapsed()
        rate = (done - self.seen_t0) * self.global_batch / max(elapsed, 1e-9)
        record = {"step": done, "loss": round(losses[-1], 6), "lr": self.scheduler.get_last_lr()[0],
                  "triplets_per_s": round(rate, 2), "elapsed_s": round(elapsed, 2)}
        if self.acc.device.type == "cuda":
            record["peak_gib"] = round(torch.cuda.max_memory_allocated(self.acc.device) / 2**30, 3)
        return record

    def elapsed(self) -> float:
        """Seconds since the log opened."""
        return time.time() - self.t0

    def write(self, done: int, record: dict | None, stsb_dev: float | None = None) -> None:
        """Step ``done``'s ``record`` (``read``'s) with its STSBenchmark dev score if it has one: one log
        line, its scalars in TensorBoard, the loss on the progress bar (the main process)."""
        if stsb_dev is not None:
            record = (record or {"step": done}) | {"stsb_dev": stsb_dev}
        if record is None or not self.main:
            return
        with disk_errors(self.path), open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.board is not None:
            for key in ("loss", "lr", "triplets_per_s", "stsb_dev"):
                if key in record:
                    self.board.add_scalar(f"train/{key}" if key != "stsb_dev" else "dev/stsb", record[key],
                                          record["step"])
        if self.bar is not None and "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}")


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


def _tensorboard(folder: Path, start: int):
    """A TensorBoard writer for the logged scalars when tensorboard is installed, else None; a resumed run drops
    the events past its checkpoint."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(folder), purge_step=start or None, flush_secs=10)
