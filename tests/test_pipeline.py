"""The training stream: mixing weights honoured, a function of the seed and the position alone
(not of train.steps, the worker count or the process count), epochs reshuffled, components
split per shard before mixing, resume exact, weights and components changeable on resume, skips counted."""

import collections
import itertools

import numpy as np
import pytest

from mmjax import config as config_lib
from mmjax.data import pipeline

SMALL = "data.components.shapes.num_records=64"


def _tag_only(record):
    return {"index": np.int64(record["index"])}


def _two(tiny_config, *overrides, paired=1.0, shapes=1.0):
    cfg = tiny_config(SMALL, *overrides)
    with cfg.unlocked():
        cfg.data.components.paired = config_lib.component(split="train", view="caption", weight=paired)
        cfg.data.components.paired.num_records = 64
        cfg.data.components.shapes.weight = shapes
    return cfg


def _stream(cfg, workers=0, packing=None, fn=_tag_only):
    return pipeline.train_dataset(cfg, lambda name: fn, packing, num_workers=workers)


def _pairs(batch):  # (component, record index) per example
    return list(zip(batch["_component"].tolist(), batch["index"].tolist()))


def test_mixing_weights_are_honoured(tiny_config):
    cfg = _two(tiny_config, "data.global_batch_size=32", paired=1.0, shapes=3.0)
    counts = collections.Counter()
    for batch in itertools.islice(_stream(cfg), 60):
        counts.update(batch["_component"].tolist())
    share = counts[1] / sum(counts.values())  # components sorted by name: paired=0, shapes=1
    assert abs(share - 0.75) < 0.02, counts


def test_stream_is_a_function_of_the_position_not_of_steps_or_workers(tiny_config):
    short = [b["index"] for b in itertools.islice(_stream(tiny_config(SMALL, "train.steps=4")), 12)]
    long = [b["index"] for b in itertools.islice(_stream(tiny_config(SMALL, "train.steps=5000")), 12)]
    workers = [b["index"] for b in itertools.islice(_stream(tiny_config(SMALL, "train.steps=4"), 2), 12)]
    np.testing.assert_array_equal(np.stack(short), np.stack(long))
    np.testing.assert_array_equal(np.stack(short), np.stack(workers))
    # 64 records, batches of 32: each epoch is a permutation of all of them, a new one every epoch
    epochs = np.concatenate(short).reshape(-1, 64)
    for e in epochs:
        assert sorted(e.tolist()) == list(range(64))
    assert len({tuple(e) for e in epochs}) == len(epochs)


def _as_process(monkeypatch, p, n):
    monkeypatch.setattr(pipeline.jax, "process_count", lambda: n)
    monkeypatch.setattr(pipeline.jax, "process_index", lambda: p)


def test_components_are_split_per_shard_before_mixing(tiny_config, monkeypatch):
    cfg = _two(tiny_config, "data.global_batch_size=32")
    seen = []
    for p in range(2):
        _as_process(monkeypatch, p, 2)
        pairs = [x for b in itertools.islice(_stream(cfg), 4) for x in _pairs(b)]
        shares = collections.Counter(c for c, _ in pairs)
        assert len(pairs) == 64 and shares[0] == shares[1] == 32, shares  # both read both components
        seen.append(set(pairs))
    assert not seen[0] & seen[1]  # and different records


def test_shards_make_the_stream_independent_of_the_process_count(tiny_config, monkeypatch):
    """Two processes' streams, saved after 3 batches, resume on one process (data.shards=0: the
    saved count) and go on with the global batches the two would have made; one process with
    data.shards=2 makes those global batches from the start."""
    cfg = _two(tiny_config, "data.global_batch_size=16")
    streams, states, nexts = [], [], []
    for p in range(2):
        _as_process(monkeypatch, p, 2)
        s = _stream(cfg)
        streams.append([next(s)["index"] for _ in range(3)])
        states.append(s.get_state())
        nexts.append([next(s)["index"] for _ in range(2)])
    _as_process(monkeypatch, 0, 1)
    one = _stream(cfg)
    one.set_state(pipeline.merge_states(states))
    for k in range(2):
        np.testing.assert_array_equal(next(one)["index"], np.concatenate([nexts[0][k], nexts[1][k]]))
    cfg.data.shards = 2
    both = _stream(cfg)
    np.testing.assert_array_equal(next(both)["index"], np.concatenate([streams[0][0], streams[1][0]]))
    cfg.data.shards = 4
    with pytest.raises(pipeline.DataError, match="has 2 shards and data.shards=4; resume with data.shards=2"):
        _stream(cfg).set_state(pipeline.merge_states(states))
    _as_process(monkeypatch, 0, 4)  # 4 processes cannot share the 2 shards
    cfg.data.shards = 0
    with pytest.raises(pipeline.DataError, match="2 data shards cannot be split over 4 processes"):
        _stream(cfg).set_state(pipeline.merge_states(states))


