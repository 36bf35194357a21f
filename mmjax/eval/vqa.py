"""VQA on the shapes world: exact answers from the scorer, and the image-blind answer prior that
accuracy is compared with (what a model that ignores the image can do best)."""

from __future__ import annotations

import functools
import re
from typing import Sequence

import numpy as np

from mmjax.data import shapes
from mmjax.eval import shapes_eval

_WORDS = re.compile(r"\b(" + "|".join((*shapes.COLORS, *shapes.SHAPES, *shapes.SIZES)) + r")s?\b")


def template(question: str) -> str:
    """A question with its attribute words blanked: the key of the answer prior."""
    return _WORDS.sub("_", question.lower())


@functools.lru_cache(maxsize=4)
def answer_prior(seed: int = 0, n: int = 4000) -> dict[str, str]:
    """The most common train answer per question template."""
    src, counts = shapes.ShapesSource("train", "qa", seed=seed), {}
    for i in range(n):
        r = src[i]
        by = counts.setdefault(template(r["question"]), {})
        a = shapes_eval.normalize_answer(r["answer"])
        by[a] = by.get(a, 0) + 1
    return {t: max(by, key=by.get) for t, by in counts.items()}


def score(answers: Sequence[str], indices: Sequence[int], split: str, seed: int = 0) -> dict[str, float]:
    """Accuracy of generated answers to the `qa` view's questions of `split` (records `indices`)
    and of the answer prior, overall and per question kind."""
    src, prior = shapes.ShapesSource(split, "qa", seed=seed), answer_prior(seed)
    rows = []  # (question kind, right, right by the prior)
    for text, i in zip(answers, indices):
        q = src[int(i)]["question"]
        truth = shapes_eval.answer(shapes.scene(split, int(i), seed), q)
        rows.append(
            (
                shapes_eval.question_kind(q),
                shapes_eval.normalize_answer(text) == truth,
                prior.get(template(q)) == truth,
            )
        )
    result = {"accuracy": float(np.mean([r[1] for r in rows])), "prior": float(np.mean([r[2] for r in rows]))}
    for kind in sorted({r[0] for r in rows}):
        mine = [r for r in rows if r[0] == kind]
        result[f"accuracy/{kind}"] = float(np.mean([r[1] for r in mine]))
        result[f"prior/{kind}"] = float(np.mean([r[2] for r in mine]))
    return result
