"""One run per output folder (pipeline.runlock): a second run into a folder in use is refused with one line and exit
2 having written nothing, `--wait` waits for the holder and then runs, a kill -9'd holder or a stale lock file does
not block the next run, the ranks of one launch share the lock and `validate`/`show` take none. About 90 s on
2 cores:

    pytest tests/test_run_lock.py
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import runlock
from pipeline.__main__ import main
from pipeline.errors import PipelineError
from resilience_common import PYTHON, ROOT, cli, env, popen, tiny_recipe, write_recipe

TORCHRUN = Path(sys.executable).with_name("torchrun")
HOST = socket.gethostname()
# holds the lock of the folder in argv[1] until its stdin closes: a run kept open at no cost
HOLDER = ("import sys\nfrom pipeline import runlock\n"
          "with runlock.hold(sys.argv[1]):\n    print('held', flush=True)\n    sys.stdin.read()\n")


def tokenizer_recipe(tmp: Path) -> Path:
    return write_recipe(tmp, tiny_recipe(tmp, stages=("tokenizer",)), "tok.yaml")


def tree(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """(size, mtime_ns, bytes) of everything under a folder, to prove nothing was written."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in sorted(folder.rglob("*"))} | {".": (0, folder.stat().st_mtime_ns, b"")}


def wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def gate_free(folder: Path) -> bool:
    """Nobody is in the middle of taking or leaving the lock (so a holder can be SIGSTOPped safely)."""
    fd = os.open(folder / runlock.GATE_NAME, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@contextlib.contextmanager
def held_by_helper(folder: Path):
    """A helper process holding `folder`'s lock until the block ends."""
    proc = subprocess.Popen([PYTHON, "-c", HOLDER, str(folder)], cwd=ROOT, env=env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


# ------------------------------------------------------------------------------------ two real runs, one folder


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A real `pipeline run` (tokenizer -> tiny pretrain) that took the lock and was then frozen with SIGSTOP, so
    the folder stays as it left it while another run tries it."""
    tmp = tmp_path_factory.mktemp("lock")
    recipe = write_recipe(tmp, tiny_recipe(tmp, stages=("tokenizer", "base")))
    out = tmp / "out"
    holder = popen("run", str(recipe), log=tmp / "holder.log")

    def holds() -> bool:
        assert holder.poll() is None, (tmp / "holder.log").read_text()
        found = runlock.read_holder(out / runlock.LOCK_NAME)
        return bool(found) and found["pid"] == holder.pid and gate_free(out)

    wait_for(holds, "the first run to take the lock")
    os.kill(holder.pid, signal.SIGSTOP)
    yield holder, recipe, out
    if holder.poll() is None:
        holder.kill()
    holder.wait(timeout=60)


def test_second_run_into_a_folder_in_use_is_refused_with_one_line_and_writes_nothing(stopped_run):
    holder, recipe, out = stopped_run
    before = tree(out)
    second = cli("run", str(recipe), timeout=180)
    assert second.returncode == 2, second.stdout + second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    line = lines[0]
    assert line.startswith(f"error: {out}: another run is using this output folder: pid {holder.pid} on host {HOST}")
    assert " since " in line and "--wait" in line
    assert second.stdout == ""
    assert tree(out) == before  # no folder, no manifest, no log, not even the lock file touched


def test_run_after_the_holder_was_killed_proceeds(stopped_run):
    holder, recipe, out = stopped_run
    holder.send_signal(signal.SIGKILL)  # kill -9: the kernel drops its lock; the file still names it
    holder.wait(timeout=60)
    assert runlock.read_holder(out / runlock.LOCK_NAME)["pid"] == holder.pid
    rerun = cli("run", str(recipe), timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "note:" not in rerun.stderr  # a dead pid on this host is the ordinary stale lock: taken silently
    assert json.loads((out / "base" / "manifest.json").read_text())["complete"]
    assert runlock.read_holder(out / runlock.LOCK_NAME) is None  # released on exit


# ---------------------------------------------------------------------------------------------------- --wait


def test_wait_waits_for_the_holder_then_runs(tmp_path):
    recipe, out, log = tokenizer_recipe(tmp_path), tmp_path / "out", tmp_path / "waiter.log"
    with held_by_helper(out) as helper:
        waiter = popen("run", str(recipe), "--wait", log=log)
        wait_for(lambda: "waiting:" in log.read_text() or waiter.poll() is not None, "the waiting line")
        time.sleep(1.0)
        assert waiter.poll() is None, log.read_text()
        assert not (out / "tokenizer").exists()
    assert waiter.wait(timeout=180) == 0, log.read_text()
    waiting = [line for line in log.read_text().splitlines() if line.startswith("waiting:")]
    assert len(waiting) == 1 and f"pid {helper.pid} on host {HOST}" in waiting[0] and str(out) in waiting[0]
    assert json.loads((out / "tokenizer" / "manifest.json").read_text())["complete"]


# --------------------------------------------------------------------------------------------------- stale locks


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_stale_lock_file_from_a_dead_pid_on_this_host_is_taken_over(tmp_path, capsys):
    recipe, out = tokenizer_recipe(tmp_path), tmp_path / "out"
    out.mkdir()
    pid = _dead_pid()
    (out / runlock.LOCK_NAME).write_text(json.dumps({"pid": pid, "host": HOST, "since": "2020-01-01T00:00:00+00:00",
                                                      "launch": f"process:{HOST}:{pid}"}))
    assert main(["run", str(recipe)]) == 0
    assert "note:" not in capsys.readouterr().err
    assert (out / "tokenizer" / "manifest.json").exists()
    assert runlock.read_holder(out / runlock.LOCK_NAME) is None


def test_lock_file_naming_another_host_is_taken_over_with_a_note(tmp_path):
    """Nothing holds the kernel lock, so its holder is gone; one line says whose lock it was, since that host's
    processes cannot be checked from here."""
    (tmp_path / runlock.LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "x",
                                                           "launch": "process:elsewhere:1"}))
    said: list[str] = []
    with runlock.hold(tmp_path, say=said.append):
        assert runlock.read_holder(tmp_path / runlock.LOCK_NAME)["pid"] == os.getpid()
    assert len(said) == 1 and said[0].startswith("note:") and "pid 1 on host elsewhere" in said[0]


def test_refused_run_raises_a_pipeline_error_with_exit_code_2(tmp_path):
    with runlock.hold(tmp_path, me=runlock.holder_info({})):
        other = {**runlock.holder_info({}), "launch": "process:elsewhere:7"}
        with pytest.raises(PipelineError) as info:
            with runlock.hold(tmp_path, me=other):
                pytest.fail("entered a folder in use")
    assert info.value.exit_code == 2 and info.value.file == str(tmp_path)
    assert f"pid {os.getpid()} on host {HOST} since" in info.value.render()


# ------------------------------------------------------------------------------------------------ one launch, N ranks


def _rank(run_id: str, rank: int) -> dict:
    return runlock.holder_info({"TORCHELASTIC_RUN_ID": run_id, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
                                "RANK": str(rank), "WORLD_SIZE": "2"})


def test_ranks_of_one_launch_share_the_lock_and_another_launch_is_refused(tmp_path):
    """Each hold() opens the files afresh, so two holds in one process lock like two processes do."""
    rank0, rank1, other = _rank("a", 0), _rank("a", 1), _rank("b", 0)
    first, second = runlock.hold(tmp_path, me=rank0), runlock.hold(tmp_path, me=rank1)
    first.__enter__()
    second.__enter__()  # joins
    with pytest.raises(PipelineError, match="another run is using this output folder"):
        with runlock.hold(tmp_path, me=other):
            pass
    first.__exit__(None, None, None)  # rank 0 done, rank 1 still running: still held, still described
    assert runlock.read_holder(tmp_path / runlock.LOCK_NAME)["launch"] == rank0["launch"]
    with pytest.raises(PipelineError):
        with runlock.hold(tmp_path, me=other):
            pass
    second.__exit__(None, None, None)  # the last one out empties the file
    assert runlock.read_holder(tmp_path / runlock.LOCK_NAME) is None
    with runlock.hold(tmp_path, me=other):
        assert runlock.read_holder(tmp_path / runlock.LOCK_NAME)["launch"] == other["launch"]


def test_launch_identity():
    ident = runlock.launch_identity
    assert ident({}, host="h", pid=1) != ident({}, host="h", pid=2)  # plain runs: one process each
    local = {"TORCHELASTIC_RUN_ID": "none", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert ident(local, host="h", pid=1, ppid=9) == ident(local, host="h", pid=2, ppid=9)  # workers of one agent
    assert ident(local, host="h", ppid=9) != ident(local, host="h", ppid=10)  # two single-host launches
    assert ident(local, host="h", ppid=9) != ident(local, host="g", ppid=9)  # same agent pid on two hosts
    nodes = {"TORCHELASTIC_RUN_ID": "job7", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    assert ident(nodes, host="node0", ppid=5) == ident(nodes, host="node1", ppid=8)  # one multi-node launch
    assert ident(nodes, host="node0") != ident({**nodes, "TORCHELASTIC_RUN_ID": "job8"}, host="node0")
    other = {"WORLD_SIZE": "2", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}  # e.g. the deepspeed launcher
    assert ident(other, host="node0", pid=1) == ident(other, host="node1", pid=2)


@pytest.mark.distributed
def test_two_process_launch_shares_the_lock_and_a_second_launch_is_refused(tmp_path):
    """Real torchrun launches (2 CPU processes, gloo) of a tokenizer-only recipe."""
    recipe, out = tokenizer_recipe(tmp_path), tmp_path / "out"
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "pipeline", "run", str(recipe)]
    with held_by_helper(out):
        refused = subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=180)
        assert refused.returncode != 0 and "another run is using this output folder" in refused.stderr
        assert not (out / "tokenizer").exists()
    launch = subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=180)
    assert launch.returncode == 0, launch.stdout[-3000:] + launch.stderr[-3000:]
    assert "another run" not in launch.stderr and "note:" not in launch.stderr
    assert json.loads((out / "tokenizer" / "manifest.json").read_text())["world_size"] == 2
    assert runlock.read_holder(out / runlock.LOCK_NAME) is None


def test_validate_and_show_take_no_lock(tmp_path, capsys):
    recipe, out = tokenizer_recipe(tmp_path), tmp_path / "out"
    assert main(["validate", str(recipe)]) == 0 and main(["show", str(recipe)]) == 0
    assert not out.exists()
    with held_by_helper(out):
        before = tree(out)
        assert main(["validate", str(recipe)]) == 0 and main(["show", str(recipe)]) == 0
        assert tree(out) == before
