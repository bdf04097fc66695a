"""Run llama.cpp's own `convert_hf_to_gguf.py`, with one addition: a pre-tokenizer it cannot recognise can be named.

Launched by `pipeline.tools.gguf.convert` in a child process (the converter configures logging and calls `sys.exit`):

    python -m pipeline.tools.gguf_convert --llama-cpp DIR [--tokenizer-pre NAME] [--override-pre] -- MODEL_DIR
        --outfile F --outtype f16

DIR is a llama.cpp source tree (`convert_hf_to_gguf.py`, `conversion/`, `gguf-py/`); everything after `--` is the
converter's own command line. The converter names a BPE tokenizer's pre-tokenizer (`tokenizer.ggml.pre`) by hashing
the token ids of a fixed text, so a tokenizer trained here (its own vocabulary) is never in its table and it stops
with "BPE pre-tokenizer was not recognized". With `--tokenizer-pre NAME` that case writes NAME instead (the caller
derives it from tokenizer.json or the base GGUF); `--override-pre` writes NAME even for a recognised tokenizer. Nothing
runs at import.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" not in argv:
        raise SystemExit("usage: python -m pipeline.tools.gguf_convert --llama-cpp DIR [...] -- CONVERTER ARGS")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m pipeline.tools.gguf_convert")
    parser.add_argument("--llama-cpp", required=True, type=Path)
    parser.add_argument("--tokenizer-pre", default=None)
    parser.add_argument("--override-pre", action="store_true")
    return parser.parse_args(argv[:split]), argv[split + 1:]


def name_pre_tokenizer(text_model_class, name: str, override: bool) -> None:
    """Make the converter write `name` as tokenizer.ggml.pre when its hash table does not know the tokenizer (or
    always, with `override`)."""
    recognise = text_model_class.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        if override:
            return name
        try:
            return recognise(self, tokenizer)
        except NotImplementedError:
            return name

    text_model_class.get_vocab_base_pre = get_vocab_base_pre


def main(argv: list[str] | None = None) -> None:
    args, converter_args = _parse(sys.argv[1:] if argv is None else argv)
    tree = args.llama_cpp.resolve()
    # The converter must use the gguf-py of its own tree (the PyPI `gguf` of the same version number can be older).
    sys.path[:0] = [str(tree), str(tree / "gguf-py")]
    import convert_hf_to_gguf  # noqa: E402  (llama.cpp's script, imported from its tree)
    from conversion import TextModel

    if args.tokenizer_pre:
        name_pre_tokenizer(TextModel, args.tokenizer_pre, args.override_pre)
    sys.argv = ["convert_hf_to_gguf.py", *converter_args]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
