"""Stage modules: one per stage kind, each exposing `run(ctx) -> StageResult`; see `pipeline.registry`."""