def test_resume_continues_exactly_and_new_weights_keep_positions(tiny_config):
    cfg = _two(tiny_config, "data.global_batch_size=16")
    a = _stream(cfg)
    for _ in range(3):
        next(a)
    state = a.get_state()
    rest = [next(a) for _ in range(5)]
    b = _stream(cfg)
    b.set_state(state)
    for want in rest:
        np.testing.assert_array_equal(next(b)["index"], want["index"])

    # the same point, resumed with weights 3:1 and a third component
    cfg3 = _two(tiny_config, "data.global_batch_size=16", paired=3.0, shapes=1.0)
    with cfg3.unlocked():
        cfg3.data.components.more = config_lib.component(split="val", view="image", num_records=64)
    c = _stream(cfg3)
    c.set_state(state)
    after = [x for _ in range(20) for x in _pairs(next(c))]
    shares = collections.Counter(comp for comp, _ in after)  # sorted: more=0, paired=1, shapes=2
    assert abs(shares[1] / len(after) - 0.6) < 0.03 and abs(shares[0] / len(after) - 0.2) < 0.03, shares
    # each old component goes on where it stopped: what it gives next is what it gave next before
    old = {0: 1, 1: 2}  # old component index -> new
    nxt = {c0: [i for comp, i in (x for b in rest for x in _pairs(b)) if comp == c0] for c0 in old}
    for c0, c1 in old.items():
        got = [i for comp, i in after if comp == c1][: len(nxt[c0])]
        assert got == nxt[c0][: len(got)] and len(got) >= 10
    first_more = [i for comp, i in after if comp == 0]
    fresh = [
        i for comp, i in (x for b in itertools.islice(_stream(cfg3), 20) for x in _pairs(b)) if comp == 0
    ]
    assert first_more == fresh[: len(first_more)]  # the new component starts at its beginning


def _as_sequence(record):  # a variable-length "document": index repeated, 0..2 images
    n = 3 + int(record["index"]) % 11
    return {
        "tokens": np.full(n, record["index"] + 1, np.int32),
        "images": np.repeat(record["image"][None], int(record["index"]) % 3, axis=0),
    }


def test_packing_keeps_every_example_whole_and_resumes_for_any_worker_count(tiny_config):
    cfg = tiny_config("data.global_batch_size=4", "train.steps=6", "data.components.shapes.num_records=400")
    packing = {"tokens": 32, "images": 4}
    it = _stream(cfg, packing=packing, fn=_as_sequence)
    batches = [next(it) for _ in range(3)]
    state = it.get_state()
    rest = [next(it) for _ in range(2)]
    b = batches[0]
    assert b["tokens"].shape == (4, 32) and b["images"].shape == (4, 4, 32, 32, 3)
    assert (b["tokens_segment_ids"] > 0).mean() > 0.7  # rows are mostly full
    seen = []
    for batch in batches + rest:
        for row in range(4):
            tok, seg, pos = (batch[k][row] for k in ("tokens", "tokens_segment_ids", "tokens_positions"))
            img_seg = batch["images_segment_ids"][row]
            for s in range(1, seg.max() + 1):
                doc = tok[seg == s]
                index = int(doc[0]) - 1
                assert len(doc) == 3 + index % 11 and (doc == index + 1).all()  # whole, not split
                np.testing.assert_array_equal(pos[seg == s], np.arange(len(doc)))  # positions restart
                assert (img_seg == s).sum() == index % 3  # its images travel with it
                seen.append(index)
    assert len(seen) == len(set(seen))  # nothing packed twice
    resumed = _stream(cfg, workers=2, packing=packing, fn=_as_sequence)  # and with workers
    resumed.set_state(state)
    workers = _stream(cfg, workers=2, packing=packing, fn=_as_sequence)
    for want in batches + rest:
        got = next(workers)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    for want in rest:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


