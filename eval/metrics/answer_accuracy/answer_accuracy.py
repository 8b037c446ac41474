"""Answer accuracy: normalised exact match between a generated short answer and the reference answer.

An ``evaluate`` metric module shipped with hf-kan (load it with ``hf_kan.eval.metrics.load_metric("answer_accuracy")``
or ``evaluate.load(<path of this folder>)``; the Hub's metric scripts cannot be downloaded offline).

Both strings are normalised: lower-cased, surrounding whitespace and punctuation removed, inner whitespace collapsed
to single spaces. A prediction scores 1 when its normalised form equals the normalised reference, else 0;
``answer_accuracy`` is the mean score. With ``return_scores=True`` the per-sample scores are returned as ``scores``.
"""

import re
import string

import datasets
import evaluate

_CITATION = ""

_DESCRIPTION = __doc__

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated answers.
    references (list of str): reference answers.
    return_scores (bool): also return the per-sample 0/1 scores (default False).
Returns:
    answer_accuracy (float): mean of the per-sample scores (0.0 for no samples).
    scores (list of int): per-sample scores, only with return_scores=True.
Examples:
    >>> metric = evaluate.load("path/to/answer_accuracy")
    >>> metric.compute(predictions=["Seven.", "3"], references=["seven", "4"])
    {'answer_accuracy': 0.5}
"""

_SPACES = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Lower-case, strip surrounding whitespace and punctuation, collapse inner whitespace."""
    return _SPACES.sub(" ", str(text).lower()).strip().strip(string.punctuation + " ").strip()


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class AnswerAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, return_scores=False):
        scores = [int(normalize_answer(p) == normalize_answer(r)) for p, r in zip(predictions, references)]
        result = {"answer_accuracy": sum(scores) / len(scores) if scores else 0.0}
        if return_scores:
            result["scores"] = scores
        return result
