"""The stage contract, a leaf every stage module imports: `run(ctx: StageContext) -> StageResult`.

A stage kind is a module under `pipeline/stages/` with that `run` function, registered with its config class in
`pipeline.registry`; `pipeline.runner` builds the context (the parents as `Artifact`s), calls `run` and turns the
result into an artifact (`pipeline.artifacts.commit_stage`). Nothing runs at import; it imports only the schema,
the registry, the recipe and the console, none of which import it back. `stage_context` builds one (the runner's, tests' and
benches' alike).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import registry, schema
from pipeline.console import Console
from pipeline.recipe import Recipe, resolve_ref


@dataclass
class Artifact:
    """A complete artifact folder and its manifest: what a stage receives of each parent (`ctx.parents`)."""

    path: Path
    manifest: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def produces(self) -> str:
        return self.manifest.get("produces", "causal-lm")

    @property
    def is_adapter(self) -> bool:
        return (self.path / "adapter_config.json").exists()


@dataclass
class StageResult:
    """What a stage's `run(ctx)` returns besides the files it wrote into `ctx.output_dir`."""

    metrics: dict[str, Any] = field(default_factory=dict)
    base_model: str | None = None
    datasets: list[str] = field(default_factory=list)
    held_out: dict[str, Any] | None = None  # rows held out of the training file (data.LoadedData.held_out)
    library_name: str = "transformers"
    pipeline_tag: str | None = "text-generation"
    tags: list[str] = field(default_factory=list)
    log_history: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    # Ancestors read by path rather than by `${stage}` (the artifact itself first, then its lineage); the runner adds
    # them to the manifest's and the card's lineage after the parents' own.
    lineage: list[dict[str, Any]] = field(default_factory=list)
    card_text: str | None = None  # markdown for the model card, before its Usage section


@dataclass
class StageContext:
    """Everything a stage needs: its config, where to write, its parents' artifacts, the process state."""

    name: str
    config: schema.StageBase
    recipe: Recipe
    output_dir: Path  # temporary artifact folder; the runner moves it into place
    work_dir: Path  # checkpoints that survive a crash, deleted once the artifact is complete
    parents: dict[str, Artifact]
    seed: int
    state: Any  # accelerate.PartialState (its num_processes, process_index, is_main_process)
    attempts: Any = None  # this stage's pipeline.attempts.AttemptLog: training stages report resumes and checkpoints
    console: Console = field(default_factory=Console.silent)  # the person's terminal: progress and a few lines

    def resolve(self, value: str | None) -> str | None:
        """`${stage}` -> that stage's artifact folder (absolute); other values unchanged."""
        resolved = resolve_ref(value, self.recipe)
        if resolved and value and value.startswith("${"):
            return str(Path(resolved).resolve())
        return resolved

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    @property
    def traits(self) -> registry.StageKind:
        """This stage's kind as registered: its data shape, live figures and the rest (`pipeline.registry`)."""
        return registry.traits(self.config.kind)



def stage_context(recipe: Recipe, name: str, *, output_dir: Path, work_dir: Path, state: Any = None,
                  parents: dict[str, Artifact] | None = None, attempts: Any = None,
                  console: Console | None = None) -> StageContext:
    """The one way a StageContext is built: by the runner for each stage it runs, and by tests and benches that
    call a stage's parts directly. `state` defaults to this process's `accelerate.PartialState`; `console` to a
    silent one."""
    if state is None:
        from accelerate import PartialState

        state = PartialState()
    return StageContext(name=name, config=recipe.stages[name], recipe=recipe, output_dir=Path(output_dir),
                        work_dir=Path(work_dir), parents=dict(parents or {}), seed=recipe.stage_seed(name),
                        state=state, attempts=attempts, console=console or Console.silent())
