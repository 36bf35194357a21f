"""Captioning on the shapes world: a generated caption is parsed back to a scene description and
checked against the scene (every claim true; `complete`: every object mentioned)."""

from __future__ import annotations

from typing import Sequence

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
