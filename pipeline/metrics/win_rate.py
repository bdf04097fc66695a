"""`win_rate` metric as a local `evaluate` module: a policy's judged scores against a reference policy's on the
same prompts; a win counts 1, a tie (equal within `tolerance`) counts 1/2, a loss 0.

Loaded by path, offline: `evaluate.load(str(pipeline.metrics.path("win_rate")))`; then
`metric.compute(predictions=policy_scores, references=reference_scores, tolerance=0.0)`. Nothing runs at import.
"""
import datasets
import evaluate


class WinRate(evaluate.Metric):
    """predictions = policy scores, references = reference-policy scores."""

    def _info(self):
        return evaluate.MetricInfo(
            description="Win rate of a policy over a reference judged by scores; ties count half.",
            citation="", inputs_description="predictions: policy scores; references: reference scores",
            features=datasets.Features({"predictions": datasets.Value("float64"),
                                        "references": datasets.Value("float64")}))

    def _compute(self, predictions, references, tolerance: float = 0.0):
        wins = ties = 0
        for policy, reference in zip(predictions, references):
            if abs(policy - reference) <= tolerance:
                ties += 1
            elif policy > reference:
                wins += 1
        n = max(len(predictions), 1)
        return {"win_rate": (wins + 0.5 * ties) / n, "wins": wins, "ties": ties,
                "losses": len(predictions) - wins - ties}
