"""The program `pipeline.rl.sandbox` runs inside its sandbox: it limits itself, then runs a completion's code and the
row's tests in one namespace, and prints a one-time token only when the tests finished without an exception.

Started as `python -I -S -B sandbox_harness.py SCRATCH MEMORY_BYTES CPU_SECONDS MAX_PROCESSES AUDIT NPROC` (AUDIT,
NPROC: 1 or 0; NPROC says whether the kernel applies RLIMIT_NPROC to this uid, which it does not for root) with
the scratch folder as its working directory, `solution.py` and `tests.py` in it and the token as the first line of
stdin (the rest of stdin stays open while the parent waits: when it closes, the harness exits). Standard library only, so it
runs in an isolated interpreter without site-packages. Not imported by the package; nothing runs at import.
"""
from __future__ import annotations

import builtins
import os
import resource
import sys
import threading
import traceback

# Audit events refused outright: network, starting programs, native code, and reaching other processes or the
# harness's own objects. `os.fork` is added where RLIMIT_NPROC does not apply (root).
BLOCKED = ("socket.", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.", "ctypes.", "os.kill",
           "os.killpg", "signal.pthread_kill", "os.forkpty", "pty.", "gc.get_", "sys._current_frames", "webbrowser.")
BLOCKED_IMPORTS = ("_posixsubprocess", "_ctypes")
# Audit events that change the file system: (argument positions holding a path, position of its dir_fd or None).
WRITES = {"os.remove": ((0,), 1), "os.rmdir": ((0,), 1), "os.mkdir": ((0,), 2), "os.chmod": ((0,), 2),
          "os.chown": ((0,), 3), "os.utime": ((0,), 4), "os.rename": ((0, 1), None), "os.link": ((0, 1), None),
          "os.symlink": ((1,), 2), "os.truncate": ((0,), None), "os.mkfifo": ((0,), 2), "os.mknod": ((0,), 3),
          "shutil.rmtree": ((0,), 1), "shutil.copyfile": ((1,), None), "shutil.chown": ((0,), None)}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def set_limits(memory: int, cpu: int, max_processes: int | None) -> None:
    """Address space, CPU seconds (SIGKILL one second after the soft limit), file size, core dumps and, unless
    `max_processes` is None, processes: this many more than the uid runs now."""
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, 8 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if max_processes is not None:
        limit = own_processes() + max_processes
        resource.setrlimit(resource.RLIMIT_NPROC, (limit, limit))


def own_processes() -> int:
    """Processes of this real uid (RLIMIT_NPROC counts them all, not only this sandbox's)."""
    count, uid = 0, str(os.getuid())
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as status:
                count += any(line.split()[1:2] == [uid] for line in status if line.startswith("Uid:"))
        except OSError:
            continue
    return count


def resolve(path, dir_fd) -> str:
    """The absolute, symlink-resolved path an event names (relative to its dir_fd, else to the working folder)."""
    path = os.fsdecode(path)
    base = os.readlink(f"/proc/self/fd/{dir_fd}") if isinstance(dir_fd, int) and dir_fd >= 0 else os.getcwd()
    return os.path.realpath(os.path.join(base, path))


def outside(path, dir_fd, scratch: str) -> bool:
    if isinstance(path, int):  # an open file descriptor: already past the check when it was opened
        return False
    target = resolve(path, dir_fd)
    return target != os.devnull and not (target + os.sep).startswith(scratch + os.sep)


def refusal(event: str, args: tuple, scratch: str, block_fork: bool) -> str | None:
    """Why an audit event is refused, or None."""
    if event.startswith(BLOCKED) or (block_fork and event == "os.fork"):
        return event
    if event == "import" and args[0] in BLOCKED_IMPORTS:
        return f"import {args[0]}"
    if event == "open" and (any(c in str(args[1] or "") for c in "wax+") or (args[2] or 0) & WRITE_FLAGS):
        return f"writing {args[0]}" if outside(args[0], None, scratch) else None
    paths, dir_fd_at = WRITES.get(event, ((), None))
    dir_fd = args[dir_fd_at] if dir_fd_at is not None and dir_fd_at < len(args) else None
    for at in paths:
        if at < len(args) and args[at] is not None and outside(args[at], dir_fd, scratch):
            return f"{event} {args[at]}"
    return None


def install_audit_hook(scratch: str, block_fork: bool) -> None:
    def hook(event: str, args: tuple) -> None:
        why = refusal(event, args, scratch, block_fork)
        if why is not None:
            raise PermissionError(f"sandbox: {why} is not allowed")

    sys.addaudithook(hook)


def watch_parent(pipe) -> None:
    """Exit when the parent closes the pipe (it finished with us, or it died)."""
    def wait() -> None:
        pipe.read()
        os._exit(3)

    threading.Thread(target=wait, daemon=True).start()


def main(argv: list[str]) -> None:
    scratch, memory, cpu, max_processes = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    audit, nproc = argv[4] == "1", argv[5] == "1"
    pipe = os.fdopen(os.dup(0), "rb", buffering=0)
    token = pipe.readline().decode().strip()
    sys.stdin = open(os.devnull)
    os.dup2(sys.stdin.fileno(), 0)
    with open("solution.py") as f:
        solution = f.read()
    with open("tests.py") as f:
        tests = f.read()
    watch_parent(pipe)
    set_limits(memory, cpu, max_processes if nproc else None)
    if audit:
        install_audit_hook(os.path.realpath(scratch), block_fork=not nproc)
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(solution, "solution.py", "exec"), namespace)
        exec(compile(tests, "tests.py", "exec"), namespace)
    except BaseException:  # SystemExit too: code that exits before the tests end has not passed them
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.write("\n" + token + "\n")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
