"""liveness.py: two stand-in training processes, each with its watcher, over a TCPStore served here. One that stops
its watcher when done is not taken for lost, however long the other goes on; one that ends without it (a crash, a
machine lost) stops the other within the silence allowed, with one line naming it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from torch.distributed import TCPStore

from slmembed import liveness
from slmembed.errors import SlmembedError

SILENCE = 3.0
# A training process: starts its watcher, lives for argv[2] seconds, then stops it (argv[3] == "stop") or not.
PROCESS = """
import sys, time
from slmembed import liveness
from slmembed.errors import SlmembedError
watcher = liveness.start(int(sys.argv[1]), 2)
time.sleep(float(sys.argv[2]))
if sys.argv[3] == "stop":
    watcher.stop()
"""


def _pair(tmp_path, first: tuple[float, str], second: tuple[float, str]) -> tuple[TCPStore, list[subprocess.Popen]]:
    """The store (keep it: it serves while referenced) and the two processes, each given (lifetime, stop or not)."""
    store = TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=30), wait_for_workers=False)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
           "SLMEMBED_LOST_AFTER_S": str(SILENCE)}
    procs = []
    for rank, (life, how) in enumerate((first, second)):
        with open(tmp_path / f"rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-c", PROCESS, str(rank), str(life), how], env=env,
                                          stderr=log))
    return store, procs


def test_a_finished_process_is_not_taken_for_lost(tmp_path) -> None:
    # rank 1 stops after 4 s; rank 0 goes on for 3 silences more and ends normally
    _store, procs = _pair(tmp_path, (4 + 3 * SILENCE, "stop"), (4, "stop"))
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    assert "slmembed train:" not in (tmp_path / "rank0.log").read_text()


def test_a_process_gone_without_a_word_stops_the_others(tmp_path) -> None:
    _store, procs = _pair(tmp_path, (60, "stop"), (10, "crash"))
    assert procs[1].wait(timeout=30) == 0
    t = time.monotonic()
    assert procs[0].wait(timeout=30) == -15  # SIGTERM from its watcher
    assert time.monotonic() - t < SILENCE * 3
    said = (tmp_path / "rank0.log").read_text().strip().splitlines()
    assert len(said) == 1 and re.fullmatch(r"slmembed train: process 1 of 2 has not been heard from for [34] s \(its "
                                           r"machine lost\?\): stopping process 0; the checkpoints are kept, continue "
                                           r"with --resume", said[0]), said


@pytest.mark.parametrize("env", [{}, {"MASTER_ADDR": "127.0.0.1"}])
def test_no_watcher_without_torchrun_or_for_one_process(monkeypatch, env) -> None:
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert liveness.start(0, 2) is None
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert liveness.start(0, 1) is None


@pytest.mark.parametrize("value", ["abc", "0", "-5", "inf", "nan"])
def test_a_bad_silence_is_refused_in_one_line(monkeypatch, value) -> None:
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("SLMEMBED_LOST_AFTER_S", value)
    with pytest.raises(SlmembedError, match=re.escape(f"expected seconds above 0 (e.g. 60), got '{value}'")):
        liveness.start(0, 2)
