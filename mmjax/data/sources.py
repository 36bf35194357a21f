"""Random-access sources over local data: image folders, WebDataset shards, ArrayRecord, TFDS.

Every source returns records in one schema: {"index": int64, "key": str, "image": uint8
[S, S, 3], "text": str ("" for image-only data)} plus the record's own metadata (the other fields
of its JSONL line, img2dataset .json or ArrayRecord `meta`; the schema's names win). Images
are decoded by `mmjax.data.decode` and `resize_crop`ped to the pipeline's image size with the
component's `crop` (center_crop | random_crop | resize) and `flip`, drawing from
np.random.default_rng((component seed, index[, epoch])): a record is a function of its index
(and, through `read(idx, epoch)`, the epoch) alone.
Component options: `max_pixels` (decompression-bomb limit), `num_records` (> 0: the first n).

Skips: a record that cannot be read or decoded never raises; it comes back as {"index", "key",
"_skip": reason}. The training stream (pipeline.TrainStream) drops and counts those after its
workers; with plain grain, `MapDataset.filter(keep)` drops them (then batch the IterDataset:
grain refuses `MapDataset.batch` after a filter). `stats()` counts `skipped_in_index` (keys
without an image, bad manifest lines: found when the source is built, the same in every process)
and `skipped` (read and decode failures seen by this copy of the source; a grain worker's copy
counts from zero).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import posixpath
import tarfile
import threading
from typing import Iterable

import msgpack
import numpy as np
from etils import epath

from mmjax.config import ConfigError
from mmjax.data import decode
from mmjax.paths import resolve, write_atomic

log = logging.getLogger("mmjax")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # img2dataset's, in order of preference
_SCHEMA = ("index", "key", "image", "text", "_skip")


def keep(record: dict) -> bool:
    """The filter that drops skipped records (`MapDataset.filter(keep)`)."""
    return "_skip" not in record


class _Source:
    """Decoding, cropping, skipping and counting, over a subclass's `raw(idx) -> (key, image
    bytes, text, metadata)` and `_locate(idx)` (a key for a record that could not be read)."""

    def __init__(self, comp, image_size: int, count: int):
        crop = comp.get("crop", "center_crop")
        if crop not in decode.CROPS:
            raise ConfigError(f"data component crop={crop!r}; choose {', '.join(decode.CROPS)}")
        self.image_size, self.crop, self.flip = int(image_size), crop, bool(comp.get("flip", False))
        self.seed = int(comp.get("seed", 0))
        self.max_pixels = int(comp.get("max_pixels", decode.DEFAULT_MAX_PIXELS))
        limit = int(comp.get("num_records") or 0)
        self._len = min(count, limit) if limit else count
        self._skipped, self._lock = collections.Counter(), threading.Lock()
        decode.set_limits(self.max_pixels)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, idx) -> dict:
        return self.read(idx)

    def read(self, idx, epoch: int = 0) -> dict:
        """Record `idx`, its random crop and flip drawn for `epoch` (the training stream passes
        the epoch, so every epoch sees new crops; `source[idx]` is epoch 0)."""
        idx = int(idx)
        if not 0 <= idx < self._len:
            raise IndexError(f"record {idx} out of range for {self!r}")
        try:
            key, data, text, meta = self.raw(idx)
        except (OSError, ValueError, RuntimeError) as e:
            return self._skip(idx, self._locate(idx), f"unreadable ({type(e).__name__})")
        out = decode.decode(data, self.image_size)
        if out.image is None:
            return self._skip(idx, key, out.reason)
        rng = np.random.default_rng((self.seed, idx, epoch) if epoch else (self.seed, idx))
        image = decode.resize_crop(out.image, self.image_size, self.crop, rng, self.flip)
        meta = {k: v for k, v in meta.items() if k not in _SCHEMA}
        return {**meta, "index": np.int64(idx), "key": key, "image": image, "text": text}

    def _skip(self, idx: int, key: str, reason: str) -> dict:
        with self._lock:
            self._skipped[reason] += 1
        return {"index": np.int64(idx), "key": key, "_skip": reason}

    def stats(self) -> dict:
        with self._lock:
            skipped = dict(self._skipped)
        return {"records": len(self), "skipped_in_index": dict(self.skipped_in_index), "skipped": skipped}

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_skipped")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._skipped, self._lock = collections.Counter(), threading.Lock()
        decode.set_limits(self.max_pixels)  # in every worker process, not only the parent


def _existing(path, what: str) -> epath.Path:
    if not path:
        raise ConfigError(f"this data source reads {what}; set the component's path")
    p = resolve(path)
    if not p.exists():
        raise ConfigError(f"{p} does not exist; set the component's path to {what}")
    return p


class ImageFolder(_Source):
    """`comp.path`: a folder of images (recursive, sorted by relative path), or, when it holds
    `captions.jsonl` (`comp.captions` names another file), the records that file lists: one
    JSON object a line, `image` (a path relative to the folder), optional `caption`, other
    fields passed through (e.g. boxes, regions). No caption: an image-only record."""

    def __init__(self, comp, image_size: int):
        self.root = _existing(comp.path, "a folder of images")
        if not self.root.is_dir():
            raise ConfigError(f"{self.root} is not a folder; image_folder reads a folder of images")
        self.skipped_in_index = collections.Counter()
        manifest = self.root / comp.get("captions", "captions.jsonl")
        if manifest.exists():
            self.entries = self._manifest(manifest)
            if not self.entries:
                raise ConfigError(f"{manifest} lists no images; add lines like {{'image': 'a.jpg'}}")
        else:
            self.entries = [(rel, "", {}) for rel in _scan(self.root)]
            if not self.entries:
                raise ConfigError(
                    f"{self.root} holds no images ({', '.join(IMAGE_EXTENSIONS)}); point the path at your images"
                )
        super().__init__(comp, image_size, len(self.entries))

    def _manifest(self, manifest: epath.Path) -> list:
        entries = []
        for line in manifest.read_text().splitlines():
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            image = obj.get("image") if isinstance(obj, dict) else None
            caption = (obj.get("caption") or "") if isinstance(obj, dict) else ""
            if (
                not isinstance(image, str)
                or not isinstance(caption, str)
                or image.startswith("/")
                or ".." in image.split("/")
            ):
                self.skipped_in_index["bad manifest line"] += 1
                continue
            entries.append((image, caption, {k: v for k, v in obj.items() if k not in ("image", "caption")}))
        return entries

    def _locate(self, idx: int) -> str:
        return self.entries[idx][0]

    def raw(self, idx: int):
        rel, caption, meta = self.entries[idx]
        return rel, (self.root / rel).read_bytes(), caption, meta

    def __repr__(self) -> str:
        return f"ImageFolder({self.root}, {len(self)} records)"


def _scan(root: epath.Path) -> list[str]:
    found = []
    for folder, _, files in root.walk():
        for name in files:
            if name.rpartition(".")[2].lower() in IMAGE_EXTENSIONS:
                found.append(os.fspath((folder / name).relative_to(root)))
    return sorted(found)


class WebDataset(_Source):
    """`comp.path`: a directory of uncompressed img2dataset `.tar` shards (or one shard):
    `key.jpg|png|webp` + `key.txt` (caption, stripped) + `key.json` (metadata). Each shard's member
    offsets are indexed once with `tarfile` and cached as `SHARD.index.json` beside it, or,
    where that cannot be written, in `comp.index_dir` (default ~/.cache/mmjax/wds-index); a
    cache whose shard changed (size, mtime or first 64 KiB) is rebuilt. Keys without an image are left out."""

    def __init__(self, comp, image_size: int):
        root = _existing(comp.path, "a directory of .tar shards")
        self.shards = (
            [os.fspath(p) for p in sorted(root.glob("*.tar"))] if root.is_dir() else [os.fspath(root)]
        )
        if not self.shards:
            raise ConfigError(f"{root} holds no .tar shards; point the path at img2dataset's output folder")
        cache = resolve(comp.get("index_dir") or os.path.expanduser("~/.cache/mmjax/wds-index"))
        self.skipped_in_index = collections.Counter()
        rows, keys = [], []
        for s, shard in enumerate(self.shards):
            for key, parts in _group(_shard_index(epath.Path(shard), cache)).items():
                ext = next((e for e in WDS_IMAGE_EXTENSIONS if e in parts), None)
                if ext is None:
                    self.skipped_in_index["no image"] += 1
                    continue
                rows.append((s, *parts[ext], *parts.get("txt", (-1, 0)), *parts.get("json", (-1, 0))))
                keys.append(key)
        if not rows:
            raise ConfigError(f"the shards in {root} hold no images (keys need a .jpg, .png or .webp member)")
        self.rows, self.keys = np.array(rows, np.int64), np.array(keys)
        super().__init__(comp, image_size, len(rows))

    def _locate(self, idx: int) -> str:
        return str(self.keys[idx])

    def raw(self, idx: int):
        shard, image, image_size, txt, txt_size, meta, meta_size = (int(v) for v in self.rows[idx])
        with epath.Path(self.shards[shard]).open("rb") as f:
            data = _read_at(f, image, image_size)
            text = _read_at(f, txt, txt_size).decode("utf-8", "replace").strip() if txt >= 0 else ""
            meta = json.loads(_read_at(f, meta, meta_size)) if meta >= 0 else {}
        if not isinstance(meta, dict):
            raise ValueError("the .json member is not an object")
        return self._locate(idx), data, text, meta

    def __repr__(self) -> str:
        return f"WebDataset({len(self.shards)} shards, {len(self)} records)"


def _read_at(f, offset: int, size: int) -> bytes:
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise OSError(f"short read: {len(data)} of {size} bytes at {offset} (a truncated shard?)")
    return data


def _group(members: dict) -> dict[str, dict[str, tuple[int, int]]]:
    """{member name: (offset, size)} -> {key: {extension: (offset, size)}}, in tar order."""
    keys: dict[str, dict] = {}
    for name, (offset, size) in members.items():
        folder, base = posixpath.split(name)
        stem, _, ext = base.partition(".")
        keys.setdefault(posixpath.join(folder, stem), {})[ext.lower()] = (offset, size)
    return keys


def _shard_index(shard: epath.Path, cache: epath.Path) -> dict:
    """{member name: [offset of its data, size]} of an uncompressed tar, through the cache."""
    try:
        st = shard.stat()
        with shard.open("rb") as f:  # tars pad to 10 KiB, so a rewritten shard often keeps its size
            head = hashlib.sha1(f.read(1 << 16)).hexdigest()
    except OSError as e:
        raise ConfigError(f"cannot read shard {shard} ({e})") from e
    stamp = {"size": st.length, "mtime": st.mtime, "head": head}
    places = (
        shard.parent / f"{shard.name}.index.json",
        cache / f"{hashlib.sha1(os.fspath(shard).encode()).hexdigest()}.json",
    )
    for place in places:
        try:
            index = json.loads(place.read_text())
            if {k: index.get(k) for k in stamp} == stamp:
                return index["members"]
        except (OSError, ValueError, KeyError, AttributeError):
            pass  # no cache, or a stale or broken one: rebuild
    members = {}
    try:
        with shard.open("rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for m in tar:
                if m.isfile():
                    members[m.name] = [m.offset_data, m.size]
    except (tarfile.TarError, OSError) as e:
        raise ConfigError(
            f"shard {shard} is not a readable uncompressed tar ({e}); re-create it, or move it out of "
            f"{shard.parent} (compressed shards have no random access: decompress them)"
        ) from e
    text = json.dumps({**stamp, "members": members})
    for place in places:
        try:
            write_atomic(place, text)
            break
        except OSError:
            continue
    else:
        log.warning("could not cache the index of %s (tried %s)", shard, ", ".join(map(str, places)))
    return members


def write_array_record(path, records: Iterable[dict]) -> int:
    """Writes mmjax records to one ArrayRecord file (group_size:1, for random access); returns
    how many. A record: `image` (encoded bytes, as stored on disk), optional `text` and `key`
    (default: its position), any other msgpack-able fields as metadata. Serialised with
    msgpack as {key, image, text, meta}."""
    from array_record.python import array_record_module

    writer = array_record_module.ArrayRecordWriter(os.fspath(path), "group_size:1")
    n = 0
    try:
        for record in records:
            image = record["image"]
            if not isinstance(image, bytes):
                raise TypeError(
                    f"record {n}: image must be the encoded file's bytes, not {type(image).__name__}"
                )
            meta = {k: v for k, v in record.items() if k not in ("image", "text", "key")}
            blob = {
                "key": str(record.get("key", n)),
                "image": image,
                "text": record.get("text", ""),
                "meta": meta,
            }
            writer.write(msgpack.packb(blob, use_bin_type=True))
            n += 1
    finally:
        writer.close()
    return n


def _unpack(blob: bytes) -> dict:
    record = msgpack.unpackb(blob, raw=False)
    if not (
        isinstance(record, dict)
        and isinstance(record.get("image"), bytes)
        and isinstance(record.get("key"), str)
        and isinstance(record.get("text"), str)
        and isinstance(record.get("meta"), dict)
    ):
        raise ValueError("not an mmjax record ({key, image, text, meta})")
    return record


class ArrayRecord(_Source):
    """`comp.path`: an ArrayRecord file or a directory of them (`*.array_record*`, sorted), in
    mmjax's record schema (`write_array_record`)."""

    def __init__(self, comp, image_size: int):
        from array_record.python import array_record_data_source

        root = _existing(comp.path, "an ArrayRecord file or a directory of them")
        files = sorted(p for p in root.iterdir() if ".array_record" in p.name) if root.is_dir() else [root]
        if not files:
            raise ConfigError(f"{root} holds no *.array_record files; write them with mmjax data convert")
        self.skipped_in_index = collections.Counter()
        try:
            self._records = array_record_data_source.ArrayRecordDataSource([os.fspath(f) for f in files])
            if len(self._records):
                _unpack(self._records[0])
        except (RuntimeError, ValueError, OSError) as e:
            raise ConfigError(
                f"{root} does not hold ArrayRecord files in mmjax's record schema ({e}); write them with "
                f"mmjax.data.sources.write_array_record, or read a TFDS data set with source='tfds'"
            ) from e
        if not len(self._records):
            raise ConfigError(f"the ArrayRecord files in {root} hold no records")
        self.root = root
        super().__init__(comp, image_size, len(self._records))

    def _locate(self, idx: int) -> str:
        return f"record {idx}"

    def raw(self, idx: int):
        record = _unpack(self._records[idx])
        return record["key"], record["image"], record["text"], record["meta"]

    def __repr__(self) -> str:
        return f"ArrayRecord({self.root}, {len(self)} records)"


class Tfds(_Source):
    """`comp.path`: a prepared TFDS data set's version folder (the one with dataset_info.json),
    stored in a random-access format (array_record, parquet); `comp.split` (slices allowed:
    'train[:90%]'). `image_key` (default `image`, an Image feature) and `text_key` (default
    `text` or `caption`, when the data set has one) map its features to the schema; the other
    features pass through. Read with `as_data_source`: no TensorFlow needed."""

    def __init__(self, comp, image_size: int):
        import tensorflow_datasets as tfds
        from tensorflow_datasets.core import file_adapters

        root = _existing(comp.path, "a prepared TFDS data set")
        if not (root / "dataset_info.json").exists():
            raise ConfigError(
                f"{root} has no dataset_info.json; point the path at a prepared data set's version folder, "
                f"e.g. DATA_DIR/NAME/1.0.0"
            )
        builder = tfds.builder_from_directory(os.fspath(root))
        info = builder.info
        formats = sorted(
            (set(info.available_file_formats()) & file_adapters.FileFormat.with_random_access()),
            key=lambda f: f.value,
        )
        if not formats:
            stored = ", ".join(f.value for f in info.available_file_formats()) or "no format"
            raise ConfigError(
                f"TFDS data set {root} is stored as {stored}, which has no random access; prepare it with "
                f"file_format='array_record' (`tfds build --file_format=array_record`) or convert it "
                f"(`tfds convert_format --dataset_dir={root} --out_file_format=array_record`)"
            )
        if comp.split.partition("[")[0] not in info.splits:
            raise ConfigError(
                f"TFDS data set {root} has no split {comp.split!r}; splits: {', '.join(info.splits)}"
            )
        features = info.features
        self.image_key = comp.get("image_key", "image")
        if self.image_key not in features or not isinstance(features[self.image_key], tfds.features.Image):
            raise ConfigError(
                f"TFDS data set {root}: image_key={self.image_key!r} is not an Image feature; "
                f"features: {', '.join(features)}"
            )
        self.text_key = comp.get("text_key") or next((k for k in ("text", "caption") if k in features), "")
        if self.text_key and self.text_key not in features:
            raise ConfigError(
                f"TFDS data set {root}: no feature text_key={self.text_key!r}; features: {', '.join(features)}"
            )
        self._ds = builder.as_data_source(
            comp.split, decoders={self.image_key: tfds.decode.SkipDecoding()}, file_format=formats[0]
        )
        self.name = f"{info.name}/{comp.split}"
        self.skipped_in_index = collections.Counter()
        super().__init__(comp, image_size, len(self._ds))

    def _locate(self, idx: int) -> str:
        return f"{self.name}[{idx}]"

    def raw(self, idx: int):
        example = dict(self._ds[idx])
        data = example.pop(self.image_key)
        text = str(_str(example.pop(self.text_key))) if self.text_key else ""
        return self._locate(idx), data, text, {k: _str(v) for k, v in example.items()}

    def __repr__(self) -> str:
        return f"Tfds({self.name}, {len(self)} records)"


def _str(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
