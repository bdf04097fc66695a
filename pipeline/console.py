"""What a person sees while a recipe runs: per stage one header line, one progress display with the figures that
matter for its kind (loss and learning rate; reward, KL and episodes/s for PPO, GRPO and RLOO) and one summary line
with the held-out measures before -> after. Library chatter (the trainers' raw log dicts, warnings, load reports,
dataset and shard-writing progress bars) goes to the stage's train.log instead (`capture`), and to the terminal too
with `python -m pipeline run -v`.

On a terminal the progress display is a bar redrawn in place; in CI, a pipe or a file it is a plain line at every
tenth of the stage. Used by pipeline.runner, pipeline.training and pipeline.rl.trainer; nothing runs at import.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

LOG_NAME = "train.log"


def is_interactive(stream) -> bool:
    """A terminal that can redraw a bar: not a pipe or a file, and not a CI job (CI set)."""
    try:
        tty = bool(stream.isatty())
    except (AttributeError, ValueError):
        tty = False
    return tty and not os.environ.get("CI")


def columns(stream, fallback: int = 100) -> int:
    """The terminal's width; `fallback` when it reports none (0 columns, as a pseudo-terminal may)."""
    try:
        width = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        width = 0
    return width if width > 0 else fallback


def figures(wanted: Iterable[tuple[str, str]], logs: dict[str, Any]) -> dict[str, float]:
    """The `wanted` figures ((log key, label) pairs: a stage kind's `registry.StageKind.figures`) found in one log
    entry, by label."""
    return {label: logs[key] for key, label in wanted
            if isinstance(logs.get(key), (int, float)) and not isinstance(logs.get(key), bool)}


def log_name(process_index: int) -> str:
    """train.log for the main process, train.rank<N>.log for the others."""
    return LOG_NAME if process_index == 0 else f"train.rank{process_index}.log"


@dataclass
class Console:
    """Where the person running the recipe reads (the process's stdout when the run started). `enabled` is False on
    ranks other than the main one: they show nothing."""

    stream: Any
    interactive: bool = False
    verbose: bool = False
    enabled: bool = True
    active: list = field(default_factory=list)  # progress displays still open

    @classmethod
    def for_process(cls, verbose: bool = False, main: bool = True) -> "Console":
        return cls(stream=sys.stdout, interactive=is_interactive(sys.stdout), verbose=verbose, enabled=main)

    @classmethod
    def silent(cls) -> "Console":
        """A console that shows nothing (a stage context built outside a run, in tests and benches)."""
        return cls(stream=sys.stdout, enabled=False)

    def say(self, message: str) -> None:
        if self.enabled:
            print(message, file=self.stream, flush=True)

    def progress(self, total: int, desc: str, initial: int = 0, episodes_per_step: int | None = None) -> "Progress":
        display = Progress(self, total, desc, initial, episodes_per_step)
        self.active.append(display)
        return display

    def close_progress(self) -> None:
        """Close what a stage left open (it failed mid-way), so the next line starts clean."""
        for display in self.active:
            display.close()
        self.active.clear()


class Progress:
    """One stage's progress: `update(step, figures)` as training goes, `close()` at the end. On a terminal a tqdm bar
    with the latest figures; otherwise a plain line each time a tenth of the steps is done (and at the end), naming
    the step its figures come from when that is an earlier one (figures arrive every `logging_steps`)."""

    def __init__(self, console: Console, total: int, desc: str, initial: int = 0,
                 episodes_per_step: int | None = None):
        self.console, self.total, self.desc = console, max(int(total), 1), desc
        self.step, self.shown, self.pending, self.closed = initial, {}, None, False
        self.shown_at = initial  # the step the figures in `shown` were last reported at
        self.episodes_per_step, self.start_step, self.started = episodes_per_step, initial, time.perf_counter()
        self.next_mark = self._mark_after(initial)
        self.bar = None
        if console.enabled and console.interactive:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=initial, desc=f"  {desc}", file=console.stream,
                            ncols=columns(console.stream), leave=True)

    def _mark_after(self, step: int) -> float:
        tenth = self.total / 10
        return min(self.total, (math.floor(step / tenth + 1e-9) + 1) * tenth)

    def update(self, step: int, shown: dict[str, float] | None = None) -> None:
        """Progress to optimizer step `step`; `shown` updates the figures (several calls may report one step)."""
        if self.pending is not None and step != self.pending:
            self._print_line()
        self.step = step
        if shown:
            self.shown.update(shown)
            self.shown_at = step
        if self.bar is not None:
            self.bar.set_postfix_str(self.text(), refresh=False)
            self.bar.update(max(0, step - self.bar.n))
        elif self.console.enabled and step >= self.next_mark:
            self.pending, self.next_mark = step, self._mark_after(step)

    def text(self) -> str:
        parts = [f"{label} {value:.4g}" for label, value in self.shown.items()]
        elapsed = time.perf_counter() - self.started
        if self.episodes_per_step and self.step > self.start_step and elapsed > 0:
            parts.append(f"episodes/s {(self.step - self.start_step) * self.episodes_per_step / elapsed:.3g}")
        return "  ".join(parts)

    def _print_line(self) -> None:
        text = self.text()
        if self.shown and self.shown_at < self.step:
            text += f"  (figures of step {self.shown_at})"
        self.console.say(f"  {self.desc} {self.step}/{self.total}" + (f"  {text}" if text else ""))
        self.pending = None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.pending is not None:
            self._print_line()
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------------- capture


