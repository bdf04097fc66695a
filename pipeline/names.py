"""The names in the registries that the recipe schema checks keys against, kept in a leaf so the schema imports
nothing above it: the metrics of `pipeline.eval.metrics` (`metric:`), the rule rewards of `pipeline.rl.rewards`
(`rewards[].type`), the tools of `pipeline.rl.tools` (`tools:`) and the data formats of `pipeline.data.FORMATS`
(`data.format`). Each registry is built on these names (tests/test_schema.py checks they agree), so a new metric is
its file plus its name here, and a new rule its function plus its name here and in `RULES`.

Pure data; nothing runs at import.
"""
from __future__ import annotations

METRICS = ("exact_match", "pairwise_accuracy", "win_rate", "perplexity")
TOOLS = ("calculator",)
REWARD_RULES = ("exact_match", "contains_answer", "length_penalty", "math_verify", "format", "code_tests")
DATA_FORMATS = ("text", "messages", "prompt-completion", "hh-rlhf", "alpaca", "sharegpt", "preference",
                "ultrafeedback", "sharegpt-preference", "prompt-answer", "kto-unpaired")
