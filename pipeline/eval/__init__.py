"""Evaluation: one home for every measurement of a model.

- `answers`: the one answer check (extract the checkable answer, compare), used by the exact-match metric, the
  stages' held-out exact match and the rule rewards alike.
- `measures`: batched measurements on held-out data (log-probs, reward scores, loss, greedy answers).
- `metrics/`: one file per metric of `pipeline eval` and the `evaluate` stage, registered in `metrics.METRICS`.
- `evals`: run a list of `evals:` on an artifact and record the results in its manifest and model card.
- `summary`: a stage's before -> after pairs read from its metrics (console line, report).

Nothing runs at import.
"""
