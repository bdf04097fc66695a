"""Run untrusted Python (a completion's code, then a row's test asserts) in a child process with limits, for the
`code_tests` rule reward (`pipeline.rl.rewards`).

Usage: `run_tests(code, tests, timeout=5.0, memory_mb=512)` -> `Outcome`; `.passed` is True only when the tests ran to
their end without an exception, inside every limit. Safe to call from several threads at once. Linux only.
`isolation()` names the strongest layer this machine gives (probed once, on first use; nothing runs at import).

What is contained, layer by layer (each run gets every layer the machine allows; `kernel=False` / `audit=False`
switch one off, for tests of the other):

1. Always. A fresh scratch folder (mode 0700) is the working directory, HOME and TMPDIR, and is deleted afterwards.
   The child is `python -I -S -B` (isolated: no site-packages, no PYTHON* variables, no user site, no .pyc writes)
   with a minimal environment (PATH, HOME, TMPDIR, LANG: none of the caller's variables, tokens or keys), in a new
   session; on the wall-clock `timeout` the whole process group is SIGKILLed, and it is SIGKILLed after every run
   anyway (until none of it is left), so nothing it forked in its group outlives the call. rlimits: address space
   (`memory_mb`), CPU seconds (timeout + 1, then SIGKILL), 8 MiB files, no core dumps and, where the kernel applies it
   (any uid but root), RLIMIT_NPROC: at most `max_processes` more processes than the uid already runs. Its output
   goes to an unlinked temporary file, not to memory. The harness exits when the caller's end of its stdin closes,
   so a killed trainer does not leave it running (unless the code closes that descriptor; with the kernel layer,
   everything it forked goes with it).
   Audit hook (PEP 578, `audit=True`): refuses creating sockets, starting programs (exec*, posix_spawn, system,
   subprocess, `_posixsubprocess`), loading native code (ctypes), signalling processes, `gc.get_*`, opening files
   for writing and removing/renaming/chmod-ing paths outside the scratch folder, and `os.fork` where RLIMIT_NPROC
   does not apply (root without the uid drop).
2. Kernel (`unshare --net --pid --fork --kill-child`, as root or with unprivileged user namespaces): a network
   namespace with only a down loopback (no network at all, 127.0.0.1 included) and a PID namespace whose init is the
   harness: when it exits or is killed, the kernel kills every process left in it, even ones that left the group.
3. Uid drop (root with `setpriv`): the code runs as `nobody` (65534) with no groups and one capability,
   CAP_DAC_READ_SEARCH (so it can read the interpreter wherever it is installed): the kernel refuses writing,
   deleting or chmod-ing anything `nobody` does not own (the scratch folder is chowned to it), signalling other
   users' processes, and applies RLIMIT_NPROC.

What is NOT contained: reading files (the code can read whatever the uid can, and with the uid drop anything: the
capability is read and search); writes to world-writable places (/tmp, /dev/shm) by `nobody`; devices (/dev is the
host's; the interpreter has no site-packages, so no CUDA library is importable). Without the kernel layers: file
writes through a descriptor of another folder (`os.open(name, flags, dir_fd=fd)`), code that defeats the audit hook
from inside the interpreter (it is a Python-level guard, not a security boundary), and a forked process that leaves
the session (`os.setsid`) and so survives the group kill. Always: the host's CPU and memory bandwidth during the
time limit; a completion that games weak tests (an object whose `__eq__` is always True) or finds the harness's pass
token by introspecting its frames. Use it to score a policy's code, not to run code from people who attack you.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HARNESS = Path(__file__).with_name("sandbox_harness.py")
NOBODY = 65534
OUTPUT_LIMIT = 16_384  # characters of the child's output kept in the Outcome


@dataclasses.dataclass(frozen=True)
class Outcome:
    passed: bool  # every test ran to its end inside the limits
    returncode: int | None
    timed_out: bool
    output: str  # the end of the child's stdout and stderr
    isolation: str  # "uid", "kernel" or "process": the layers this run had (see the module docstring)
    scratch: str  # the scratch folder it ran in (deleted by now)


def _runs(prefix: tuple[str, ...]) -> bool:
    try:
        done = subprocess.run([*prefix, sys.executable, "-I", "-S", "-c", "pass"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@functools.lru_cache(maxsize=None)
def kernel_prefix() -> tuple[tuple[str, ...], bool] | None:
    """(the command prefix that puts the child in its namespaces, whether it also drops to `nobody`), or None
    where this machine cannot make the namespaces."""
    unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")
    if unshare is None or not sys.platform.startswith("linux"):
        return None
    namespaces = (unshare, "--net", "--pid", "--fork", "--kill-child")
    candidates = []
    if os.geteuid() == 0:
        if setpriv is not None:
            candidates.append((namespaces + (setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                                             "--inh-caps=-all,+dac_read_search",
                                             "--ambient-caps=+dac_read_search", "--"), True))
        candidates.append((namespaces, False))
    else:
        candidates.append(((unshare, "--map-root-user") + namespaces[1:], False))
    return next((c for c in candidates if _runs(c[0])), None)


def isolation() -> str:
    """The strongest layer a run gets here: "uid", "kernel" or "process"."""
    found = kernel_prefix()
    return "process" if found is None else ("uid" if found[1] else "kernel")


def _layers(kernel: bool | None) -> tuple[tuple[str, ...], bool, str]:
    """(command prefix, whether it drops to `nobody`, isolation name) for `kernel` (None: when available)."""
    found = kernel_prefix() if kernel is not False else None
    if kernel is True and found is None:
        raise RuntimeError("the sandbox's kernel layer (unshare) is not available on this machine")
    if found is None:
        return (), False, "process"
    return found[0], found[1], "uid" if found[1] else "kernel"


def _command(prefix: tuple[str, ...], drops: bool, scratch: str, audit: bool, timeout: float, memory_mb: int,
             max_processes: int) -> list[str]:
    nproc = drops or os.geteuid() != 0  # the kernel does not apply RLIMIT_NPROC to root
    limits = [str(memory_mb << 20), str(int(timeout) + 1), str(max_processes), str(int(audit)), str(int(nproc))]
    return [*prefix, sys.executable, "-I", "-S", "-B", str(HARNESS), scratch, *limits]


def _scratch(code: str, tests: str, owner: int | None) -> str:
    folder = tempfile.mkdtemp(prefix="pipeline-sandbox-")
    for name, text in (("solution.py", code), ("tests.py", tests)):
        Path(folder, name).write_text(text)
    if owner is not None:
        os.chown(folder, owner, owner)
    return folder


def _remove(folder: str) -> None:
    """Delete the scratch folder, whatever modes the code left on what it made there."""
    def writable_then_retry(function, path, _):
        try:
            os.chmod(os.path.dirname(path), stat.S_IRWXU)
            os.chmod(path, stat.S_IRWXU)
            function(path)
        except OSError:
            pass

    shutil.rmtree(folder, onerror=writable_then_retry)


def _group(pgid: int) -> list[int]:
    """The live (not zombie) processes of a process group."""
    members = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(pid))
    return members


def _kill_group(pgid: int, grace: float = 10.0) -> None:
    """SIGKILL the group until none of it is left (the kernel tears a killed fork bomb down asynchronously; with the
    PID namespace, its init leaves only after every process in the namespace has gone)."""
    deadline = time.monotonic() + grace
    while True:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if not _group(pgid) or time.monotonic() > deadline:
            return
        time.sleep(0.01)


def _exited(pid: int, timeout: float) -> bool:
    """Wait for the child to exit without reaping it (so its pid, the group's id, cannot be reused before the group
    is killed); False when `timeout` runs out first."""
    deadline, delay = time.monotonic() + timeout, 0.001
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(2 * delay, 0.02)
    return True


def _wait(child: subprocess.Popen, token: str, timeout: float) -> bool:
    """Hand the child its token and wait; True when the time limit ran out. The group is killed either way."""
    try:
        child.stdin.write(token.encode() + b"\n")
        child.stdin.flush()
    except OSError:  # it died before reading its token
        pass
    try:
        return not _exited(child.pid, timeout)
    finally:
        _kill_group(child.pid)
        child.wait()
        child.stdin.close()


def run_tests(code: str, tests: str, *, timeout: float = 5.0, memory_mb: int = 512, max_processes: int = 16,
              kernel: bool | None = None, audit: bool = True) -> Outcome:
    """Run `code` then `tests` (Python asserts) in one namespace inside the sandbox (see the module docstring).
    `kernel`: None uses the kernel layers where available, True requires them, False leaves them out."""
    prefix, drops, name = _layers(kernel)
    scratch = _scratch(code, tests, NOBODY if drops else None)
    env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8"}
    token = secrets.token_hex(16)
    try:
        with tempfile.TemporaryFile() as out:
            child = subprocess.Popen(_command(prefix, drops, scratch, audit, timeout, memory_mb, max_processes),
                                     stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, cwd=scratch,
                                     env=env, start_new_session=True, close_fds=True)
            timed_out = _wait(child, token, timeout)
            out.seek(0)
            text = out.read().decode(errors="replace")
    finally:
        _remove(scratch)
    passed = not timed_out and child.returncode == 0 and text.rstrip().endswith(token)
    shown = text.rstrip()[: -len(token)] if passed else text
    return Outcome(passed, child.returncode, timed_out, shown[-OUTPUT_LIMIT:], name, scratch)
