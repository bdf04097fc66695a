"""Run a recipe's stages in order: skip unchanged ones, write each artifact atomically, keep ranks in step.

Launched through `python -m pipeline run recipe.yaml` (one process) or `accelerate launch -m pipeline run ...`
(N processes: every rank trains, rank 0 alone writes artifacts, barriers separate stages). Nothing runs at import.
"""
from __future__ import annotations

import logging
import shutil
from typing import Any

from pipeline import artifacts, models, parallel, registry, schema, tracking
from pipeline.artifacts import Artifact, ArtifactWriter
from pipeline.attempts import AttemptLog
from pipeline.console import Console, capture, log_name
from pipeline.errors import PipelineError
from pipeline.eval import summary
from pipeline.recipe import Recipe
from pipeline.stage import StageContext, StageResult, stage_context
from pipeline.tools import hub
from pipeline.tools.report import write_report

log = logging.getLogger("pipeline")


def _partial_state():
    """The process state. Without CUDA, ask for CPU explicitly: `PartialState()` alone would make every torchrun /
    `accelerate launch --multi_gpu` rank a lone main process, all writing the same artifacts (trainers use CPU then
    too: trainer_kwargs sets use_cpu)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _barrier(state) -> None:
    if state.num_processes > 1:
        state.wait_for_everyone()


def fingerprinted(recipe: Recipe):
    """(stage, its config, its fingerprint, its complete artifact or None) for each stage in order, computed as the
    loop reaches it (so an artifact written by an earlier stage of the same run is seen)."""
    fingerprints: dict[str, str] = {}
    for name, config in recipe.stages.items():
        fingerprints[name] = stage_fingerprint(recipe, name, config, fingerprints)
        yield name, config, fingerprints[name], artifacts.open_artifact(recipe.output_dir / name)


def plan(recipe: Recipe, force: set[str] | None = None) -> list[tuple[str, str, str]]:
    """(stage, fingerprint, 'run' | 'skip') for each stage, without training: what `run` would do."""
    force = force or set()
    rows = []
    for name, _, fp, existing in fingerprinted(recipe):
        fresh = existing is not None and existing.fingerprint == fp and name not in force and "all" not in force
        rows.append((name, fp, "skip" if fresh else "run"))
    return rows


def stage_fingerprint(recipe: Recipe, name: str, config: schema.StageBase, fingerprints: dict[str, str]) -> str:
    parents = {p: fingerprints[p] for p in recipe.parents[name] if p in fingerprints}
    return artifacts.fingerprint(config.model_dump(mode="json"), parents, recipe.stage_seed(name))


def run_recipe(recipe: Recipe, force: set[str] | None = None, only: set[str] | None = None,
               verbose: bool = False, report: bool = True) -> dict[str, Artifact]:
    """Run (or skip) every stage; return the complete artifacts by stage name. Library output goes to each stage's
    train.log, and with `verbose` to the terminal too. `report`: write OUTPUT/report.*."""
    force = force or set()
    state, console = _start(recipe, force, only, verbose)
    done: dict[str, Artifact] = {}
    reused: set[str] = set()  # stages whose existing artifact this run reuses
    drift_warned = announced = False
    total = len(recipe.stages)
    stages = list(fingerprinted(recipe))
    needed = _needed_by(recipe, only)
    _check_only(recipe, only, needed, stages)
    for index, (name, config, fp, existing) in enumerate(stages, start=1):
        forced = name in force or "all" in force
        selected = only is None or name in only
        parallel.check_ranks_agree(state, f"stage '{name}' (fingerprint, artifact found)",
                                   [fp, existing is not None and existing.fingerprint], key=f"stages.{name}")
        if existing is not None and (not selected or (existing.fingerprint == fp and not forced)):
            console.say(f"[{index}/{total}] {name} ({config.kind}): up to date, skipped")
            done[name] = existing
            reused.add(name)
            continue
        if not selected:  # not needed by a selected stage (checked above): left for a later run
            console.say(f"[{index}/{total}] {name} ({config.kind}): not selected, not run")
            continue
        if not drift_warned:  # one line per run, the first time a stage builds on reused artifacts
            drift_warned = _warn_drift([done[p].manifest for p in recipe.parents[name] if p in reused], console)
        if not announced:
            _say_where(recipe, console)
            announced = True
        console.say(f"[{index}/{total}] {name} ({config.kind}): running")
        done[name] = _run_stage(recipe, name, config, fp, done, state, console)
        console.say(f"[{index}/{total}] {name}: {done_line(done[name].manifest)}")
    if state.is_main_process and report:
        _write_report(recipe)
    return done


def _needed_by(recipe: Recipe, only: set[str] | None) -> set[str]:
    """The stages the `only` stages build on, directly or not (none without `--only`)."""
    needed: set[str] = set()
    todo = list(only or ())
    while todo:
        for parent in recipe.parents[todo.pop()]:
            if parent not in needed:
                needed.add(parent)
                todo.append(parent)
    return needed


def _check_only(recipe: Recipe, only: set[str] | None, needed: set[str], stages) -> None:
    """With `--only`, before anything runs: every stage a selected stage builds on and that is not selected itself
    must have a complete artifact."""
    for name, _, _, existing in stages:
        if name in needed and name not in only and existing is None:  # `needed` is empty without --only
            raise PipelineError(f"stage '{name}' has no complete artifact yet", file=str(recipe.path),
                                key="--only", fix=f"run it first or add --only {name}")


def check_run(recipe: Recipe, force: set[str], only: set[str] | None) -> None:
    """What a run checks before it touches the output folder: the --force/--only names, the trackers' packages and
    the precisions (the run command calls it before taking the folder's lock, so a refused run writes nothing)."""
    unknown = (force - {"all"} - set(recipe.stages)) | ((only or set()) - set(recipe.stages))
    if unknown:
        raise PipelineError(f"no stage named {', '.join(sorted(unknown))}", file=str(recipe.path),
                            key="--force/--only", fix=f"use one of: {', '.join(recipe.stages)}")
    tracking.check_installed(recipe)
    models.check_precisions(recipe)


def _start(recipe: Recipe, force: set[str], only: set[str] | None, verbose: bool) -> tuple[Any, Console]:
    """Check the run (`check_run`), start the process state and the console, prepare the output folder (main
    process) and wait for every rank."""
    check_run(recipe, force, only)
    state = _partial_state()
    if state.num_processes > 1:
        print(f"[rank {state.process_index}/{state.num_processes}] {recipe.name}: {state.distributed_type}", flush=True)
    parallel.check_launch(recipe.header.parallelism, state, recipe_file=str(recipe.path))
    if state.is_main_process:
        recipe.output_dir.mkdir(parents=True, exist_ok=True)
        artifacts.recover_output_dir(recipe.output_dir, list(recipe.stages))
    _barrier(state)
    return state, Console.for_process(verbose, main=state.is_main_process)


def _warn_drift(manifests: list[dict[str, Any]], console: Console) -> bool:
    """One line when reused parents were built with other library versions; True if it was said."""
    drift = artifacts.version_drift(manifests)
    if drift:
        console.say(artifacts.version_drift_line(drift))
    return bool(drift)


def _write_report(recipe: Recipe) -> None:
    """OUTPUT/report.md and report.html (pipeline.tools.report); a failure here never fails the run."""
    try:
        path = write_report(recipe.output_dir, recipe.name)
        print(f"report: {path}", flush=True)
    except Exception as exc:  # noqa: BLE001 - the artifacts are done; the report is a convenience
        log.warning("could not write the run report: %s", exc)


def _say_where(recipe: Recipe, console: Console) -> None:
    """One line on where library output and tracker files go (none with -v or without trackers)."""
    used = sorted({t for name in recipe.stages for t in tracking.stage_trackers(recipe, name)})
    if not console.verbose:
        console.say(f"library output: {recipe.output_dir}/<stage>/train.log (-v shows it here)")
    if used:
        where = tracking.tracking_root(recipe)
        console.say(f"tracking: {', '.join(used)}" + (f" (tensorboard --logdir {where})" if "tensorboard" in used
                                                       else ""))


def done_line(manifest: dict[str, Any]) -> str:
    """'done in 12.3s[ over 2 attempts]: eval_loss 5.7 -> 0.48, train_loss 1.2' from a stage's manifest."""
    attempts = len(manifest.get("attempts", []))
    shown = summary.summary(manifest.get("metrics", {}))
    return (f"done in {manifest.get('duration_s', 0):.1f}s" + (f" over {attempts} attempts" if attempts > 1 else "")
            + (f": {shown}" if shown else ""))


def _run_stage(recipe: Recipe, name: str, config: schema.StageBase, fp: str, done: dict[str, Artifact],
               state, console: Console | None = None) -> Artifact:
    output_dir = recipe.output_dir
    writer = ArtifactWriter(output_dir, name, fp)
    if writer.pending_complete():  # finished before a crash, not yet moved into place
        if state.is_main_process:
            writer.promote()
        _barrier(state)
        return artifacts.open_artifact(output_dir / name)

    work_dir = output_dir / ".work" / f"{name}-{fp[:16]}"
    if state.is_main_process:
        writer.prepare()
        work_dir.mkdir(parents=True, exist_ok=True)
    _barrier(state)

    parents = {p: done[p] for p in recipe.parents[name]}
    attempts = AttemptLog(work_dir, write=state.is_main_process)
    console = console or Console.for_process(main=state.is_main_process)
    ctx = stage_context(recipe, name, output_dir=writer.tmp, work_dir=work_dir, parents=parents, state=state,
                        attempts=attempts, console=console)
    result, durations = _train(ctx)
    _barrier(state)

    if state.is_main_process:
        artifacts.commit_stage(writer, work_dir, recipe=recipe, name=name, config=config, parents=parents,
                               result=result, durations=durations, state=state)
        shutil.rmtree(work_dir, ignore_errors=True)
    _barrier(state)
    artifact = artifacts.open_artifact(output_dir / name)
    parallel.check_ranks_agree(state, f"the files of artifact '{name}'",
                               parallel.files_digest(artifact.path) if artifact else None, key=f"stages.{name}")
    if artifact is None:
        raise PipelineError(f"artifact for stage '{name}' is missing after it finished", file=str(recipe.path),
                            key=f"stages.{name}", fix="the output folder must be on a filesystem every rank shares")
    target = config.push_to_hub or _recipe_push_target(recipe, name)
    if target is not None and state.is_main_process:
        hub.push_artifact(artifact, target)
    return artifact


def _train(ctx: StageContext) -> tuple[StageResult, dict[str, Any]]:
    """Seed, then run the stage's module with its library output going to the work folder's train.log and its
    trackers' environment set; (its result, the attempt durations)."""
    with capture(ctx.work_dir / log_name(ctx.state.process_index), ctx.console), \
            tracking.environment(ctx.recipe, ctx.name):
        _seed_everything(ctx.seed)
        ctx.attempts.start()
        result: StageResult = registry.stage_module(ctx.config.kind).run(ctx)
        return result, ctx.attempts.finish()


def _recipe_push_target(recipe: Recipe, name: str) -> schema.HubTarget | None:
    """A recipe-level `push_to_hub` pushes every stage to one repo, one branch per stage."""
    target = recipe.header.push_to_hub
    if target is None:
        return None
    return target.model_copy(update={"revision": target.revision or name})


def _seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


