"""A small HTTP client for a vLLM OpenAI-compatible server used as a rollout engine: sample completions of
token-id prompts (one request per prompt, each with its own seed, sent concurrently so the server batches them),
with the sampled tokens' ids and log-probs; load and unload LoRA adapters; reload the model's weights in place.

Standard library only. Used by `pipeline.rl.engines`; nothing runs at import.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pipeline.errors import TrainingError


@dataclass
class Completion:
    """One sampled completion: its token ids (EOS included when it stopped there) and their log-probs."""

    token_ids: list[int]
    logprobs: list[float]


class VLLMClient:
    def __init__(self, url: str, timeout: float = 600.0):
        self.url, self.timeout = url.rstrip("/"), timeout

    def post(self, path: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(self.url + path, json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:300]
            raise TrainingError(f"vLLM server {self.url}{path}: HTTP {error.code}: {detail}", key="rollout",
                                fix="read the server's log (vllm-server.log in the stage's work folder)") from None
        except OSError as error:
            raise TrainingError(f"vLLM server {self.url}{path} unreachable: {error}", key="rollout.url",
                                fix="check that the server runs (rollout.url) or read vllm-server.log") from None
        try:
            return json.loads(raw or b"null")
        except ValueError:
            return raw.decode(errors="replace")

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=self.timeout) as response:
            return json.loads(response.read())

    def served_model(self) -> str:
        """The name the server serves its base model under."""
        return self.get("/v1/models")["data"][0]["id"]

    def complete(self, prompt: list[int], *, model: str, max_tokens: int, temperature: float, top_k: int,
                 top_p: float, seed: int | None, stop_token_ids: list[int]) -> Completion:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
                "top_p": top_p, "top_k": top_k if top_k > 0 else -1, "logprobs": 0, "n": 1,
                "return_tokens_as_token_ids": True, "stop_token_ids": stop_token_ids, "skip_special_tokens": False,
                "include_stop_str_in_output": True}
        if seed is not None:
            body["seed"] = seed
        choice = self.post("/v1/completions", body)["choices"][0]
        logprobs = choice["logprobs"] or {"tokens": [], "token_logprobs": []}
        ids = [int(token.split(":", 1)[1]) for token in logprobs["tokens"]]
        return Completion(ids, [float(v) for v in logprobs["token_logprobs"]])

    def generate(self, prompts: list[list[int]], seeds: list[int | None], **settings: Any) -> list[Completion]:
        """One completion per prompt, prompt i drawn with seeds[i], in the prompts' order."""
        with ThreadPoolExecutor(max_workers=max(1, min(64, len(prompts)))) as pool:
            return list(pool.map(lambda args: self.complete(args[0], seed=args[1], **settings), zip(prompts, seeds)))

    def load_adapter(self, name: str, path: str) -> None:
        self.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})

    def unload_adapter(self, name: str) -> None:
        self.post("/v1/unload_lora_adapter", {"lora_name": name})

    def reload_weights(self, folder: str) -> None:
        """Reload the served model's weights in place from the safetensors files in `folder`, then drop the prefix
        cache (its keys and values came from the old weights)."""
        self.post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": folder}})
        self.post("/reset_prefix_cache", {})
