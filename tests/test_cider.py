"""CIDEr-D (`mmjax.eval.captioning.cider_d`) against pycocoevalcap's Cider, plus edge cases."""

import math

import pytest

from mmjax.eval.captioning import cider_d

REFERENCES = {
    0: [
        "a small red circle and a large blue square",
        "a red circle next to a big blue square",
        "small red circle large blue square",
        "a large blue square and a small red circle",
    ],
    1: ["a green triangle", "one green triangle", "a small green triangle on the left", ""],
    2: [
        "two yellow squares and a purple circle",
        "a purple circle between two yellow squares",
        "yellow squares with a purple circle",
    ],
    3: [
        "a large red square above a small green circle",
        "a red square and a green circle",
        "big red square small green circle",
        "a green circle below a large red square",
        "red square green circle",
    ],
    4: ["three blue circles", "three small blue circles in a row", "blue circles"],
    5: [
        "a purple triangle and a yellow circle",
        "a yellow circle right of a purple triangle",
        "purple triangle yellow circle",
        "a small purple triangle and a large yellow circle",
    ],
    6: ["a blue square", "a single blue square", "one large blue square in the middle"],
}
CANDIDATES = {
    0: "a small red circle and a large blue square",  # identical to a reference
    1: "",  # empty
    2: "yellow yellow squares squares and a a purple circle",  # repeated words
    3: "a red square and a green circle",  # identical to a reference
    4: "blue",  # one word (no bigrams)
    5: "a purple triangle next to an orange circle",  # words in no reference
    6: "a blue square a blue square a blue square",  # repeated phrase
}

# Computed once with pycocoevalcap 1.2 (PyPI, Python 3.11):
#   from pycocoevalcap.cider.cider import Cider
#   score, scores = Cider().compute_score(REFERENCES, {k: [c] for k, c in CANDIDATES.items()})
# (`scores` is in REFERENCES' key order.)
PYCOCO_SCORE = 2.2772392518389935
PYCOCO_SCORES = {
    0: 5.7639179750849685,
    1: 0.0,
    2: 2.699906259494817,
    3: 4.612237790028807,
    4: 0.6755111116238567,
    5: 1.4750144826411737,
    6: 0.7140871439993328,
}


def test_matches_pycocoevalcap():
    score, scores = cider_d(REFERENCES, CANDIDATES)
    assert score == pytest.approx(PYCOCO_SCORE, rel=1e-9)
    assert scores.keys() == PYCOCO_SCORES.keys()
    for k, v in PYCOCO_SCORES.items():
        assert scores[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k


def test_key_mismatch_raises():
    cands = {k: c for k, c in CANDIDATES.items() if k != 3} | {"extra": "a red square"}
    with pytest.raises(ValueError, match=r"missing keys \[3\].*extra keys \['extra'\]"):
        cider_d(REFERENCES, cands)


def test_order_independent():
    keys = [4, 1, 6, 0, 5, 3, 2]
    refs = {k: REFERENCES[k][::-1] for k in keys}  # reference order within an image is irrelevant too
    cands = {k: CANDIDATES[k] for k in reversed(keys)}
    assert cider_d(refs, cands) == cider_d(REFERENCES, CANDIDATES)


def test_consensus_candidate_scores_positive():
    refs = {
        "a": ["a small red circle"] * 3,
        "b": ["two blue squares", "a pair of blue squares", "blue squares"],
        "c": ["a large green triangle", "one green triangle"],
    }
    cands = {"a": "a small red circle", "b": "a red square", "c": "green"}
    _, scores = cider_d(refs, cands)
    assert scores["a"] > 0
    # identical tf-idf vectors: cosine 1 at every order, no length penalty
    assert scores["a"] == pytest.approx(10.0, rel=1e-12)


def test_closed_form_two_images():
    # Two images, df 1 for every reference n-gram: all weights are log(2), so per order the similarity
    # is the plain cosine of the counts. "a b" vs "a b": unigram and bigram cosines 1, no 3/4-grams ->
    # 10 * (1 + 1 + 0 + 0) / 4 = 5. "c" vs "c d": unigram cosine 1/sqrt(2), bigram 0, length (bigram
    # count) delta -1 -> 10 * exp(-1/72) / sqrt(2) / 4.
    score, scores = cider_d({0: ["a b"], 1: ["c d"]}, {0: "a b", 1: "c"})
    expected = 2.5 / math.sqrt(2) * math.exp(-1 / 72)
    assert scores == pytest.approx({0: 5.0, 1: expected}, rel=1e-12)
    assert score == pytest.approx((5.0 + expected) / 2, rel=1e-12)


def test_edge_cases():
    # A single image: idf = log(1) - log(1) = 0 for everything, so pycocoevalcap gives 0.
    assert cider_d({"x": ["a red circle"]}, {"x": "a red circle"}) == (0.0, {"x": 0.0})
    # Empty candidate / empty references: zero norms give 0.
    assert cider_d({0: [""], 1: ["a b"]}, {0: "", 1: ""}) == (0.0, {0: 0.0, 1: 0.0})
    with pytest.raises(ValueError, match="at least one"):
        cider_d({}, {})
    with pytest.raises(ValueError, match="at least one"):
        cider_d({0: [], 1: ["a"]}, {0: "a", 1: "a"})
