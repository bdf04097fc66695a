"""Pushing artifacts to a loopback Hub (tests/hub_server.py) with the real huggingface_hub client.

    .venv/bin/python -m pytest tests/test_push.py -q

One tiny recipe (tokenizer -> pretrain -> LoRA sft, a few steps) runs once per module with a recipe-level
`push_to_hub`; the tests then push its artifacts through the CLI, download them back and inspect the server.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import tiny_lora_chain_recipe

from hub_server import HubServer

ROOT = Path(__file__).resolve().parents[1]
FAKE_TOKEN = "hf_" + "FakeTokenForLoopbackTests0123456789"


def _recipe(out: Path) -> dict:
    return tiny_lora_chain_recipe(out, "tinypush", license="mit", push_to_hub={"repo_id": "org/chain"})


def _online(mp: pytest.MonkeyPatch, url: str, token: str | None) -> None:
    """Point the client at the loopback server (constants are read at import, so patch them too)."""
    from huggingface_hub import constants

    mp.setenv("HF_ENDPOINT", url)
    mp.setenv("HF_HUB_OFFLINE", "0")
    mp.setenv("HF_HUB_DISABLE_XET", "1")
    mp.setattr(constants, "ENDPOINT", url)
    mp.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    mp.setattr(constants, "HF_HUB_OFFLINE", False)
    mp.setattr(constants, "HF_HUB_DISABLE_XET", True)
    mp.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    if token:
        mp.setenv("HF_TOKEN", token)
    else:
        mp.delenv("HF_TOKEN", raising=False)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Server + a recipe already run (and pushed) against it; yields (server, output folder, run output)."""
    from pipeline.__main__ import main

    tmp = tmp_path_factory.mktemp("push")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tmp / "out"), sort_keys=False))
    with HubServer(token=FAKE_TOKEN) as server, pytest.MonkeyPatch.context() as mp:
        _online(mp, server.url, FAKE_TOKEN)
        mp.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp / "no-token"))
        mp.setattr("huggingface_hub.constants.HF_STORED_TOKENS_PATH", str(tmp / "no-tokens"))
        assert main(["run", str(recipe)]) == 0
        yield server, tmp / "out", mp


def _download(server: HubServer, repo_id: str, dest: Path, revision: str = "main") -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, revision=revision, endpoint=server.url, token=FAKE_TOKEN,
                                  local_dir=dest))


def _card_meta(server: HubServer, repo_id: str, revision: str = "main") -> dict:
    text = server.state.files(repo_id, revision)["README.md"].data.decode()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_recipe_push_to_hub_pushes_each_stage_to_its_branch(hub):
    server, out, _ = hub
    repo = server.state.repos["org/chain"]
    assert repo.private is True
    assert {"tokenizer", "base", "sft"} <= set(repo.branches)
    for stage in ("tokenizer", "base", "sft"):
        manifest = json.loads((out / stage / "manifest.json").read_text())
        assert manifest["hub"]["repo_id"] == "org/chain" and manifest["hub"]["revision"] == stage
        assert repo.branches[stage] == manifest["hub"]["commit"]
    base_files = server.state.files("org/chain", "base")
    assert base_files["model.safetensors"].lfs_oid  # weights went through the LFS batch API
    assert {"config.json", "manifest.json", "README.md", "tokenizer.json"} <= set(base_files)
    adapter = json.loads(server.state.files("org/chain", "sft")["adapter_config.json"].data)
    assert adapter["base_model_name_or_path"] == "org/chain" and adapter["revision"] == "base"
    assert _card_meta(server, "org/chain", "sft")["base_model"] == "org/chain"


def test_cli_push_round_trip_loads_with_from_pretrained(hub, tmp_path, capfd):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.__main__ import main

    server, out, _ = hub
    assert main(["push", str(out / "base"), "org/base", "--no-private"]) == 0
    assert "pushed base to org/base@main" in capfd.readouterr().out
    assert server.state.repos["org/base"].private is False
    assert len(server.state.repos["org/base"].commits) == 2  # the initial commit + exactly one for the artifact
    local = _download(server, "org/base", tmp_path / "dl")
    model = AutoModelForCausalLM.from_pretrained(local)
    original = AutoModelForCausalLM.from_pretrained(out / "base")
    for (name, a), (_, b) in zip(model.state_dict().items(), original.state_dict().items()):
        assert torch.equal(a, b), name
    assert len(AutoTokenizer.from_pretrained(local)) == len(AutoTokenizer.from_pretrained(out / "base"))
    meta = _card_meta(server, "org/base")
    assert meta["license"] == "mit" and "hf-pipeline" in meta["tags"] and "pretrain" in meta["tags"]
    assert "base_model" not in meta  # built from scratch: no base
    assert json.loads((out / "base" / "manifest.json").read_text())["hub"]["repo_id"] == "org/base"