class _Flaky:
    """Every third record is bad, as a real source reports it."""

    def __init__(self, comp, image_size):
        self.n = 300

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        i = int(i)
        if i % 3 == 0:
            return {"index": np.int64(i), "key": str(i), "_skip": "truncated image"}
        return {"index": np.int64(i), "image": np.zeros((4, 4, 3), np.uint8)}


def test_skipped_and_too_long_records_are_dropped_counted_and_stop_the_run(tiny_config, monkeypatch):
    monkeypatch.setitem(pipeline.SOURCES, "flaky", _Flaky)
    cfg = tiny_config("data.global_batch_size=8", "data.max_skip_rate=0.5")
    with cfg.unlocked():
        cfg.data.components.shapes.update(source="flaky", cache=False)
    s = _stream(cfg)
    got = np.concatenate([next(s)["index"] for _ in range(20)])
    assert len(got) == 160 and not (got % 3 == 0).any()
    m = s.metrics()
    assert m["data/skipped"] > 70 and abs(m["data/skip_rate"] - 1 / 3) < 0.02, m
    assert s.shards[0].state["skipped"] == {"truncated image": m["data/skipped"]}

    def tokens(record):  # every 7th example is longer than a packed row
        return {"tokens": np.ones(40 if record["index"] % 7 == 1 else 5, np.int32)}

    packed = _stream(cfg, packing={"tokens": 32}, fn=tokens)
    for _ in range(5):
        assert (next(packed)["tokens_segment_ids"].max(axis=1) > 0).all()
    assert packed.shards[0].state["skipped"]["longer than a packed row"] > 0

    cfg.data.max_skip_rate = 0.1
    with pytest.raises(pipeline.DataError, match="records were skipped.*truncated image.*max_skip_rate=0.1"):
        for _ in itertools.islice(_stream(cfg), 40):
            pass


class _Augmented:
    """A source whose records depend on the epoch they are read in (as random crops do)."""

    def __init__(self, comp, image_size):
        pass

    def __len__(self):
        return 16

    def read(self, i, epoch=0):
        return {"index": np.int64(i), "epoch": np.int64(epoch)}

    def __getitem__(self, i):
        return self.read(i)


def test_every_epoch_draws_new_augmentations(tiny_config, monkeypatch):
    monkeypatch.setitem(pipeline.SOURCES, "augmented", _Augmented)
    cfg = tiny_config("data.global_batch_size=8")
    with cfg.unlocked():
        cfg.data.components.shapes.update(source="augmented", cache=False)
    batches = list(itertools.islice(_stream(cfg, fn=lambda r: {"index": r["index"], "epoch": r["epoch"]}), 6))
    epochs = np.concatenate([b["epoch"] for b in batches]).reshape(3, 16)
    assert (epochs == np.arange(3)[:, None]).all()


def test_trainer_resumes_with_new_weights_and_more_steps(tiny_config, tmp_path):
    """Through the trainer's checkpoints: a run of 4 steps at 1:1, resumed with weights 3:1 and
    train.steps=8, logs steps 1-4 as they were, and its saved stream is the one the data layer
    gives for the same change (components where they stopped, the new shares from there)."""
    import json

    from mmjax.recipes import vit_shapes
    from mmjax.train import checkpoint as ckpt_lib, trainer as trainer_lib

    args = ("data.global_batch_size=8", "train.log_every=1", "train.save_every=4", "evals={}")
    first, later = (_two(tiny_config, *args, f"train.steps={n}", paired=w) for n, w in ((4, 1.0), (8, 3.0)))
    workdir = str(tmp_path / "run")
    trainer_lib.train(first, workdir)
    before = {r["step"]: r["loss"] for r in map(json.loads, open(f"{workdir}/metrics.jsonl")) if "loss" in r}
    trainer_lib.train(later, workdir)
    rows = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl") if '"loss"' in line]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert {r["step"]: r["loss"] for r in rows[:4]} == before
    saved = json.loads(ckpt_lib.Checkpointer(workdir, keep=2)._data_state(8))

    preprocess = vit_shapes.Recipe(first).preprocess
    a = pipeline.train_dataset(first, preprocess)
    for _ in range(4):
        next(a)
    b = pipeline.train_dataset(later, preprocess)
    b.set_state(a.get_state())
    for _ in range(4):
        next(b)
    want = json.loads(b.get_state())
    assert saved == want
    (shard,) = saved["shards"].values()
    assert shard["weights"] == {"paired": 3.0, "shapes": 1.0} and shard["start"] == {
        "paired": 16,
        "shapes": 16,
    }
