"""k-shot prompts: a validation record preceded by k solved examples drawn from the train split
(fixed per record, so every run and worker count sees the same prompt)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from mmjax.data import shapes


class FewShot:
    """record -> {'tokens' [prompt_len] right-padded, 'mask', 'images' [k + 1, S, S, 3], 'index'}.

    `fmt` joins pieces into token ids and stacks pictures (the recipe's formatter: `join(pieces,
    eos)` and `pictures(images)`); `piece(record, solved)` returns a record's pieces, with its
    answer when `solved` (the shots) and without it (the query)."""

    def __init__(
        self, fmt, piece: Callable, view: str, shots: int, prompt_len: int, image_size: int, seed: int
    ):
        self.fmt, self.piece, self.shots, self.prompt_len = fmt, piece, shots, prompt_len
        self.pool = shapes.ShapesSource("train", view, image_size=image_size, seed=seed)

    def __call__(self, record: dict) -> dict:
        rng = np.random.default_rng((7, int(record["index"])))
        shots = [self.pool[int(j)] for j in rng.integers(0, len(self.pool), self.shots)]
        pieces = [p for r in shots for p in self.piece(r, True)] + self.piece(record, False)
        ids, _ = self.fmt.join(pieces, eos=False)
        if len(ids) > self.prompt_len:
            raise ValueError(f"{self.shots}-shot prompt has {len(ids)} tokens > prompt_len {self.prompt_len}")
        tokens = np.zeros(self.prompt_len, np.int32)
        tokens[: len(ids)] = ids
        return {
            "tokens": tokens,
            "mask": np.arange(self.prompt_len) < len(ids),
            "images": self.fmt.pictures([r["image"] for r in shots] + [record["image"]]),
            "index": np.int32(record["index"]),
        }
