"""The code sandbox (`pipeline.rl.sandbox`) and the `code_tests` rule: honest code passes, failing or exiting code
scores 0, and each malicious completion (infinite loop, fork bomb, deleting a file outside the scratch folder, a
network call to 127.0.0.1, a memory hog) is contained and scores 0, with nothing left running. Each attack is run
under every layer on its own where this machine has it (all layers; the kernel's namespaces and uid drop without the
audit hook; the audit hook without the kernel), and, where it is harmless, once with no layer at all, to show the
attack is real.

Run: `.venv/bin/python -m pytest tests/test_sandbox.py` (about 20 s: a few runs wait out their time limit).
"""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from pipeline import schema
from pipeline.rl import sandbox
from pipeline.rl.rewards import code_block, rule_rewards

LAYERS = {"all": {}, "kernel": {"kernel": True, "audit": False}, "audit": {"kernel": False}}


def layer(name: str, needs_uid_drop: bool = False) -> dict:
    """The run options of a layer, or a skip where this machine does not have it."""
    if name == "kernel" and sandbox.isolation() == "process":
        pytest.skip("no kernel isolation (unshare) here")
    if name == "kernel" and needs_uid_drop and sandbox.isolation() != "uid":
        pytest.skip("the kernel layer contains this only with the uid drop (root with setpriv)")
    return LAYERS[name]


def still_running(outcome: sandbox.Outcome) -> list[int]:
    """Live processes whose command line names the run's scratch folder (the harness and all it forked)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if outcome.scratch.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


def contained(outcome: sandbox.Outcome) -> None:
    assert not outcome.passed
    assert not still_running(outcome)
    assert not os.path.exists(outcome.scratch)


ADD = "def add(a, b):\n    return a + b\n"


@pytest.mark.parametrize("code, tests, passed", [
    (ADD, "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n", True),
    (ADD, "assert add(2, 3) == 6\n", False),
    ("def add(a, b):\n    return a +\n", "assert add(1, 1) == 2\n", False),  # a syntax error
    (ADD + "import sys\nsys.exit(0)\n", "assert add(2, 3) == 6\n", False),  # exits before the tests run
    (ADD + "import os\nos._exit(0)\n", "assert add(2, 3) == 6\n", False),  # exits 0 without a trace
    (ADD + "print('x' * 50)\n", "assert add(1, 2) == 3\n", True),
])
def test_code_passes_only_when_its_tests_run_to_the_end(code, tests, passed):
    outcome = sandbox.run_tests(code, tests)
    assert outcome.passed is passed, outcome.output
    assert not outcome.timed_out and not os.path.exists(outcome.scratch)


def test_the_code_runs_in_a_fresh_scratch_folder_it_may_write():
    code = "import os\nopen('notes.txt', 'w').write('hi')\nhere = os.getcwd()\n"
    outcome = sandbox.run_tests(code, "assert open('notes.txt').read() == 'hi'\nprint(here)\n")
    assert outcome.passed, outcome.output
    assert outcome.output.strip() == os.path.realpath(outcome.scratch)
    assert not os.path.exists(outcome.scratch)


@pytest.mark.parametrize("name", LAYERS)
def test_an_infinite_loop_is_killed_at_the_time_limit(name):
    start = time.monotonic()
    outcome = sandbox.run_tests("while True:\n    pass\n", "", timeout=1.0, **layer(name))
    assert outcome.timed_out and time.monotonic() - start < 8
    contained(outcome)


FORK_BOMB = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"


@pytest.mark.parametrize("name", LAYERS)
def test_a_fork_bomb_is_contained_and_leaves_nothing_running(name):
    if name == "kernel" and sandbox.isolation() == "kernel" and os.geteuid() == 0:
        pytest.skip("as root without the uid drop RLIMIT_NPROC does not apply: only the audit hook bounds forks")
    outcome = sandbox.run_tests(FORK_BOMB, "", timeout=2.0, **layer(name))
    assert outcome.timed_out
    contained(outcome)


DELETE = "import os\nos.remove({path!r})\n"


@pytest.mark.parametrize("name", LAYERS)
def test_deleting_a_file_outside_the_scratch_folder_fails(name, tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    victim.chmod(0o666)  # even a file anyone may write is safe: removal needs its folder
    tmp_path.chmod(0o755)
    outcome = sandbox.run_tests(DELETE.format(path=str(victim)), "", **layer(name, needs_uid_drop=True))
    contained(outcome)
    assert victim.read_text() == "precious"
    unguarded = sandbox.run_tests(DELETE.format(path=str(victim)), "", kernel=False, audit=False)
    assert unguarded.passed and not victim.exists()  # the same code with no layer does delete it


@pytest.fixture
def server():
    """A TCP server on 127.0.0.1 that counts the connections it accepts."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    accepted, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1], accepted
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    listener.close()


CONNECT = "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n"


@pytest.mark.parametrize("name", LAYERS)
def test_a_network_call_to_localhost_fails(name, server):
    port, accepted = server
    outcome = sandbox.run_tests(CONNECT.format(port=port), "", **layer(name))
    contained(outcome)
    assert not accepted
    unguarded = sandbox.run_tests(CONNECT.format(port=port), "", kernel=False, audit=False)
    assert unguarded.passed, unguarded.output  # the server is reachable without the sandbox
    time.sleep(0.3)
    assert len(accepted) == 1


@pytest.mark.parametrize("name", LAYERS)
def test_a_memory_hog_fails_at_the_memory_limit(name):
    outcome = sandbox.run_tests("block = bytearray(1 << 30)\n", "", memory_mb=256, **layer(name))
    assert not outcome.timed_out and "MemoryError" in outcome.output
    contained(outcome)


def test_runs_from_several_threads_at_once():
    results = [None] * 6

    def run(i: int) -> None:
        results[i] = sandbox.run_tests(f"x = {i}\n", f"assert x == {i if i % 2 else -1}\n").passed

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [False, True, False, True, False, True]


def test_code_tests_rule_scores_the_completion_code_block():
    rule = [schema.RuleReward(type="code_tests", timeout=3)]
    tests = "assert square(3) == 9"
    completions = ["Here:\n```python\ndef square(x):\n    return x * x\n```\nDone.",
                   "```python\ndef square(x):\n    return x + x\n```",
                   "def square(x):\n    return x ** 2\n",  # no fence: the whole completion is the code
                   "```python\nwhile True: pass\n```"]
    rows = [{"tests": tests}] * 3 + [{"tests": [tests]}]
    assert rule_rewards(rule, completions, rows) == [1.0, 0.0, 1.0, 0.0]
    assert rule_rewards(rule, ["def square(x): return 9"], [{"tests": ""}]) == [0.0]  # no tests, no reward
    tagged = [schema.RuleReward(type="code_tests", extract="tagged")]
    assert rule_rewards(tagged, ["<answer>def square(x): return x*x</answer>", "def square(x): return x*x"],
                        [{"tests": tests}] * 2) == [1.0, 0.0]


def test_code_block_takes_the_last_python_fence():
    text = "```bash\nls\n```\n```py\na = 1\n```\ntext\n```python\nb = 2\n```"
    assert code_block(text) == "b = 2\n"
    assert code_block("```\nc = 3\n```") == "c = 3\n"
    assert code_block("d = 4") == "d = 4"
