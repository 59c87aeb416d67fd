"""Answer metrics: exact match, VQA accuracy, and BLEU-4 for captions.

Answers are normalised the VQA way (lower case, punctuation and articles removed, spaces
collapsed) before comparison.
"""

from __future__ import annotations

import collections
import math
import re

_PUNCT = re.compile(r"[^\w\s]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    text = _PUNCT.sub(" ", text.lower())
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers) -> float:
    """1 if the prediction equals any reference answer (normalised)."""
    p = normalize(prediction)
    return float(any(p == normalize(a) for a in answers))


def vqa_accuracy(prediction: str, answers) -> float:
    """VQA's min(#matching human answers / 3, 1); with one reference it is exact match."""
    answers = list(answers)
    if len(answers) <= 1:
        return exact_match(prediction, answers)
    p = normalize(prediction)
    return min(sum(p == normalize(a) for a in answers) / 3.0, 1.0)


def _ngrams(tokens: list[str], n: int) -> collections.Counter:
    return collections.Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(predictions: list[str], references: list[list[str]], max_n: int = 4) -> float:
    """Corpus BLEU-``max_n`` (Papineni et al.) with add-one smoothing of the higher orders, in [0, 1]."""
    matches, totals = [0] * max_n, [0] * max_n
    pred_len = ref_len = 0
    for pred, refs in zip(predictions, references):
        p = normalize(pred).split()
        rs = [normalize(r).split() for r in refs]
        pred_len += len(p)
        ref_len += min((abs(len(r) - len(p)), len(r)) for r in rs)[1] if rs else 0
        for n in range(1, max_n + 1):
            counts = _ngrams(p, n)
            best = collections.Counter()
            for r in rs:
                best |= _ngrams(r, n)
            matches[n - 1] += sum(min(c, best[g]) for g, c in counts.items())
            totals[n - 1] += max(len(p) - n + 1, 0)
    if pred_len == 0:
        return 0.0
    log_p = 0.0
    for n in range(max_n):
        num, den = matches[n], totals[n]
        if den == 0:  # no n-grams of this order at all (e.g. one-word answers): BLEU-n is 0
            return 0.0
        if n > 0:
            num, den = num + 1, den + 1
        if num == 0:
            return 0.0
        log_p += math.log(num / den) / max_n
    brevity = min(0.0, 1 - ref_len / pred_len)
    return math.exp(log_p + brevity)
