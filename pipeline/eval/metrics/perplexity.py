"""`perplexity` metric: token-weighted perplexity of held-out reference completions given their prompts (chat or
preference data, chosen answers), or of plain text: exp(sum nll / sum tokens), from per-text summed negative
log-likelihoods and token counts.

`measure(...)` runs it on a model (`pipeline eval --metric perplexity`, the `evaluate` stage); the `evaluate` module
below holds the formula, loaded by path, offline: `evaluate.load(str(pipeline.eval.metrics.path("perplexity")))`,
then `metric.compute(predictions=nll_sums, references=token_counts)` -> {"perplexity", "loss"}. Nothing runs at import.
"""
import math

import datasets
import evaluate

from pipeline.eval import heldout, measures, metrics

ROLE = "policy"  # the artifact is loaded as a causal LM
KEYS = {"perplexity": "perplexity", "loss": "eval_loss"}  # computed value -> key in the manifest's `evaluation`
TASK = ("text-generation", "Held-out perplexity")  # the Hub model-index task


def measure(model, tokenizer, section, spec, batch_size: int = 8) -> dict[str, float]:
    """Perplexity and mean loss of `section`'s held-out rows (at most `spec.limit`)."""
    prompts, completions = heldout.conversations(section, spec.limit, ("sft", "preference", "text"))
    if completions is not None:
        logps = measures.completion_logprobs(model, tokenizer, prompts, completions, batch_size)
        counts = [len(tokenizer(measures.render(tokenizer, p, c)[1], add_special_tokens=False)["input_ids"])
                  for p, c in zip(prompts, completions)]
        nll = [-lp for lp in logps]
    else:
        texts = prompts["text"]
        counts = [max(len(tokenizer(t)["input_ids"]) - 1, 0) for t in texts]
        nll = [measures.lm_loss(model, tokenizer, [t], 1) * n for t, n in zip(texts, counts)]
    return metrics.load("perplexity").compute(predictions=nll, references=counts)


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
