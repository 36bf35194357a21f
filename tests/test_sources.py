"""Real-data sources (mmjax.data.sources) over small data sets written on the fly: an image folder
with and without captions.jsonl, img2dataset tar shards, an ArrayRecord file, a TFDS data set."""

import io
import itertools
import json
import os
import pickle
import tarfile

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mmjax.config import ConfigError, component
from mmjax.data import decode, pipeline, sources

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]
SCHEMA = {"index", "key", "image", "text"}


def encode(color, fmt="PNG", size=(48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


TRUNCATED = encode(COLORS[0], "JPEG")[:100]


def make(source, path, size=32, **kw):
    return pipeline.make_source(component(source=source, path=str(path), **kw), size)


def assert_color(record, color, atol=0):
    assert record["image"].shape == (32, 32, 3) and record["image"].dtype == np.uint8
    np.testing.assert_allclose(record["image"].reshape(-1, 3).mean(0), color, atol=atol + 0.01)


def good(src):
    return [r for r in (src[i] for i in range(len(src))) if sources.keep(r)]


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(encode(COLORS[0]))
    (root / "b.JPG").write_bytes(encode(COLORS[1], "JPEG"))
    (root / "sub" / "c.webp").write_bytes(encode(COLORS[2], "WEBP"))
    (root / "d.jpg").write_bytes(b"this is a text file\n")
    (root / "e.png").write_bytes(b"")
    (root / "f.jpg").write_bytes(TRUNCATED)
    (root / "notes.txt").write_text("not an image")
    return root


def test_image_folder(folder):
    src = make("image_folder", folder)
    records = [src[i] for i in range(len(src))]
    assert [r["key"] for r in records] == ["a.png", "b.JPG", "d.jpg", "e.png", "f.jpg", "sub/c.webp"]
    a, b, c = records[0], records[1], records[5]
    assert set(a) == SCHEMA and a["text"] == "" and a["index"] == 0 and isinstance(a["index"], np.int64)
    assert_color(a, COLORS[0])
    assert_color(b, COLORS[1], atol=2)
    assert_color(c, COLORS[2])
    skips = {r["key"]: r["_skip"] for r in records[2:5]}
    assert skips == {"d.jpg": "not an image", "e.png": "empty file", "f.jpg": "truncated or corrupt"}
    assert set(records[2]) == {"index", "key", "_skip"}
    assert src.stats() == {
        "records": 6,
        "skipped_in_index": {},
        "skipped": {"not an image": 1, "empty file": 1, "truncated or corrupt": 1},
    }
    assert len(make("image_folder", folder, num_records=2)) == 2
    with pytest.raises(IndexError):
        src[6]


def test_image_folder_with_captions(folder):
    lines = [
        {"image": "a.png", "caption": "a red square", "boxes": [[0, 0, 1, 1]]},
        {"image": "sub/c.webp"},  # image-only
        {"image": "a.png", "caption": "the same image, another caption"},
        {"image": "missing.png", "caption": "gone"},
        {"image": "../escape.png", "caption": "outside the folder"},
        {"caption": "no image"},
    ]
    text = "\n".join(json.dumps(x) for x in lines) + "\nnot json\n\n"
    (folder / "captions.jsonl").write_text(text)
    src = make("image_folder", folder)
    assert len(src) == 4 and src.stats()["skipped_in_index"] == {"bad manifest line": 3}
    first = src[0]
    assert first["text"] == "a red square" and first["boxes"] == [[0, 0, 1, 1]] and first["key"] == "a.png"
    assert_color(first, COLORS[0])
    assert src[1]["text"] == "" and src[1]["key"] == "sub/c.webp"
    assert src[2]["text"] == "the same image, another caption"
    assert src[3] == {"index": 3, "key": "missing.png", "_skip": "unreadable (FileNotFoundError)"}


def test_config_errors(tmp_path, folder):
    missing = tmp_path / "nowhere"
    for name in ("image_folder", "webdataset", "array_record", "tfds"):
        with pytest.raises(ConfigError, match=str(missing)):
            make(name, missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no images"):
        make("image_folder", tmp_path / "empty")
    with pytest.raises(ConfigError, match="is not a folder"):
        make("image_folder", folder / "a.png")
    with pytest.raises(ConfigError, match="holds no .tar shards"):
        make("webdataset", tmp_path / "empty")
    with pytest.raises(ConfigError, match="no \\*.array_record files"):
        make("array_record", tmp_path / "empty")
    with pytest.raises(ConfigError, match="dataset_info.json"):
        make("tfds", tmp_path / "empty")
    with pytest.raises(ConfigError, match="crop='zoom'"):
        make("image_folder", folder, crop="zoom")


def test_crops_are_deterministic_per_index_and_survive_pickling(tmp_path):
    root = tmp_path / "ramps"
    root.mkdir()
    ramp = np.zeros((40, 80, 3), np.uint8)
    ramp[..., 0] = np.arange(80) * 3
    for i in range(12):
        Image.fromarray(ramp).save(root / f"{i:02d}.png")
    src = make("image_folder", root, crop="random_crop", flip=True, seed=1, max_pixels=10**6)
    first = [src[i]["image"] for i in range(12)]
    again = make("image_folder", root, crop="random_crop", flip=True, seed=1)
    np.testing.assert_array_equal(np.stack(first), np.stack([again[i]["image"] for i in range(12)]))
    assert len({f.tobytes() for f in first}) > 3  # crops differ between records
    other = make("image_folder", root, crop="random_crop", flip=True, seed=2)
    assert any(not np.array_equal(f, other[i]["image"]) for i, f in enumerate(first))
    later = [src.read(i, epoch=1)["image"] for i in range(12)]  # another epoch, other crops
    assert any(not np.array_equal(f, g) for f, g in zip(first, later))
    np.testing.assert_array_equal(later[3], src.read(3, epoch=1)["image"])
    centre = make("image_folder", root)[0]["image"]  # the default: centre crop, no flip
    assert centre[0, 0, 0] < centre[0, -1, 0] and abs(int(centre[0, 0, 0]) - 60) <= 3
    decode.set_limits(5)  # a worker process starts with some other limit ...
    copy = pickle.loads(pickle.dumps(src))
    assert Image.MAX_IMAGE_PIXELS == 10**6  # ... and unpickling the source sets the component's
    decode.set_limits()
    np.testing.assert_array_equal(np.stack(first), np.stack([copy[i]["image"] for i in range(12)]))


def test_skipped_records_never_reach_a_batch(folder):
    """grain: `filter(keep)` turns skips into None, a later map never sees them, iteration drops them."""
    src = pipeline.make_source(component(source="image_folder", path=str(folder)), 32)

    def preprocess(record):
        assert "_skip" not in record
        return {"image": record["image"], "index": record["index"]}

    ds = grain.MapDataset.source(src).filter(sources.keep)
    assert ds[2] is None and ds[0]["key"] == "a.png"  # random access: None where a record was skipped
    with pytest.raises(ValueError, match="filter"):
        ds.batch(2)  # grain refuses to batch a MapDataset after a filter ...
    batches = list(ds.map(preprocess).to_iter_dataset().batch(3))  # ... so batch the IterDataset
    assert len(batches) == 1 and batches[0]["image"].shape == (3, 32, 32, 3)
    assert batches[0]["index"].tolist() == [0, 1, 5]
    repeated = grain.MapDataset.source(src).repeat(4).shuffle(seed=0).filter(sources.keep).map(preprocess)
    indices = [int(r["index"]) for r in repeated.to_iter_dataset()]
    assert len(indices) == 12 and set(indices) == {0, 1, 5}


def write_shard(path, entries):
    """img2dataset layout: key.{jpg,png,webp} + key.txt + key.json per sample, in one plain tar."""
    with tarfile.open(path, "w") as tar:
        for key, files in entries:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def sample(key, color, fmt="jpg", caption=None, image=None):
    files = {
        fmt: image if image is not None else encode(color, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt])
    }
    if caption is not None:
        files["txt"] = caption.encode()
    files["json"] = json.dumps(
        {"key": key, "url": f"http://x/{key}", "caption": caption, "width": 48}
    ).encode()
    return key, files


@pytest.fixture
def shards(tmp_path):
    root = tmp_path / "wds"
    root.mkdir()
    write_shard(
        root / "00000.tar",
        [
            sample("000000000", COLORS[0], "jpg", "red things\n"),
            sample("000000001", COLORS[1], "png", "green"),
            ("000000002", {"txt": b"a key without an image", "json": b"{}"}),
        ],
    )
    write_shard(
        root / "00001.tar",
        [sample("000010000", COLORS[2], "webp"), sample("000010001", None, "jpg", "broken", image=TRUNCATED)],
    )
    (root / "_stats.json").write_text(json.dumps({"count": 5, "successes": 4}))
    return root


def test_webdataset(shards):
    src = make("webdataset", shards, index_dir=str(shards.parent / "cache"))
    keys = [src[i]["key"] for i in range(len(src))]
    assert keys == ["000000000", "000000001", "000010000", "000010001"]
    assert src.stats()["skipped_in_index"] == {"no image": 1}
    r = src[0]
    assert r["text"] == "red things" and r["url"] == "http://x/000000000" and r["width"] == 48
    assert set(r) == SCHEMA | {"url", "caption", "width"}
    assert_color(r, COLORS[0], atol=2)
    assert_color(src[1], COLORS[1])
    assert src[2]["text"] == "" and src[2]["caption"] is None
    assert_color(src[2], COLORS[2])
    assert src[3]["_skip"] == "truncated or corrupt" and src[3]["key"] == "000010001"
    assert sorted(os.listdir(shards)) == sorted(
        ["00000.tar", "00000.tar.index.json", "00001.tar", "00001.tar.index.json", "_stats.json"]
    )
    index = json.loads((shards / "00000.tar.index.json").read_text())
    with open(shards / "00000.tar", "rb") as f:  # the cached offsets are the members' bytes
        f.seek(index["members"]["000000001.txt"][0])
        assert f.read(index["members"]["000000001.txt"][1]) == b"green"
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(src))[1]["image"], src[1]["image"])


