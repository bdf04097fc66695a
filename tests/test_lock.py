"""The lock (requirements/cpu.lock) is what runs: installed versions equal it, and a run that reuses artifacts built
under other versions says so in one line.

    pytest tests/test_lock.py
"""
from __future__ import annotations

import json
import re
from importlib import metadata
from pathlib import Path

import yaml
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import ROOT, tiny_lora_chain_recipe

LOCK = ROOT / "requirements" / "cpu.lock"
PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s;#]+)")


def locked_versions() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        match = PIN.match(line.strip())
        if match:
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def test_lock_pins_the_core_libraries():
    pins = locked_versions()
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "evaluate",
                 "huggingface-hub", "numpy", "pytest"):
        assert name in pins, f"{name} is missing from {LOCK}"
    assert pins["torch"] == "2.13.0"


def test_installed_versions_equal_the_lock():
    """Fails on an install that did not come from the lock: rerun `pip install -r requirements/cpu.lock`."""
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    differ = {name: (pinned, installed.get(name)) for name, pinned in locked_versions().items()
              if installed.get(name) is None or Version(installed[name]).public != Version(pinned).public}
    assert not differ, f"installed versions differ from {LOCK.name} (locked, installed): {differ}"


def run_chain(path: Path, capsys) -> str:
    from pipeline import runner
    from pipeline.recipe import load_recipe

    capsys.readouterr()
    runner.run_recipe(load_recipe(path))
    return capsys.readouterr().out


def base_then_sft(tmp_path, capsys, before_sft=lambda out: None) -> str:
    """Build tokenizer and base, call `before_sft(output folder)`, then add the sft stage and run again: its output."""
    out = tmp_path / "out"
    spec = tiny_lora_chain_recipe(out, "drift")
    sft = spec["stages"].pop("sft")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    run_chain(path, capsys)
    before_sft(out)
    spec["stages"]["sft"] = sft
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return run_chain(path, capsys)


def record_old_transformers(out: Path) -> None:
    manifest_path = out / "base" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["libraries"]["transformers"] = "0.0.1"
    manifest_path.write_text(json.dumps(manifest))


def test_run_warns_once_when_reused_parents_were_built_with_other_versions(tmp_path, capsys):
    printed = base_then_sft(tmp_path, capsys, record_old_transformers)
    warnings = [line for line in printed.splitlines() if line.startswith("warning: reused artifacts")]
    assert len(warnings) == 1, printed
    assert f"transformers 0.0.1 -> {metadata.version('transformers')}" in warnings[0]

    printed = run_chain(tmp_path / "recipe.yaml", capsys)  # all up to date: nothing builds on them, no warning
    assert "warning: reused artifacts" not in printed


def test_no_warning_when_versions_match(tmp_path, capsys):
    assert "warning: reused artifacts" not in base_then_sft(tmp_path, capsys)
