"""`exact_match` metric: greedy answers to held-out prompts, the share whose checkable answer (the last integer in
the text, else the stripped text) equals the reference answer, as `pipeline.eval.answers` checks it.

`measure(...)` runs it on a model (`pipeline eval --metric exact_match`, the `evaluate` stage); the `evaluate` module
below holds the formula, loaded by path, offline: `evaluate.load(str(pipeline.eval.metrics.path("exact_match")))`;
then `metric.compute(predictions=[...], references=[...])` -> {"exact_match": float}. Nothing runs at import.
"""
import datasets
import evaluate

from pipeline.errors import PipelineError
from pipeline.eval import answers, heldout, measures, metrics

ROLE = "policy"
KEYS = {"exact_match": "exact_match"}
TASK = ("text-generation", "Task accuracy (exact match)")


def measure(model, tokenizer, section, spec, batch_size: int = 16) -> dict[str, float]:
    """Greedy answers (at most `spec.max_new_tokens`) to held-out prompts, scored by exact match of the last number."""
    found = heldout.answers_of(section, spec.limit)
    if found is None:
        raise PipelineError(f"{heldout.source_name(section)} has no checkable answers", key="data",
                            fix="use prompt/answer rows (e.g. data/prompts_eval.jsonl)")
    prompts, references = found
    predictions = measures.generate(model, tokenizer, prompts, max_new_tokens=spec.max_new_tokens,
                                    batch_size=batch_size)
    return metrics.load("exact_match").compute(predictions=predictions, references=[str(a) for a in references])


class ExactMatch(evaluate.Metric):
    """Exact match of extracted answers."""

    def _info(self):
        return evaluate.MetricInfo(
            description="Share of predictions whose last integer (or stripped text) equals the reference.",
            citation="", inputs_description="predictions: list of str; references: list of str",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references):
        return {"exact_match": answers.exact_match(predictions, references)}
