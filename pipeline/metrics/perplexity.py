"""`perplexity` metric as a local `evaluate` module: perplexity from per-text summed negative log-likelihoods and
token counts (token-weighted: exp(sum nll / sum tokens)), so it needs no model of its own.

Loaded by path, offline: `evaluate.load(str(pipeline.metrics.path("perplexity")))`; then
`metric.compute(predictions=nll_sums, references=token_counts)` -> {"perplexity", "loss"}. Nothing runs at import.
"""
import math

import datasets
import evaluate


class Perplexity(evaluate.Metric):
    """predictions = summed NLL per text (nats), references = its number of predicted tokens."""

    def _info(self):
        return evaluate.MetricInfo(
            description="Token-weighted perplexity from summed negative log-likelihoods.",
            citation="", inputs_description="predictions: summed NLL per text; references: token counts",
            features=datasets.Features({"predictions": datasets.Value("float64"),
                                        "references": datasets.Value("int64")}))

    def _compute(self, predictions, references):
        loss = sum(predictions) / max(sum(references), 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
