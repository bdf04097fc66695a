"""`python -m pipeline export ARTIFACT --format gguf --quant Q --output DIR`: write an artifact or model folder as a
GGUF file with an Ollama Modelfile (the `export` extra): a one-stage recipe of the `export` stage
(`pipeline.stages.export`) run through the runner (manifest, card, atomic folder), always rebuilt."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline import schema
from pipeline.errors import PipelineError
from pipeline.recipe import parse_recipe
from pipeline.runner import run_recipe


def add_parser(sub) -> argparse.ArgumentParser:
    export = sub.add_parser("export", help="write an artifact as GGUF for llama.cpp and Ollama (the `export` extra)")
    export.add_argument("artifact", help="a causal-lm artifact or model folder (a LoRA adapter is merged first)")
    export.add_argument("--format", choices=["gguf"], default="gguf")
    export.add_argument("--quant", choices=["f16", "q8_0", "q4_k_m"], default="q8_0")
    export.add_argument("--output", required=True, help="the artifact folder to write (its parent must be writable)")
    export.add_argument("--gguf-file", default=None, help="when ARTIFACT is a folder of .gguf files: which one")
    export.add_argument("--tokenizer-pre", default=None,
                        help="llama.cpp pre-tokenizer name for a tokenizer the converter does not recognise")
    return export


def main(args) -> int:
    output = Path(args.output).expanduser().resolve()
    if not schema.STAGE_NAME_PATTERN.match(output.name):
        raise PipelineError(f"--output {args.output}: the folder name must use letters, digits, '_' and '-' only",
                            key="--output", fix="e.g. --output outputs/quickstart/sft-gguf")
    local = Path(args.artifact).expanduser()
    stage = {"kind": "export", "model": {"path": str(local.resolve()) if local.exists() else args.artifact},
             "format": args.format, "quant": args.quant}
    if args.gguf_file:
        stage["model"]["gguf_file"] = args.gguf_file
    if args.tokenizer_pre:
        stage["tokenizer_pre"] = args.tokenizer_pre
    data = {"name": "export", "output_dir": str(output.parent), "stages": {output.name: stage}}
    recipe = parse_recipe(data, Path("<python -m pipeline export>"))
    run_recipe(recipe, force={"all"}, report=False)
    for scratch in (".tmp", ".work"):  # the runner's scratch folders beside the artifact, once empty
        try:
            (output.parent / scratch).rmdir()
        except OSError:
            pass
    print(f"wrote {output}", flush=True)
    return 0