class _Redirect:
    """Stands in for sys.stdout or sys.stderr while a stage runs: text goes to the stage's log (and, echoing, to
    the stream it replaced). Released after the stage, it forwards to that stream, so a logging handler created
    meanwhile keeps working."""

    def __init__(self, log, original, echo: bool):
        self.log, self.original, self.echo = log, original, echo

    def write(self, text: str) -> int:
        if self.log is not None:
            self.log.write(text)
        if (self.echo or self.log is None) and not self.original.closed:
            self.original.write(text)
        return len(text)

    def flush(self) -> None:
        if self.log is not None:
            self.log.flush()
        if not self.original.closed:  # a handler may outlive the stream it was made on (a test's captured one)
            self.original.flush()

    def isatty(self) -> bool:
        return self.original.isatty() if self.log is None else False

    def fileno(self) -> int:
        return (self.original if self.log is None else self.log).fileno()

    def writable(self) -> bool:
        return True

    def release(self) -> None:
        self.log, self.echo = None, False

    def __getattr__(self, name: str):
        return getattr(self.original, name)


def _console_handlers(streams: tuple) -> list[logging.StreamHandler]:
    """Logging handlers (root's, transformers', datasets'...) that print to the terminal or to a stage redirect."""
    loggers = [logging.getLogger()] + [item for item in logging.Logger.manager.loggerDict.values()
                                       if isinstance(item, logging.Logger)]
    found: dict[int, logging.StreamHandler] = {}
    for logger in loggers:
        for handler in logger.handlers:
            follows_stderr = isinstance(getattr(type(handler), "stream", None), property)  # logging.lastResort
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) and \
                    not follows_stderr and (any(handler.stream is s for s in streams)
                                            or isinstance(handler.stream, _Redirect)):
                found[id(handler)] = handler
    return list(found.values())


def _pipeline_to_terminal(stream) -> logging.Handler:
    """The pipeline's own warnings still reach the terminal while a stage's other logging goes to its log."""
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.getLogger("pipeline").addHandler(handler)
    return handler


def _show_warning(log, echo):
    """A `warnings.showwarning` that writes to the stage's log (and to `echo`, the terminal, with -v)."""
    def show(message, category, filename, lineno, file=None, line=None):
        text = warnings.formatwarning(message, category, filename, lineno, line)
        log.write(text)
        if echo is not None:
            echo.write(text)

    return show


def _record_failure(log, exc: BaseException, path: Path) -> None:
    """The whole traceback into the log; the exception learns where it is (`log_path`) for the one-line error."""
    log.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    try:
        exc.log_path = str(path)
    except AttributeError:  # an exception type that takes no attributes
        pass


@contextmanager
def capture(path: Path, console: Console):
    """While a stage runs, send what libraries print (stdout, stderr, logging handlers on the terminal, warnings)
    to `path`, appended across attempts; with `console.verbose` to the terminal too. Everything is put back on exit,
    also on error (the traceback is written to the log first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a", encoding="utf-8", errors="replace", buffering=1)
    saved = sys.stdout, sys.stderr
    out, err = _Redirect(log, saved[0], console.verbose), _Redirect(log, saved[1], console.verbose)
    moved = [(h, h.stream) for h in _console_handlers(saved + (sys.__stdout__, sys.__stderr__))]
    for handler, _ in moved:
        handler.setStream(err)
    shown = None if console.verbose else _pipeline_to_terminal(saved[1])
    sys.stdout, sys.stderr = out, err
    try:
        with warnings.catch_warnings():  # each stage's log gets its own warnings; filters come back afterwards
            warnings.showwarning = _show_warning(log, saved[1] if console.verbose else None)
            yield log
    except BaseException as exc:
        _record_failure(log, exc, path)
        raise
    finally:
        console.close_progress()
        sys.stdout, sys.stderr = saved
        for handler, stream in moved:
            handler.setStream(stream)
        if shown is not None:
            logging.getLogger("pipeline").removeHandler(shown)
        out.release()
        err.release()
        log.close()
