"""The `math_verify` rule's checker: the `math-verify` package (an optional extra, `pip install 'hf-pipeline[rlvr]'`)
run in a worker process, so that no expression can hang training and any thread may ask.

math-verify bounds its own parsing and comparison with `signal.alarm`, which works only in a main thread, and an
alarm cannot interrupt a computation that stays in C (parsing `\\boxed{9^{9^{9^{9}}}+1}` runs for minutes). So the
package runs in one long-lived worker process (`python -m pipeline.rl.math_check`, in its main thread, with its own
alarms and a memory limit), and the caller waits for each answer with a wall-clock limit: past it, the worker is
killed (and restarted on the next call) and the completion scores 0.

Usage: `matches(gold, completion, timeout=5.0)` -> bool, from any thread (calls are serialised by a lock; the worker
starts on the first call, not at import). `available()` says whether the package is installed; without it
`matches` raises `PipelineError` naming the extra to install.
"""
from __future__ import annotations

import atexit
import importlib.util
import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

from pipeline.errors import PipelineError

MISSING = "the math_verify reward rule needs the math-verify package, which is not installed"
FIX = "pip install 'hf-pipeline[rlvr]' (or: pip install math-verify==0.9.0 -c requirements/cpu.lock)"
STARTUP_TIMEOUT = 120.0  # seconds for the worker to import sympy and math-verify (slow on a busy CPU)
WORKER_MEMORY = 4 << 30  # the worker's address-space limit: a runaway big number fails there, not on the host


def available() -> bool:
    return importlib.util.find_spec("math_verify") is not None


def require() -> None:
    """A one-line error naming the extra to install, unless math-verify is importable."""
    if not available():
        raise PipelineError(MISSING, key="rewards[].type", fix=FIX)


class Worker:
    """One worker process and the lock that serialises its requests (one JSON line each way)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.process: subprocess.Popen | None = None
        self.pending = b""

    def start(self) -> subprocess.Popen:
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen([sys.executable, "-m", "pipeline.rl.math_check"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        self.pending = b""
        if self.read_line(STARTUP_TIMEOUT) != b"ready":
            self.stop()
            raise PipelineError("the math-verify worker did not start (python -m pipeline.rl.math_check)",
                                key="rewards[].type", fix=FIX)
        return self.process

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            for pipe in (self.process.stdin, self.process.stdout):
                pipe.close()
        self.process = None

    def read_line(self, timeout: float) -> bytes | None:
        """One line from the worker, or None when it does not come within `timeout` seconds (or the worker died)."""
        deadline, fd = time.monotonic() + timeout, self.process.stdout.fileno()
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return line

    def ask(self, gold: str, answer: str, timeout: float) -> bool:
        with self.lock:
            process = self.process or self.start()
            # math-verify's own alarms (whole seconds, per step) get the whole budget: this wait bounds the total
            request = {"gold": gold, "answer": answer, "timeout": max(1, int(timeout))}
            try:
                process.stdin.write(json.dumps(request).encode() + b"\n")
                process.stdin.flush()
                line = self.read_line(timeout)
            except OSError:
                line = None
            if line is None:  # too slow, or crashed: a fresh worker next time
                self.stop()
                return False
            return bool(json.loads(line)["match"])


_WORKER: Worker | None = None
_WORKER_LOCK = threading.Lock()


def worker() -> Worker:
    """The process's one worker (created on first use; killed at exit)."""
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            _WORKER = Worker()
            atexit.register(_WORKER.stop)
        return _WORKER


def matches(gold: str, completion: str, timeout: float = 5.0) -> bool:
    """Whether math-verify finds the completion's answer equal to `gold` (LaTeX, \\boxed{}, plain numbers), decided
    within `timeout` seconds of wall-clock time (else False)."""
    require()
    if not str(gold).strip() or not completion.strip():
        return False
    return worker().ask(str(gold), completion, timeout)


# ------------------------------------------------------------------------------------------ the worker process


def parse_gold(gold: str, seconds: int):
    """The reference answer parsed: as written, else as LaTeX between `$` (plain `\\frac{1}{2}` too)."""
    from math_verify import parse

    return parse(gold, parsing_timeout=seconds) or parse(f"${gold}$", parsing_timeout=seconds)


def check(request: dict) -> bool:
    from math_verify import parse, verify

    seconds = int(request["timeout"])
    gold = parse_gold(request["gold"], seconds)
    answer = parse(request["answer"], parsing_timeout=seconds)
    return bool(gold and answer and verify(gold, answer, timeout_seconds=seconds))


def exit_with_parent(parent: int) -> None:
    """Exit when the process that started the worker is gone, even in the middle of a check."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def serve() -> None:
    """The worker's loop: one JSON request per stdin line, one `{"match": bool}` line back; exits on EOF."""
    import logging
    import resource

    exit_with_parent(os.getppid())
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY, WORKER_MEMORY))
    logging.disable(logging.WARNING)  # math-verify logs each timeout; the caller counts them as misses
    from math_verify.errors import TimeoutException  # imported before "ready": the time limits cover checks only

    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        try:
            match = check(json.loads(line))
        except (Exception, TimeoutException):  # MemoryError, math-verify's errors and timeouts: not a match
            match = False
        out.write(json.dumps({"match": match}).encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    serve()