def test_webdataset_index_cache(shards, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = make("webdataset", shards, index_dir=str(cache))

    def no_tar(*a, **k):
        raise AssertionError("the index was rebuilt")

    with monkeypatch.context() as m:
        m.setattr(tarfile, "open", no_tar)
        again = make("webdataset", shards, index_dir=str(cache))  # read from the cache beside the shards
        assert [again[i]["key"] for i in range(4)] == [first[i]["key"] for i in range(4)]
    # a changed shard invalidates its cache
    write_shard(shards / "00001.tar", [sample("000010005", COLORS[3], "png", "new")])
    changed = make("webdataset", shards, index_dir=str(cache))
    assert len(changed) == 3 and changed[2]["key"] == "000010005" and changed[2]["text"] == "new"
    # a shard folder that cannot be written to: the index goes to index_dir
    real_write = sources.write_atomic

    def read_only(path, text):
        if os.fspath(path.parent) == os.fspath(shards):
            raise PermissionError(f"read-only: {path}")
        real_write(path, text)

    for f in shards.glob("*.index.json"):
        f.unlink()
    monkeypatch.setattr(sources, "write_atomic", read_only)
    fallback = make("webdataset", shards, index_dir=str(cache))
    assert len(fallback) == 3 and not list(shards.glob("*.index.json")) and len(os.listdir(cache)) == 2
    monkeypatch.setattr(tarfile, "open", no_tar)
    assert len(make("webdataset", shards, index_dir=str(cache))) == 3  # the fallback cache is read too


def test_webdataset_bad_shards(shards, tmp_path):
    src = make("webdataset", shards, index_dir=str(tmp_path / "cache"))
    data = (shards / "00000.tar").read_bytes()
    with tarfile.open(shards / "00000.tar") as tar:
        png = tar.getmember("000000001.png")
    (shards / "00000.tar").write_bytes(data[: png.offset_data + png.size // 2])  # cut inside an image
    records = [src[i] for i in range(len(src))]  # a shard truncated under a running source
    assert [r["key"] for r in records] == ["000000000", "000000001", "000010000", "000010001"]
    assert records[1]["_skip"] == "unreadable (OSError)"  # a short read, not an exception
    assert_color(records[0], COLORS[0], atol=2)
    assert_color(records[2], COLORS[2])  # the other shard is intact
    with pytest.raises(ConfigError, match="00000.tar is not a readable uncompressed tar .unexpected end"):
        make("webdataset", shards, index_dir=str(tmp_path / "cache"))  # indexing a truncated shard
    (shards / "00000.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(ConfigError, match="00000.tar is not a readable uncompressed tar"):
        make("webdataset", shards, index_dir=str(tmp_path / "cache"))


def test_array_record(tmp_path):
    path = tmp_path / "data.array_record"
    records = [
        {"image": encode(COLORS[0]), "text": "red", "key": "r", "source_url": "http://r"},
        {"image": encode(COLORS[1], "JPEG")},  # image-only, default key
        {"image": TRUNCATED, "text": "bad", "key": "t"},
        {"image": encode(COLORS[2], "WEBP"), "text": "blue", "key": "b", "boxes": [[1, 2, 3, 4]]},
    ]
    assert sources.write_array_record(path, records) == 4
    src = make("array_record", path)
    assert len(src) == 4 and len(make("array_record", tmp_path)) == 4  # a file, or the folder of files
    r = src[0]
    assert (r["text"], r["key"], r["source_url"]) == ("red", "r", "http://r") and set(r) == SCHEMA | {
        "source_url"
    }
    assert_color(r, COLORS[0])
    assert (src[1]["text"], src[1]["key"]) == ("", "1")
    assert_color(src[1], COLORS[1], atol=2)
    assert src[2] == {"index": 2, "key": "t", "_skip": "truncated or corrupt"}
    assert src[3]["boxes"] == [[1, 2, 3, 4]]
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(src))[3]["image"], src[3]["image"])
    with pytest.raises(TypeError, match="encoded file's bytes"):
        sources.write_array_record(tmp_path / "x.array_record", [{"image": np.zeros((2, 2, 3), np.uint8)}])


def test_array_record_of_another_schema(tmp_path):
    from array_record.python import array_record_module

    other = tmp_path / "other"
    other.mkdir()
    writer = array_record_module.ArrayRecordWriter(str(other / "x.array_record"), "group_size:1")
    writer.write(b"\x0a\x05hello")  # e.g. a serialised tf.Example
    writer.close()
    with pytest.raises(ConfigError, match="mmjax's record schema"):
        make("array_record", other)
    (other / "x.array_record").write_bytes(b"not an array record")
    with pytest.raises(ConfigError, match="mmjax's record schema"):
        make("array_record", other)


class MmjaxTestTiny(tfds.core.GeneratorBasedBuilder):
    """A TFDS data set of solid-colour images with captions, prepared without TensorFlow (images are
    given encoded: tfds encodes numpy images with tf.image)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "caption": tfds.features.Text(),
            "label": tfds.features.Scalar(np.int64),
        }
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(4), "test": self._generate_examples(2)}

    def _generate_examples(self, n):
        for i in range(n):
            image = TRUNCATED if i == 3 else encode(COLORS[i], "PNG")
            yield i, {"image": image, "caption": f"colour {i}", "label": i}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    builder = MmjaxTestTiny(data_dir=str(tmp_path_factory.mktemp("tfds")), file_format="array_record")
    builder.download_and_prepare()
    return builder.data_dir


def test_tfds(tfds_dir):
    src = make("tfds", tfds_dir)
    assert len(src) == 4 and len(make("tfds", tfds_dir, split="test")) == 2
    records = [src[i] for i in range(4)]
    by_label = {int(r["label"]): r for r in records if sources.keep(r)}
    assert (
        sorted(by_label) == [0, 1, 2]
        and [r for r in records if not sources.keep(r)][0]["_skip"] == "truncated or corrupt"
    )
    for label, r in by_label.items():
        assert r["text"] == f"colour {label}" and set(r) == SCHEMA | {"label"}
        assert_color(r, COLORS[label])
    assert make("tfds", tfds_dir, text_key="label")[0]["text"] in {"0", "1", "2", "3"}  # as a str
    assert len(make("tfds", tfds_dir, split="train[:2]")) == 2
    copy = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(copy[0]["image"], records[0]["image"])


def test_tfds_errors(tfds_dir, tmp_path):
    with pytest.raises(ConfigError, match="image_key='caption' is not an Image feature"):
        make("tfds", tfds_dir, image_key="caption")
    with pytest.raises(ConfigError, match="no feature text_key='title'"):
        make("tfds", tfds_dir, text_key="title")
    with pytest.raises(ConfigError, match="no split 'validation'"):
        make("tfds", tfds_dir, split="validation")
    tfrecord = tmp_path / "tfrecord"  # the same data set, as if stored as tfrecord
    tfrecord.mkdir()
    for name in ("dataset_info.json", "features.json"):
        (tfrecord / name).write_text(
            open(os.path.join(tfds_dir, name)).read().replace("array_record", "tfrecord")
        )
    with pytest.raises(ConfigError, match="stored as tfrecord, which has no random access"):
        make("tfds", tfrecord)


def test_one_schema_across_sources(folder, shards, tmp_path, tfds_dir):
    sources.write_array_record(tmp_path / "a.array_record", [{"image": encode(COLORS[0]), "text": "t"}])
    srcs = {
        "image_folder": make("image_folder", folder),
        "webdataset": make("webdataset", shards, index_dir=str(tmp_path / "cache")),
        "array_record": make("array_record", tmp_path / "a.array_record"),
        "tfds": make("tfds", tfds_dir),
    }
    for name, src in srcs.items():
        r = good(src)[0]
        assert SCHEMA <= set(r), name
        assert r["image"].shape == (32, 32, 3) and r["image"].dtype == np.uint8, name
        assert isinstance(r["text"], str) and isinstance(r["key"], str) and r["index"].dtype == np.int64, name


def test_grain_workers_apply_the_pixel_limit_and_drop_skips(tmp_path):
    root = tmp_path / "mixed"
    root.mkdir()
    for i in range(4):
        (root / f"{i}.png").write_bytes(encode(COLORS[i], size=(110, 110) if i == 2 else (40, 40)))
    (root / "4.jpg").write_bytes(TRUNCATED)
    src = make("image_folder", root, max_pixels=100 * 100)
    decode.set_limits()  # the parent's limit back to the default: only the worker's own copy has 100 x 100
    ds = grain.MapDataset.source(src).filter(sources.keep).to_iter_dataset()
    it = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=1, per_worker_buffer_size=2))
    assert [r["key"] for r in it] == ["0.png", "1.png", "3.png"]  # 2.png: a bomb by the worker's limit


def four_sources(root) -> dict:
    """Component configs of a small captioned data set of each kind, each with one corrupt image
    (what training on real data must skip and count): an image folder with captions.jsonl, a
    WebDataset shard, an ArrayRecord file and a TFDS data set prepared on disk."""
    rng = np.random.default_rng(0)
    colors = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(8)]
    captions = [
        f"a {c} {s}" for c, s in itertools.product(("red", "blue"), ("circle", "square", "triangle", "star"))
    ]
    (root / "folder").mkdir()
    for i, c in enumerate(colors):
        (root / "folder" / f"{i}.png").write_bytes(encode(c))
    (root / "folder" / "bad.jpg").write_bytes(TRUNCATED)
    lines = [{"image": f"{i}.png", "caption": t} for i, t in enumerate(captions)] + [
        {"image": "bad.jpg", "caption": "x"}
    ]
    (root / "folder" / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (root / "wds").mkdir()
    write_shard(
        root / "wds" / "00000.tar",
        [sample(f"{i:09d}", c, "jpg", t) for i, (c, t) in enumerate(zip(colors, captions))]
        + [sample("000000099", None, "jpg", "bad", image=TRUNCATED)],
    )
    sources.write_array_record(
        root / "images.array_record",
        [{"image": encode(c), "text": t} for c, t in zip(colors, captions)]
        + [{"image": TRUNCATED, "text": "x"}],
    )
    builder = MmjaxTestTiny(data_dir=str(root / "tfds"), file_format="array_record")
    builder.download_and_prepare()
    paths = {
        "folder": ("image_folder", root / "folder"),
        "wds": ("webdataset", root / "wds"),
        "records": ("array_record", root / "images.array_record"),
        "tfds": ("tfds", builder.data_dir),
    }
    return {n: dict(source=s, path=str(p), weight=1.0) for n, (s, p) in paths.items()}
