"""A vLLM server for rollouts, in its own process and its own Python environment (vLLM pins its own torch and
transformers, so it cannot share the project's locked environment; `bash requirements/vllm.sh` creates
`.venv-vllm`).

`VLLMServer(spec).start()` runs `python -m vllm.entrypoints.openai.api_server` from `spec.python` on a free loopback
port, waits for `/health` and returns the URL; `stop()` ends its whole process group. The server cannot outlive the
trainer: it is stopped when the stage ends or raises, and the kernel sends it SIGTERM when the trainer's process dies
(even by kill -9: PR_SET_PDEATHSIG). Its output goes to `spec.log_path`; a server that dies while starting is
reported with the last lines of that log.

Used by `pipeline.rl.engines` when a stage sets `rollout: {engine: vllm}`; nothing runs at import.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import PipelineError

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM's --max-lora-rank accepts
PR_SET_PDEATHSIG = 1


ROOT_CAUSE = re.compile(r"\b[A-Za-z_][\w.]*(?:Error|Exception): .*$")


@dataclass
class ServerSpec:
    """What the started server serves and how. `lora_rank` None: no LoRA support (full or merged policies)."""

    model: str  # the folder of the stage's starting model (weights, config, tokenizer)
    python: str  # the interpreter of the vLLM environment
    log_path: Path
    key: str  # the recipe key errors name, e.g. stages.ppo.rollout
    dtype: str = "float32"
    max_model_len: int = 1024
    lora_rank: int | None = None
    kv_cache_gb: float = 1.0
    gpu_memory_utilization: float = 0.3
    threads: int = 1
    seed: int = 0
    start_timeout: float = 600.0
    server_args: list[str] = field(default_factory=list)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def lora_rank_flag(rank: int) -> int:
    """The smallest rank vLLM accepts for --max-lora-rank that holds an adapter of rank `rank`."""
    return next((allowed for allowed in LORA_RANKS if allowed >= rank), rank)


def command(spec: ServerSpec, port: int) -> list[str]:
    """The server's command line: token-id prompts and sampled-token log-probs after temperature (what the trainer
    recomputes), eager mode (no per-start compilation), the dev endpoints for in-place weight reloads."""
    cmd = [spec.python, "-m", "vllm.entrypoints.openai.api_server", "--model", spec.model, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", spec.dtype, "--max-model-len", str(spec.max_model_len), "--seed",
           str(spec.seed), "--enforce-eager", "--logprobs-mode", "processed_logprobs", "--disable-log-stats",
           "--generation-config", "vllm"]
    if spec.lora_rank is not None:
        cmd += ["--enable-lora", "--max-lora-rank", str(lora_rank_flag(spec.lora_rank)), "--max-loras", "2"]
    if has_cuda():
        cmd += ["--gpu-memory-utilization", str(spec.gpu_memory_utilization)]
    return cmd + list(spec.server_args)


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def server_env(spec: ServerSpec) -> dict[str, str]:
    """The server's environment: ours, without our virtualenv's paths, plus vLLM's CPU and weight-update settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update({
        "VLLM_SERVER_DEV_MODE": "1",  # /collective_rpc (in-place weight reload) and /reset_prefix_cache
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",  # /v1/load_lora_adapter
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(spec.kv_cache_gb))),
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": str(spec.threads),
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    })
    return env


def die_with_parent() -> None:
    """In the child, before exec: ask the kernel for SIGTERM when the parent dies (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class VLLMServer:
    """One started server; a context manager that stops it on exit."""

    def __init__(self, spec: ServerSpec):
        self.spec, self.process, self.url = spec, None, None

    def check_python(self) -> None:
        python = Path(self.spec.python)
        if not python.exists():
            raise PipelineError(f"no vLLM interpreter at {python}", key=f"{self.spec.key}.python",
                                fix="create it with `bash requirements/vllm.sh` (CPU) or set rollout.python to a "
                                    "Python that has vllm installed (GPU: pip install vllm), or rollout.url")

    def start(self) -> str:
        self.check_python()
        port = free_port()
        self.spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.spec.log_path, "ab")
        self.process = subprocess.Popen(command(self.spec, port), stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=server_env(self.spec), start_new_session=True,
                                        preexec_fn=die_with_parent)
        log.close()
        self.url = f"http://127.0.0.1:{port}"
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self.url

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.spec.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PipelineError(f"the vLLM server exited with code {self.process.returncode} while starting: "
                                    f"{self.log_tail()}", key=self.spec.key,
                                    fix=f"read {self.spec.log_path}; check rollout.python's vLLM install")
            if healthy(self.url):
                return
            time.sleep(0.5)
        raise PipelineError(f"the vLLM server was not healthy after {self.spec.start_timeout:.0f} s",
                            key=f"{self.spec.key}.start_timeout", fix=f"raise it, or read {self.spec.log_path}")

    def root_cause(self) -> str | None:
        """The last `SomeError: message` line of the server's log that is not the engine's generic "engine dead"
        report (vLLM logs the worker's exception, then a chain of EngineDeadErrors); None when there is none."""
        try:
            text = self.spec.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return None
        for line in reversed(text):
            found = ROOT_CAUSE.search(line)
            if found and "EngineDead" not in found.group(0) and "See stack trace" not in line:
                return found.group(0).strip()
        return None

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.spec.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(line.strip() for line in text[-lines:])

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM to the server's process group (API server, engine core, workers), SIGKILL after `grace` s."""
        if self.process is None or self.process.poll() is not None:
            return
        group = os.getpgid(self.process.pid)
        os.killpg(group, signal.SIGTERM)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(group, signal.SIGKILL)
            self.process.wait()
        try:  # the engine's children, should one have outlived the API server
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "VLLMServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
