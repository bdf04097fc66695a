"""`exact_match` metric as a local `evaluate` module: the share of predictions whose checkable answer (the last
integer in the text, else the stripped text) equals the reference answer.

Loaded by path, offline: `evaluate.load(str(pipeline.metrics.path("exact_match")))`; then
`metric.compute(predictions=[...], references=[...])` -> {"exact_match": float}. Nothing runs at import.
"""
import re

import datasets
import evaluate

_NUMBER = re.compile(r"-?\d+")


def extract_answer(text: str) -> str:
    """The last integer in `text`, else the stripped text."""
    found = _NUMBER.findall(text)
    return found[-1] if found else text.strip()


class ExactMatch(evaluate.Metric):
    """Exact match of extracted answers."""

    def _info(self):
        return evaluate.MetricInfo(
            description="Share of predictions whose last integer (or stripped text) equals the reference.",
            citation="", inputs_description="predictions: list of str; references: list of str",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references):
        hits = [extract_answer(p) == str(r).strip() for p, r in zip(predictions, references)]
        return {"exact_match": sum(hits) / max(len(hits), 1)}
