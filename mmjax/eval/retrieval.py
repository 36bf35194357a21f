"""Retrieval and zero-shot classification scores from embeddings (numpy, host side).

Relevance is a boolean matrix, so galleries with duplicate texts (several images captioned alike)
count any relevant item as a hit, as COCO's five captions per image do.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def recall_at_k(sim: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """sim [Q, G] (queries x gallery), relevant [Q, G] bool -> {'R@k': share of queries with a
    relevant item among their k most similar} (ties broken by gallery order)."""
    order = np.argsort(-sim, axis=1, kind="stable")
    hits = np.take_along_axis(relevant, order, axis=1)
    first = np.where(hits.any(1), hits.argmax(1), sim.shape[1])  # rank of the first relevant item
    return {f"R@{k}": float(np.mean(first < k)) for k in ks}


def same_rows(a: np.ndarray) -> np.ndarray:
    """[N, ...] -> [N, N] bool: which rows are identical (e.g. the token ids of two captions)."""
    flat = np.asarray(a).reshape(len(a), -1)
    return (flat[:, None, :] == flat[None, :, :]).all(-1)


def unique_rows(a: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each distinct row, in order."""
    _, first = np.unique(np.asarray(a).reshape(len(a), -1), axis=0, return_index=True)
    return np.sort(first)


def image_text(
    images: np.ndarray, texts: np.ndarray, text_ids: np.ndarray, ks=(1, 5, 10)
) -> dict[str, float]:
    """Image <-> text retrieval over pairs (images[i], texts[i]) whose texts may repeat: the gallery of
    texts holds each distinct text (by its ids) once; a text query finds any image it describes."""
    same = same_rows(text_ids)
    keep = unique_rows(text_ids)
    sim = normalise(images) @ normalise(texts).T  # [N images, N texts]
    i2t = recall_at_k(sim[:, keep], same[:, keep], ks)
    t2i = recall_at_k(sim[:, keep].T, same[keep], ks)
    return {**{f"i2t_{k}": v for k, v in i2t.items()}, **{f"t2i_{k}": v for k, v in t2i.items()}}
