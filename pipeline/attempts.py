"""The attempts of one stage: the step each one resumed from and how long it ran, kept in the stage's work folder
(`OUTPUT/.work/<stage>-<fp>/attempts.json`, rewritten atomically) so that an attempt killed by SIGKILL still counts
up to its last checkpoint.

The runner starts an attempt before the stage runs and finishes it before writing the manifest; a training stage
reports the step it resumed from (`resumed_from`) and each checkpoint it saves (`progress`). Only the main process
writes the file. Nothing runs at import.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from pipeline.artifacts import write_json_atomic

FILE = "attempts.json"


class AttemptLog:
    """The attempt records of one stage's work folder; the last record is the running attempt."""

    def __init__(self, work_dir: Path, write: bool = True, clock: Callable[[], float] = time.time):
        self.path = Path(work_dir) / FILE
        self.write = write
        self.clock = clock
        self.records: list[dict[str, Any]] = []
        self._started: float | None = None

    def start(self) -> None:
        """Append a record for a new attempt after those of earlier (killed) attempts. Its `resumed_from_step` is
        the last checkpoint the earlier attempts recorded, until the stage says where it really resumed."""
        self.records = self._read()
        self._started = self.clock()
        self.records.append({"started_at": _timestamp(self._started), "resumed_from_step": self._last_saved_step(),
                             "duration_s": 0.0, "last_checkpoint_step": None})
        self._save()

    def resumed_from(self, step: int) -> None:
        """The running attempt continues from `step` (0: a fresh start)."""
        self.records[-1]["resumed_from_step"] = int(step)
        self._save()

    def progress(self, step: int) -> None:
        """A checkpoint of `step` is saved: the running attempt's time so far counts even if it is killed later."""
        self.records[-1]["last_checkpoint_step"] = int(step)
        self._tick()

    def finish(self) -> dict[str, Any]:
        """Close the running attempt; the manifest fields `attempts`, `duration_s` (all attempts) and
        `last_attempt_duration_s`."""
        self._tick()
        return {"duration_s": round(sum(r["duration_s"] for r in self.records), 3),
                "last_attempt_duration_s": self.records[-1]["duration_s"],
                "attempts": [dict(r) for r in self.records]}

    def _tick(self) -> None:
        self.records[-1]["duration_s"] = round(self.clock() - self._started, 3)
        self._save()

    def _last_saved_step(self) -> int:
        return max((max(r.get("resumed_from_step") or 0, r.get("last_checkpoint_step") or 0) for r in self.records),
                   default=0)

    def _read(self) -> list[dict[str, Any]]:
        try:
            records = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return []
        return [r for r in records if isinstance(r, dict)] if isinstance(records, list) else []

    def _save(self) -> None:
        if self.write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, self.records)


def _timestamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
