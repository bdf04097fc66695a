"""Every malformed recipe in tests/bad_recipes/ fails with exit code 2 and one clear line naming the file, the key
path and the fix; nothing is written and no traceback is shown. Each file states what it expects in its first lines:

    # expect: <substring of the error message>
    # key: <key path named in the error>          (absent for whole-file errors such as invalid YAML)
    # args: <command-line overrides>              (optional)

Run: `pytest tests/test_bad_recipes.py` (in-process CLI calls, a few seconds; one subprocess for the python tag).
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pipeline.__main__ import main
from resilience_common import ROOT, cli

BAD = sorted((ROOT / "tests" / "bad_recipes").glob("*.yaml"))


def _spec(path: Path) -> dict[str, str]:
    spec = {}
    for line in path.read_text().splitlines():
        match = re.match(r"# (expect|key|args): (.*)$", line)
        if not match:
            break
        spec[match.group(1)] = match.group(2)
    return spec


def _outputs() -> set[str]:
    folder = ROOT / "outputs"
    return {str(p) for p in folder.iterdir()} if folder.exists() else set()


def test_corpus_is_large_enough():
    assert len(BAD) >= 30
    assert all("expect" in _spec(p) for p in BAD), "every bad recipe states the error it expects"


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_recipe_fails_clearly(path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = _spec(path)
    before = _outputs()
    code = main(["run", str(path.relative_to(ROOT)), *shlex.split(spec.get("args", ""))])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert path.name in err
    assert spec["expect"] in err, err
    if "key" in spec:
        assert f"{spec['key']}:" in err, err
    assert "fix:" in err, err
    assert "Traceback" not in err
    assert _outputs() == before, "a failed check must not write anything"


def test_python_tags_cannot_run_code(tmp_path):
    """The safe loader refuses !!python tags at the CLI: no code runs, exit 2, one line, no traceback."""
    marker = tmp_path / "pwned"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f'name: !!python/object/apply:os.system ["touch {marker}"]\nstages: {{}}\n')
    result = cli("validate", str(recipe))
    assert result.returncode == 2
    assert "could not determine a constructor" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()
