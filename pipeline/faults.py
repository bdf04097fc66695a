"""Faults on request, for the crash and divergence tests: environment variables that make a stage's process die
after a given step, or its logged loss turn NaN, so that resuming and the NaN guard can be tested end to end.

    PIPELINE_TEST_KILL_AT=<stage>:<step>   SIGKILL the process after that optimizer step (after its checkpoint)
    PIPELINE_TEST_NAN_AT=<stage>:<step>    report a NaN loss from that step on

Unset (always, outside tests) every hook here is None. Used by `pipeline.course` and `pipeline.training`; nothing
runs at import.
"""
from __future__ import annotations

import os
import signal

KILL_HOOK = "PIPELINE_TEST_KILL_AT"  # "<stage>:<step>": SIGKILL this process after that optimizer step (tests only)
NAN_HOOK = "PIPELINE_TEST_NAN_AT"  # "<stage>:<step>": report a NaN loss from that step on (tests only)


def kill_hook(stage: str):
    """For Trainer stages, a callback that SIGKILLs the process after the log line of step N of `stage`, or of a
    later step, that saved no checkpoint, when PIPELINE_TEST_KILL_AT asks (crash tests); after a checkpoint,
    `kill_after_checkpoint` (the course's checkpoint hook) kills it."""
    wanted = os.environ.get(KILL_HOOK, "")
    name, _, step = wanted.rpartition(":")
    if name != stage or not step.isdigit():
        return None
    from transformers import TrainerCallback

    class KillAt(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.global_step >= int(step) and state.global_step % args.save_steps:
                os.kill(os.getpid(), signal.SIGKILL)

    return KillAt()


def kill_after_checkpoint(stage: str):
    """For every training loop (`pipeline.course.Hooks.checkpoint`): a function(step) that SIGKILLs this process
    once the checkpoint of step N of `stage` or a later one is written, when PIPELINE_TEST_KILL_AT asks (crash
    tests); None otherwise."""
    name, _, step = os.environ.get(KILL_HOOK, "").rpartition(":")
    if name != stage or not step.isdigit():
        return None

    def kill(saved_step: int) -> None:
        if saved_step >= int(step):
            os.kill(os.getpid(), signal.SIGKILL)

    return kill


def nan_hook(stage: str):
    """A callback that turns the logged loss into NaN from step N of `stage` (PIPELINE_TEST_NAN_AT, tests only)."""
    name, _, step = os.environ.get(NAN_HOOK, "").rpartition(":")
    if name != stage or not step.isdigit():
        return None
    from transformers import TrainerCallback

    class NanAt(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is not None and "loss" in logs and state.global_step >= int(step):
                logs["loss"] = float("nan")

    return NanAt()
