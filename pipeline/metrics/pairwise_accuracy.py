"""`pairwise_accuracy` metric as a local `evaluate` module: given reward scores of chosen and rejected answers,
the share of pairs where chosen scores strictly higher, and the mean margin (chosen - rejected).

Loaded by path, offline: `evaluate.load(str(pipeline.metrics.path("pairwise_accuracy")))`; then
`metric.compute(predictions=chosen_scores, references=rejected_scores)`. Nothing runs at import.
"""
import datasets
import evaluate


class PairwiseAccuracy(evaluate.Metric):
    """predictions = chosen scores, references = rejected scores."""

    def _info(self):
        return evaluate.MetricInfo(
            description="Share of preference pairs where the chosen answer's score beats the rejected one's.",
            citation="", inputs_description="predictions: chosen scores; references: rejected scores",
            features=datasets.Features({"predictions": datasets.Value("float64"),
                                        "references": datasets.Value("float64")}))

    def _compute(self, predictions, references):
        n = max(len(predictions), 1)
        wins = sum(c > r for c, r in zip(predictions, references))
        margin = sum(c - r for c, r in zip(predictions, references))
        return {"pairwise_accuracy": wins / n, "margin": margin / n}
