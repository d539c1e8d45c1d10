"""Atomic artifact writes: a failed write leaves the old file and no temporary, and a SIGKILL mid-write
leaves the old or the new file, valid."""

from __future__ import annotations

import itertools
import os
import random
import select
import shutil
import signal
import stat
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from artifact_kinds import (
    Kind,
    kind_named,
    process_umask,
    reference,
    same,
    temporaries,
    written,
)

from tokenizers_q.files import (
    atomic_write,
)

# -- 5. failed writes leave the old file and no temporary -------------------------------------------------------------


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failing_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, error):
    path = tmp_path / "data.bin"
    path.write_bytes(b"old")
    seen = []

    def write(tmp):
        seen.append(Path(tmp))
        folder = Path(tmp).parent  # a private hidden folder beside the target, holding a file of the same name
        assert folder.parent == tmp_path and folder.name.startswith(".data.") and Path(tmp).name == "data.bin"
        Path(tmp).write_bytes(b"half-writ")
        raise error("stop")

    with pytest.raises(error, match="stop"):
        atomic_write(path, write)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["data.bin"] and not seen[0].exists()
    assert atomic_write(path, lambda tmp: Path(tmp).write_bytes(b"new")) == path
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["data.bin"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~process_umask()
    atomic_write(tmp_path / "sub" / "deeper" / "x.bin", lambda tmp: Path(tmp).write_bytes(b"x"))
    assert (tmp_path / "sub" / "deeper" / "x.bin").read_bytes() == b"x"


@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
def test_a_failing_save_of_every_kind_keeps_the_old_file(kind, tmp_path, monkeypatch, error):
    import safetensors.torch

    path = written(kind, tmp_path)
    before = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise error("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(error, match="disk full"):
        kind.write(path, 1)
    assert path.read_bytes() == before and os.listdir(tmp_path) == [path.name]


# -- 6. SIGKILL at any moment of a write ------------------------------------------------------------------------------

KILLS = 20
KILL_WINDOW_S = 0.3
FORK = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _writer(write: Callable[[Path, int], object], path: Path, ready: int) -> None:
    """In the forked child: write B, A, B, ... to ``path`` until killed; never returns."""
    try:
        torch.set_num_threads(1)  # an OpenMP pool does not survive fork(); only this process is changed
        os.write(ready, b"1")
        for i in itertools.count():
            write(path, 1 - i % 2)
    except BaseException:
        traceback.print_exc(file=sys.stderr)
    finally:
        os._exit(3)


def kill_rounds(kind: Kind, path: Path, rounds: int, seed: int, write=None) -> dict[str, int]:
    """``rounds`` times: A at ``path``; a forked child writing B, A, B... there, SIGKILLed at a random moment;
    then what the kind's loader makes of ``path``: A, B or broken (neither, or refused). Temporaries are removed."""
    write = write or kind.write
    a, b = reference(kind.name, 0), reference(kind.name, 1)
    assert not same(a, b)
    rng = random.Random(seed)
    outcomes = {"A": 0, "B": 0, "broken": 0, "mid-write": 0}
    for _ in range(rounds):
        kind.write(path, 0)
        read, ready = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            _writer(write, path, ready)
        os.close(ready)
        try:
            assert select.select([read], [], [], 30)[0], "the writer never started"
            assert os.read(read, 1) == b"1"
            time.sleep(rng.uniform(0, KILL_WINDOW_S))
            os.kill(pid, signal.SIGKILL)
        finally:
            os.close(read)
            _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"the writer exited: {status}"
        try:
            got = kind.load(path)
        except ValueError:
            got = None
        outcomes["A" if same(got, a) else "B" if same(got, b) else "broken"] += 1
        # a kill mid-write leaves the private ".name.*" folder (with whatever safetensors wrote inside), no other file
        ours = temporaries(path)
        assert sorted(os.listdir(path.parent)) == sorted([path.name, *(p.name for p in ours)])
        outcomes["mid-write"] += bool(ours)
        for tmp in ours:
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    return outcomes


@FORK
def test_a_write_killed_at_any_moment_leaves_a_or_b(kind, tmp_path):
    started, threads = time.perf_counter(), torch.get_num_threads()
    outcomes = kill_rounds(kind, tmp_path / "artifact.safetensors", KILLS, seed=sum(map(ord, kind.name)))
    assert torch.get_num_threads() == threads  # the writers' set_num_threads(1) stayed in the children
    print(f"{kind.name}: {KILLS} kills in {time.perf_counter() - started:.1f} s: {outcomes}")
    assert outcomes["broken"] == 0, f"a killed write left a file that is neither A nor B: {outcomes}"
    assert outcomes["A"] + outcomes["B"] == KILLS and outcomes["B"] > 0  # the writer did write
    # (kills land mid-write, a temporary left behind, in about 25-60% of the rounds)


@FORK
def test_the_kill_test_catches_a_write_that_is_not_atomic(tmp_path):
    """The control: the same harness with a writer that writes the file in place, in two halves."""
    kind = kind_named("token_file")
    data = [written(kind, tmp_path, v, f"{v}.safetensors").read_bytes() for v in (0, 1)]
    for v in (0, 1):
        (tmp_path / f"{v}.safetensors").unlink()

    def in_place(path, v):
        with open(path, "wb") as f:
            f.write(data[v][: len(data[v]) // 2])
            f.flush()
            time.sleep(0.005)
            f.write(data[v][len(data[v]) // 2 :])

    outcomes = kill_rounds(kind, tmp_path / "artifact.safetensors", 10, seed=0, write=in_place)
    print(f"not atomic: {outcomes}")
    assert outcomes["broken"] > 0, outcomes
