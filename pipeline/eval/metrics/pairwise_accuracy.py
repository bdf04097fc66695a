"""`pairwise_accuracy` metric: given a reward model's scores of chosen and rejected answers to held-out prompts, the
share of pairs where chosen scores strictly higher, and the mean margin (chosen - rejected).

`measure(...)` runs it on a reward model (`pipeline eval --metric pairwise_accuracy`, the `evaluate` stage); the
`evaluate` module below holds the formula, loaded by path, offline:
`evaluate.load(str(pipeline.eval.metrics.path("pairwise_accuracy")))`; then
`metric.compute(predictions=chosen_scores, references=rejected_scores)`. Nothing runs at import.
"""
import datasets
import evaluate

from pipeline.eval import heldout, measures, metrics

ROLE = "judge"  # the artifact is loaded as a reward model
KEYS = {"pairwise_accuracy": "pairwise_accuracy", "margin": "reward_margin"}
TASK = ("text-classification", "Reward pairwise accuracy")


def measure(model, tokenizer, section, spec, batch_size: int = 16) -> dict[str, float]:
    """Share of held-out preference pairs the reward model orders correctly, and the mean margin."""
    rows = heldout.read_eval_rows(section, "preference", spec.limit)
    chosen = measures.reward_scores(model, tokenizer, rows["prompt"], rows["chosen"], batch_size)
    rejected = measures.reward_scores(model, tokenizer, rows["prompt"], rows["rejected"], batch_size)
    return metrics.load("pairwise_accuracy").compute(predictions=chosen, references=rejected)


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