def test_adapter_push_names_the_pushed_base_repo(hub, tmp_path):
    from pipeline.__main__ import main

    server, out, mp = hub
    assert main(["push", str(out / "base"), "org/base2", "--revision", "v1"]) == 0
    assert main(["push", str(out / "sft"), "org/adapter"]) == 0
    adapter = json.loads(server.state.files("org/adapter")["adapter_config.json"].data)
    assert adapter["base_model_name_or_path"] == "org/base2" and adapter["revision"] == "v1"
    meta = _card_meta(server, "org/adapter")
    assert meta["base_model"] == "org/base2" and meta["library_name"] == "peft" and meta["license"] == "mit"
    local_config = json.loads((out / "sft" / "adapter_config.json").read_text())
    assert Path(local_config["base_model_name_or_path"]).is_absolute()  # the local artifact is left untouched
    # the downloaded adapter loads on its base fetched from the (loopback) Hub, branch v1
    from peft import AutoPeftModelForCausalLM

    mp.setenv("HF_HOME", str(tmp_path / "hf-home"))
    mp.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    model = AutoPeftModelForCausalLM.from_pretrained(_download(server, "org/adapter", tmp_path / "a"),
                                                     token=FAKE_TOKEN, cache_dir=str(tmp_path / "hub-cache"))
    v1 = server.state.repos["org/base2"].branches["v1"]
    assert ("GET", f"/org/base2/resolve/{v1}/model.safetensors") in server.state.requests
    assert model.peft_config["default"].base_model_name_or_path == "org/base2"


def test_merge_pushes_full_weights(hub, tmp_path):
    from transformers import AutoModelForCausalLM

    from pipeline.__main__ import main

    server, out, _ = hub
    assert main(["push", str(out / "sft"), "org/merged", "--merge"]) == 0
    files = server.state.files("org/merged")
    assert "model.safetensors" in files and "adapter_config.json" not in files
    assert _card_meta(server, "org/merged")["library_name"] == "transformers"
    AutoModelForCausalLM.from_pretrained(_download(server, "org/merged", tmp_path / "m"))


def test_repush_replaces_stale_files_in_one_commit(hub):
    from pipeline.__main__ import main

    server, out, _ = hub
    assert main(["push", str(out / "tokenizer"), "org/tok"]) == 0
    assert main(["push", str(out / "base"), "org/tok"]) == 0
    repo = server.state.repos["org/tok"]
    assert len(repo.commits) == 3
    assert "model.safetensors" in server.state.files("org/tok")


def test_token_never_written_or_printed(hub, tmp_path, capfd):
    from pipeline.__main__ import main

    server, out, _ = hub
    assert main(["push", str(out / "sft"), "org/secret-check"]) == 0
    captured = capfd.readouterr()
    assert FAKE_TOKEN not in captured.out + captured.err
    for path in out.rglob("*"):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path
    for repo_id in server.state.repos:
        for name, stored in server.state.files(repo_id).items():
            assert FAKE_TOKEN.encode() not in stored.data, (repo_id, name)


def test_missing_token_exits_2_with_one_line(hub, tmp_path, capfd):
    from pipeline.__main__ import main

    server, out, mp = hub
    mp.delenv("HF_TOKEN")
    try:
        assert main(["push", str(out / "base"), "org/none"]) == 2
    finally:
        mp.setenv("HF_TOKEN", FAKE_TOKEN)
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no Hugging Face token" in err
    assert "org/none" not in server.state.repos


def test_incomplete_artifact_and_bad_card_are_clear_errors(hub, tmp_path, capfd):
    from pipeline.__main__ import main

    server, out, _ = hub
    (tmp_path / "half").mkdir()
    assert main(["push", str(tmp_path / "half"), "org/half"]) == 2
    assert "not a complete artifact" in capfd.readouterr().err
    from pipeline.tools import hub as hub_module
    from pipeline.artifacts import open_artifact
    from pipeline.schema import HubTarget

    artifact = open_artifact(out / "tokenizer")
    readme = artifact.path / "README.md"
    good = readme.read_text()
    try:
        readme.write_text("---\nlicense: [mit\n---\n# broken\n")
        # the unreadable header is replaced by valid metadata rather than pushed as is
        hub_module.push_artifact(artifact, HubTarget(repo_id="org/card"))
    finally:
        readme.write_text(good)
    assert isinstance(_card_meta(server, "org/card"), dict)
    assert "not a YAML mapping" in capfd.readouterr().err


def test_offline_mode_is_a_clear_error(hub, capfd):
    from huggingface_hub import constants

    from pipeline.__main__ import main

    server, out, mp = hub
    mp.setattr(constants, "HF_HUB_OFFLINE", True)
    try:
        assert main(["push", str(out / "base"), "org/offline"]) == 2
    finally:
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
    assert "HF_HUB_OFFLINE" in capfd.readouterr().err
    assert "org/offline" not in server.state.repos


def test_server_rejects_invalid_card_yaml(hub):
    from huggingface_hub import CommitOperationAdd, HfApi

    server, _, _ = hub
    api = HfApi(endpoint=server.url, token=FAKE_TOKEN)
    api.create_repo("org/raw", exist_ok=True)
    with pytest.raises(ValueError, match="Invalid metadata"):
        api.create_commit("org/raw", operations=[CommitOperationAdd("README.md", b"---\n- [a\n---\n")],
                          commit_message="bad card")


def test_card_refresh_keeps_metrics_current():
    from pipeline.artifacts import split_card
    from pipeline.tools.hub import refresh_card

    card = ("---\nlicense: mit\nbase_model: /abs/local/path\ntags: [hf-pipeline]\n---\n"
            "# x\n\n## Metrics\n\n| a | 1 |\n\n## Usage\n")
    text = refresh_card(card, {"metrics": {"eval_loss": 0.5}}, {"base_model": None, "library_name": None,
                                                                  "merged": False})
    meta, body = split_card(text)
    assert "base_model" not in meta and meta["license"] == "mit"
    assert "| eval_loss | 0.5 |" in body and "| a | 1 |" not in body and "## Usage" in body
