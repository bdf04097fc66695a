"""`win_rate` metric: greedy answers of a policy and of a reference policy to the same held-out prompts, both judged
by a reward model (`judge:`, or its older name `reward_model:`); a win counts 1, a tie (equal within `tolerance`)
counts 1/2, a loss 0. `judge_record` says which reward model judged and whether the policy was trained against it
(its own PPO/GRPO/RLOO reward model, or one of an ancestor stage's), for the manifests and the run report.

`measure(...)` runs it (`pipeline eval --metric win_rate --reward-model DIR --reference DIR`, the `evaluate` stage);
the `evaluate` module below holds the formula, loaded by path, offline:
`evaluate.load(str(pipeline.eval.metrics.path("win_rate")))`; then
`metric.compute(predictions=policy_scores, references=reference_scores, tolerance=0.0)`. Nothing runs at import.
"""
from pathlib import Path

import datasets
import evaluate

from pipeline import artifacts, schema
from pipeline.eval import heldout, measures, metrics

ROLE = "policy"
KEYS = {"win_rate": "win_rate"}
TASK = ("text-generation", "Win rate vs reference")


def judge_of(spec) -> str | None:
    """The reward model that judges: `judge`, else `reward_model`."""
    return spec.judge or spec.reward_model


def keys(spec) -> dict[str, str]:
    """`KEYS`, or with `judge:` set `win_rate_by_<judge's name>`, so win rates under several judges of one policy
    are kept side by side in its manifest."""
    return {"win_rate": f"win_rate_by_{Path(spec.judge.rstrip('/')).name}"} if spec.judge else KEYS


def trained_against(path: str) -> list[str]:
    """The reward models the policy at `path` was trained against: the `reward_model` of its stage and of every
    stage it was built from (PPO, GRPO, RLOO), as resolved folders, read from the artifacts' manifests."""
    found, seen, todo = [], set(), [str(path)]
    while todo:
        folder = str(Path(todo.pop()).resolve())
        artifact = None if folder in seen else artifacts.open_artifact(folder)
        seen.add(folder)
        if artifact is None:
            continue
        reward = (artifact.manifest.get("config") or {}).get("reward_model")
        if isinstance(reward, str):
            match = schema.REF_PATTERN.match(reward)
            named = (artifact.manifest.get("resolved_references") or {}).get(match.group(1)) if match else reward
            found.append(str(Path(named or reward).resolve()))
        todo += [parent["path"] for parent in artifact.manifest.get("parents", []) if parent.get("path")]
    return found


def judge_record(path: str, spec) -> dict:
    """Which reward model judged the policy at `path`, and whether the policy was trained against it."""
    judge = judge_of(spec)
    return {"path": judge, "is_policy_reward_model": str(Path(judge).resolve()) in trained_against(path)}


def from_scores(policy: list[float], reference: list[float], tolerance: float = 0.0) -> dict[str, float]:
    """Wins count 1, ties (within `tolerance`) 1/2, losses 0."""
    return metrics.load("win_rate").compute(predictions=policy, references=reference, tolerance=tolerance)


def measure(model, tokenizer, section, spec, batch_size: int = 16) -> dict[str, float]:
    """The policy against `spec.reference`, both answering greedily, judged by `judge_of(spec)`."""
    prompts, completions = heldout.conversations(section, spec.limit, ("sft", "preference", "prompts"))
    prompts = prompts["prompt"] if completions is None else prompts
    ours = measures.generate(model, tokenizer, prompts, max_new_tokens=spec.max_new_tokens, batch_size=batch_size)
    ref_model, ref_tokenizer = heldout.policy_from(spec.reference)
    theirs = measures.generate(ref_model, ref_tokenizer, prompts, max_new_tokens=spec.max_new_tokens,
                               batch_size=batch_size)
    del ref_model
    judge, judge_tokenizer = heldout.judge_from(judge_of(spec))
    as_turn = lambda texts: [[{"role": "assistant", "content": t}] for t in texts]  # noqa: E731
    ours_scores = measures.reward_scores(judge, judge_tokenizer, prompts, as_turn(ours), batch_size)
    theirs_scores = measures.reward_scores(judge, judge_tokenizer, prompts, as_turn(theirs), batch_size)
    return from_scores(ours_scores, theirs_scores)


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
