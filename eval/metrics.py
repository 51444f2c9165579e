"""Metrics: SQuAD-normalised EM/F1, answer survival, ROUGE-L, rate adherence."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    return max((float(normalize_answer(prediction) == normalize_answer(a)) for a in answers), default=0.0)


def _f1(prediction: str, answer: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if not pred or not gold:
        return float(pred == gold)
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, answers: Sequence[str]) -> float:
    """Token F1 against the best-matching answer."""
    return max((_f1(prediction, a) for a in answers), default=0.0)


def answer_survival(text: str, answers: Sequence[str]) -> float:
    """1.0 when any gold answer still occurs in `text` (after normalisation), else 0.0."""
    norm = f" {normalize_answer(text)} "
    return float(any(f" {normalize_answer(a)} " in norm for a in answers if normalize_answer(a)))


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure (rouge-score, stemmed) against the best reference."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return max((scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references), default=0.0)


def rate_error(requested: float, achieved: float) -> float:
    """Achieved minus requested rate (positive: kept more than asked)."""
    return achieved - requested


def paired_bootstrap_ci(differences: Sequence[float], *, seed: int = 0, num_resamples: int = 2000,
                        level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of per-question paired differences (method minus baseline)."""
    return ratio_bootstrap_ci(differences, [1.0] * len(differences), seed=seed, num_resamples=num_resamples,
                              level=level)


def ratio_bootstrap_ci(numerators: Sequence[float], denominators: Sequence[float], *,
                       baseline: tuple[Sequence[float], Sequence[float]] | None = None, seed: int = 0,
                       num_resamples: int = 2000, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI, over questions, of a pooled ratio sum(num) / sum(den) (e.g. supporting-sentence
    recall); with `baseline` (its numerators and denominators on the same questions), of the paired difference."""
    import numpy as np

    num, den = np.asarray(numerators, dtype=float), np.asarray(denominators, dtype=float)
    if num.size == 0 or num.size != den.size:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, num.size, size=(num_resamples, num.size))
    stats = num[picks].sum(1) / np.maximum(den[picks].sum(1), 1e-12)
    if baseline is not None:
        bnum, bden = np.asarray(baseline[0], dtype=float), np.asarray(baseline[1], dtype=float)
        stats = stats - bnum[picks].sum(1) / np.maximum(bden[picks].sum(1), 1e-12)
    tail = (1.0 - level) / 2
    return (float(np.quantile(stats, tail)), float(np.quantile(stats, 1.0 - tail)))
