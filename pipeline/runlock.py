"""One run per output folder: `python -m pipeline run` holds a lock on OUTPUT/.run.lock from before it writes
anything until it exits.

A second run into the same folder is refused before it writes anything (exit 2, one line naming the holder: pid,
host, since when, and the folder), or with `run --wait` waits for the holder to finish. The ranks of one
`accelerate launch` / torchrun launch share the lock; another launch is refused like any other run. `validate` and
`show` take no lock.

How: every process of the holding launch keeps a shared `flock` on OUTPUT/.run.lock, whose text names that launch
(pid, host, start time and `launch_identity`). Taking, joining and leaving happen under a short exclusive `flock` on
OUTPUT/.run.lock.gate, so "is it held, and by my launch?" and the step that follows are one atomic step. The kernel
drops a process's locks when it exits however it exits (kill -9 included), so a file that still names a holder
nobody holds is stale, and is taken over (with a note unless it names a dead pid on this host, the usual crash);
on NFS and other shared filesystems the lock reaches across hosts. The last process to leave empties the file.

Used by `pipeline.commands.run`; nothing runs at import.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.errors import PipelineError

LOCK_NAME = ".run.lock"  # holds the holder's description; the holders keep a shared flock on it
GATE_NAME = ".run.lock.gate"  # held exclusively for the instant a process checks and takes, joins or leaves
POLL_S = 0.5  # how often `--wait` looks again
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}  # a filesystem without flock
LOOPBACK = ("127.", "localhost", "::1", "0.0.0.0")


def launch_identity(environ: dict[str, str] | None = None, host: str | None = None,
                    pid: int | None = None, ppid: int | None = None) -> str:
    """A string the processes of one launch share and no other launch running at the same time has.

    Under torchrun / `accelerate launch` (TORCHELASTIC_RUN_ID set), the workers on one host are children of the same
    agent, so with a loopback (single-host) master the host and the agent's pid tell launches apart; a multi-host
    launch is its master address, port and run id, which every node shares and two live launches cannot. Other
    launchers that set WORLD_SIZE > 1 and MASTER_PORT: the master address and port. Otherwise: this process."""
    env = os.environ if environ is None else environ
    host = host or socket.gethostname()
    master, port = env.get("MASTER_ADDR", ""), env.get("MASTER_PORT", "")
    local_master = not master or master.startswith(LOOPBACK)
    if "TORCHELASTIC_RUN_ID" in env:
        run_id = env["TORCHELASTIC_RUN_ID"]
        if local_master:
            return f"torchrun:{host}:agent-{ppid or os.getppid()}:{run_id}"
        return f"torchrun:{master}:{port}:{run_id}"
    if port and int(env.get("WORLD_SIZE", "1") or 1) > 1:
        return f"dist:{host + '/' if local_master else ''}{master}:{port}"
    return f"process:{host}:{pid or os.getpid()}"


def holder_info(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """What this process writes into the lock file: pid, host, since when, and its launch."""
    env = os.environ if environ is None else environ
    info: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname(),
                            "since": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                            "launch": launch_identity(env)}
    if "TORCHELASTIC_RUN_ID" in env:
        info["launcher_pid"] = os.getppid()
    return info


def describe(holder: dict[str, Any]) -> str:
    """'pid 123 (launched by pid 120) on host h since 2025-01-01T10:00:00+00:00' (what is known of it)."""
    if not holder:
        return "a run whose description could not be read"
    launcher = f" (launched by pid {holder['launcher_pid']})" if holder.get("launcher_pid") else ""
    return f"pid {holder.get('pid', '?')}{launcher} on host {holder.get('host', '?')} since {holder.get('since', '?')}"


def busy_error(output_dir: Path, holder: dict[str, Any]) -> PipelineError:
    """The one line a refused run prints (exit 2)."""
    return PipelineError(f"another run is using this output folder: {describe(holder)}", file=str(output_dir),
                         fix="wait for it to finish, or rerun with --wait to start when it does")


def read_holder(path: Path) -> dict[str, Any] | None:
    """The holder described in a lock file; None when there is none (empty, missing or unreadable file). The file is
    opened afresh so that a shared filesystem shows what another host wrote."""
    try:
        found = json.loads(Path(path).read_text() or "null")
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def pid_alive(pid: Any) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, TypeError, ProcessLookupError):
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_note(output_dir: Path, previous: dict[str, Any] | None, me: dict[str, Any]) -> str | None:
    """A line when the lock taken over named a holder that may not be gone: on another host (whose processes cannot
    be checked from here) or a live pid on this one (reused, or a filesystem whose locks do not reach it). None for
    the usual stale lock: a dead pid on this host, or this launch."""
    if not previous or previous.get("launch") == me["launch"]:
        return None
    if previous.get("host") == me["host"] and (previous.get("pid") == me["pid"] or not pid_alive(previous.get("pid"))):
        return None
    return (f"note: {output_dir / LOCK_NAME} named {describe(previous)}, but nothing holds its lock: taking over "
            "(if that run is still going, stop this one: its filesystem's locks do not reach here)")


@contextlib.contextmanager
def hold(output_dir: str | Path, *, wait: bool = False, me: dict[str, Any] | None = None, poll_s: float = POLL_S,
         say: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the output folder's lock for the duration of the block, creating the folder if it is missing (a folder
    that does not exist yet is held by nobody). Held by another launch: raise `busy_error`, having written nothing,
    or with `wait` say one line and look again every `poll_s` seconds. `me`: this process (`holder_info()`);
    `say`: where the waiting line and notes go (stderr, first rank only)."""
    output_dir = Path(output_dir)
    me = me or holder_info()
    say = say or _say_on_first_rank
    output_dir.mkdir(parents=True, exist_ok=True)
    gate = os.open(output_dir / GATE_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    lock = None
    try:
        lock = os.open(output_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        if not _locks_work(gate):
            say(f"warning: {output_dir}: this filesystem has no file locks; another run into this folder at the same "
                "time would not be detected")
            yield
            return
        waited = False
        while (holder := _take(gate, lock, output_dir, me, say)) is not None:
            if not wait:
                raise busy_error(output_dir, holder)
            if not waited:
                say(f"waiting: {output_dir} is in use by {describe(holder)}; this run starts when it finishes")
                waited = True
            time.sleep(poll_s)
        try:
            yield
        finally:
            _leave(gate, lock)
    finally:
        for fd in (lock, gate):
            if fd is not None:
                os.close(fd)  # drops this process's locks


def _take(gate: int, lock: int, output_dir: Path, me: dict[str, Any], say) -> dict[str, Any] | None:
    """Under the gate: take the lock (nobody holds it), join it (this launch holds it), or return its holder."""
    with _gate(gate):
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held (shared) by the processes of some launch
            holder = read_holder(output_dir / LOCK_NAME)
            if holder is None or holder.get("launch") != me["launch"]:
                return holder or {}
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)  # another rank of this launch: share it
            return None
        note = stale_note(output_dir, read_holder(output_dir / LOCK_NAME), me)
        if note:
            say(note)
        _write(lock, me)
        fcntl.flock(lock, fcntl.LOCK_SH)  # down to shared, so the other ranks of this launch can join
        return None


def _leave(gate: int, lock: int) -> None:
    """Under the gate: the last process of the launch to leave empties the file (closing the fd drops the lock)."""
    with _gate(gate):
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # other ranks of this launch still hold it
            return
        os.ftruncate(lock, 0)


def _write(fd: int, info: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    os.fsync(fd)  # visible to other hosts of a shared filesystem before the gate opens


@contextlib.contextmanager
def _gate(fd: int) -> Iterator[None]:
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _locks_work(fd: int) -> bool:
    """False on a filesystem that refuses flock (some FUSE and NFS mounts without a lock daemon)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:  # someone is at the gate: locks work
        return True
    except OSError as exc:
        if exc.errno in NO_LOCKS:
            return False
        raise
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


def _say_on_first_rank(line: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)
