"""Captioning on the shapes world: a generated caption is parsed back to a scene description and
checked against the scene (every claim true; `complete`: every object mentioned)."""

from __future__ import annotations

import math
from collections import Counter
from typing import Hashable, Sequence

import numpy as np

from mmjax.data import shapes
from mmjax.eval import shapes_eval


def score(captions: Sequence[str], indices: Sequence[int], split: str, seed: int = 0) -> dict[str, float]:
    scenes = [shapes.scene(split, int(i), seed) for i in indices]
    return {
        "accuracy": float(np.mean([shapes_eval.caption_correct(t, s) for t, s in zip(captions, scenes)])),
        "complete": float(
            np.mean([shapes_eval.caption_correct(t, s, complete=True) for t, s in zip(captions, scenes)])
        ),
    }


# --- CIDEr-D ---------------------------------------------------------------------------------------------


def _cider_vectors(words: list[str], df: Counter, log_n: float):
    """tf-idf vector (one dict per n-gram order 1..4), its norms, and the length CIDEr-D penalises."""
    vec: list[dict] = [{}, {}, {}, {}]
    for k in range(1, 5):
        for i in range(len(words) - k + 1):
            g = tuple(words[i : i + k])
            vec[k - 1][g] = vec[k - 1].get(g, 0) + 1
    for d in vec:  # tf * idf; an n-gram in no reference gets df 1
        for g in d:
            d[g] *= log_n - math.log(max(1.0, df[g]))
    # pycocoevalcap's "length" is the number of bigrams (it sums counts at order index 1), kept for parity.
    return vec, [math.sqrt(sum(v * v for v in d.values())) for d in vec], max(len(words) - 1, 0)


def cider_d(
    references: dict[Hashable, list[str]], candidates: dict[Hashable, str]
) -> tuple[float, dict[Hashable, float]]:
    """CIDEr-D, equal to pycocoevalcap's `Cider().compute_score(references, {k: [c] ...})`.

    Strings are split on whitespace (tokenise / lower-case beforehand). For each image, the candidate
    and each reference become tf-idf vectors of their 1..4-grams, with document frequencies counted
    over the images' reference sets (idf = log(#images) - log(max(1, df))). Per order, the similarity
    is sum(min(cand, ref) * ref) / (|cand| |ref|) (0 if either norm is 0), times the Gaussian length
    penalty exp(-delta^2 / 72) (sigma 6); averaged over orders and references, times 10.
    Returns (the mean over images, {key: per-image score}). A single image always scores 0 (idf 0).
    """
    if references.keys() != candidates.keys():
        missing = [k for k in references if k not in candidates]
        extra = [k for k in candidates if k not in references]
        raise ValueError(f"cider_d: candidates missing keys {missing}, extra keys {extra}")
    if not references or not all(references.values()):
        raise ValueError("cider_d: needs at least one image, and at least one reference per image")
    refs = {k: [r.split() for r in rs] for k, rs in references.items()}
    df: Counter = Counter()
    for rs in refs.values():
        df.update({tuple(w[i : i + k]) for w in rs for k in range(1, 5) for i in range(len(w) - k + 1)})
    log_n = math.log(len(refs))
    penalty = lambda delta: math.exp(-(delta**2) / (2 * 6.0**2))  # noqa: E731
    scores = {}
    for key, rs in refs.items():
        vec, norm, length = _cider_vectors(candidates[key].split(), df, log_n)
        total = np.zeros(4)
        for r in rs:
            rvec, rnorm, rlength = _cider_vectors(r, df, log_n)
            for n in range(4):
                val = sum(min(h, rvec[n].get(g, 0.0)) * rvec[n].get(g, 0.0) for g, h in vec[n].items())
                if norm[n] and rnorm[n]:
                    val /= norm[n] * rnorm[n]
                total[n] += val * penalty(length - rlength)
        scores[key] = float(np.mean(total) / len(rs) * 10.0)
    return math.fsum(scores.values()) / len(scores), scores
