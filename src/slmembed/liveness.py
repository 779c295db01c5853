"""A lost machine stops the run's other processes within a minute, instead of leaving them waiting.

Under torchrun, a process whose machine is lost (killed, powered off, frozen, cut off) leaves the others blocked in
their next collective until the process group's timeout: nothing tells them sooner when the peers share a host over
NVLink (NCCL then waits 10 minutes by default), or when the peer's connection stays open (gloo waits 30). torchrun's
agents do not notice either: their rendezvous reacts to machines that join, not to machines that go. So each training
process of several starts a watcher, a small child process that every ``LOST_AFTER_S / 10`` seconds bumps this
process's counter in the run's store (the TCPStore torchrun serves at MASTER_ADDR:MASTER_PORT) and reads the others'.
A process whose counter has not moved for ``LOST_AFTER_S`` (timed on the watcher's own clock: machines' clocks need
not agree; twice as long before its first beat), and which did not say it finished, is lost: the watcher prints one
line naming it and ends its own training process (SIGTERM, then SIGKILL); that process's launcher then stops the rest
of its machine, and the run continues from its newest checkpoint with ``--resume``. A store that stops answering
for as long counts the same.

The watcher is a process, not a thread, so that a training process holding the GIL for a while (writing a large
checkpoint) still beats. It costs about 220 MiB and 1.5 s of CPU to start (torch's store client), nothing after. It
ends with its training process; stopped by it (``Watcher.stop``, SIGUSR1) it first says the process finished, so the
others do not wait for its beats. Any other end (the process killed, or its launcher stopping it, or training failing:
``Watcher.abandon``) says nothing, so that the others stop too.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from slmembed.errors import SlmembedError

LOST_AFTER_S = 60.0  # silence that means a process is lost; the environment's SLMEMBED_LOST_AFTER_S overrides it


def lost_after() -> float:
    """The silence allowed, in seconds: SLMEMBED_LOST_AFTER_S if set, else ``LOST_AFTER_S``."""
    value = os.environ.get("SLMEMBED_LOST_AFTER_S") or str(LOST_AFTER_S)
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not (math.isfinite(seconds) and seconds > 0):
        raise SlmembedError(f"SLMEMBED_LOST_AFTER_S: expected seconds above 0 (e.g. 60), got {value!r}")
    return seconds


class Watcher:
    """This training process's watcher (``start``); ``stop`` when training ends."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc

    def stop(self) -> None:
        """End the watcher, which first marks this process finished, so the others stop waiting for its beats."""
        self.proc.send_signal(signal.SIGUSR1)
        try:  # a watcher still starting (importing torch to reach the store) on a busy machine takes tens of seconds
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def abandon(self) -> None:
        """End the watcher without a word, as when this process dies: training failed, so the others stop too."""
        self.proc.kill()
        self.proc.wait()


@contextmanager
def watching(rank: int, world: int) -> Iterator[Watcher | None]:
    """The watcher of process ``rank`` of ``world`` (``start``) while training runs: stopped when it ends, abandoned
    when it fails."""
    watcher = start(rank, world)
    try:
        yield watcher
    except BaseException:
        if watcher is not None:
            watcher.abandon()
        raise
    if watcher is not None:
        watcher.stop()


def start(rank: int, world: int) -> Watcher | None:
    """Start the watcher of process ``rank`` of ``world`` under torchrun; None for one process, or without torchrun's
    store (a process group initialised some other way)."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if world < 2 or not host or not port or os.name != "posix":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun's restarts share the store
    command = [sys.executable, "-m", "slmembed.liveness", host, port, str(rank), str(world), str(os.getpid()),
               attempt, str(lost_after())]
    return Watcher(subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL))


def _end(parent: int) -> None:
    """Stop the training process: SIGTERM (its default action ends a process blocked in a collective), SIGKILL after
    10 s if it is still there."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(parent, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and os.getppid() == parent:
            time.sleep(0.1)
        if os.getppid() != parent:
            return


class _Finished(BaseException):
    """SIGUSR1 from ``Watcher.stop``: training ended (raised from the handler, so that a sleep ends at once; not an
    ``Exception``, so the store's error handling lets it through)."""


def _finish(*_) -> None:
    raise _Finished


def _connect(host: str, port: int, silence: float):
    from torch.distributed import TCPStore  # here: the training process, which imports this module, needs none

    return TCPStore(host, port, is_master=False, timeout=timedelta(seconds=silence), wait_for_workers=False)


def watch(host: str, port: int, rank: int, world: int, parent: int, attempt: str, silence: float) -> None:
    """The watcher's loop (in its own process, the child of training process ``parent``)."""
    beat, done = f"slmembed/{attempt}/beat/{{}}", f"slmembed/{attempt}/done/{{}}"
    store = None
    try:
        try:
            store = _connect(host, port, silence)
        except Exception:
            return  # no store to watch through: training goes on as it would without a watcher
        peers = [r for r in range(world) if r != rank]
        seen = {r: (-1, time.monotonic()) for r in peers}  # last counter read, and when it last moved
        answered = time.monotonic()
        while os.getppid() == parent:
            now = time.monotonic()
            try:
                store.add(beat.format(rank), 1)
                for r in peers:
                    count = store.add(beat.format(r), 0)  # reads without blocking; a missing key reads 0
                    if count != seen[r][0] or store.add(done.format(r), 0):
                        seen[r] = (count, now)
                answered = now
            except Exception as exc:  # the store's host lost, or the network: lost too once silent for long enough
                if now - answered > silence:
                    print(f"slmembed train: process {rank}: the run's store at {host}:{port} has not answered for "
                          f"{silence:.0f} s ({exc}): stopping; continue with --resume", file=sys.stderr, flush=True)
                    return _end(parent)
            # a peer not heard from yet may still be starting its watcher: it gets twice as long
            lost = [r for r in peers if now - seen[r][1] > (silence if seen[r][0] > 0 else 2 * silence)]
            if lost:
                print(f"slmembed train: process {lost[0]} of {world} has not been heard from for "
                      f"{now - seen[lost[0]][1]:.0f} s (its machine lost?): stopping process {rank}; the checkpoints "
                      "are kept, continue with --resume", file=sys.stderr, flush=True)
                return _end(parent)
            time.sleep(silence / 10)
    except _Finished:  # training ended: say so (connecting first if it ended before the watcher had)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        with contextlib.suppress(Exception):  # the others end by themselves, once they no longer hear from this one
            (store or _connect(host, port, silence)).add(done.format(rank), 1)


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, _finish)  # first: a training process may stop its watcher while torch imports
    host, port, rank, world, parent, attempt, silence = sys.argv[1:8]
    watch(host, int(port), int(rank), int(world), int(parent), attempt, float(silence))
