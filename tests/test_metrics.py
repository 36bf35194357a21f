"""Run outputs: metrics.jsonl (append / remote rewrite, resume truncation), evaluation
artefacts (PNG grids, jsonl texts), TensorBoard (scalars, images, the epath record writer),
Weights & Biases offline, the loss plot and artefact validation."""

import glob
import io
import json
import os
import struct
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mmjax.eval import artefacts
from mmjax.train import metrics

SEP = artefacts.SEPARATOR


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f if l.strip()]


def _parse_events(data: bytes):
    """The tensorboard Events in one event file's bytes (TFRecord framing, tensorboardX protos)."""
    from tensorboardX.proto import event_pb2

    out, i = [], 0
    while i < len(data):
        (n,) = struct.unpack("Q", data[i : i + 8])
        i += 12  # length + its crc
        ev = event_pb2.Event()
        ev.ParseFromString(data[i : i + n])
        out.append(ev)
        i += n + 4  # data + its crc
    return out


def _events(logdir):
    out = []
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            out += _parse_events(f.read())
    return out


def _summaries(logdir):
    return [(ev.step, v) for ev in _events(logdir) if ev.HasField("summary") for v in ev.summary.value]


def _images(n=5, size=32, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, size, size, 3)).astype(np.uint8)


# ---- metrics.jsonl -----------------------------------------------------------------------
def test_rows_and_resume_truncation(tmp_path):
    wd = str(tmp_path / "run")  # does not exist yet
    w = metrics.MetricWriter(wd, 0)
    row = w.write(10, {"loss": jnp.float32(1.5), "lr": np.float64(0.1), "n": 3})
    assert row == {"step": 10, "loss": 1.5, "lr": 0.1, "n": 3}
    assert type(row["loss"]) is float
    w.write(20, {"loss": 1.0})
    w.write(30, {"loss": 0.5})
    w.close()
    with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
        f.write('{"step": 40, "lo')  # a line cut short by a crash
    w = metrics.MetricWriter(wd, 20)
    assert [r["step"] for r in _rows(wd)] == [10, 20]
    w.write(30, {"loss": 0.25})
    w.close()
    assert [(r["step"], r["loss"]) for r in _rows(wd)] == [(10, 1.5), (20, 1.0), (30, 0.25)]
    scalars = [(s, v.tag, v.simple_value) for s, v in _summaries(os.path.join(wd, "tb"))]
    assert (10, "loss", 1.5) in scalars and (30, "loss", 0.25) in scalars and (20, "lr", 0.1) not in scalars

    other = str(tmp_path / "other")  # processes other than 0
    w = metrics.MetricWriter(other, 0, enabled=False)
    assert w.write(5, {"loss": 2.0}) == {"step": 5, "loss": 2.0}
    assert w.write_eval(5, {"x": 1.0, "im": artefacts.Images(_images(1))}) == {"step": 5, "x": 1.0}
    w.close()
    assert not os.path.exists(other)


def test_remote_rewrite_strategy(tmp_path, monkeypatch):
    """An object store cannot append: the file is rewritten whole from the kept rows."""
    wd = tmp_path / "run"
    wd.mkdir()
    (wd / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    monkeypatch.setattr(metrics, "is_local", lambda path: False)
    w = metrics.MetricWriter(str(wd), 2)
    assert [r["step"] for r in _rows(wd)] == [1, 2]
    w.write(3, {"loss": 0.5})
    w.write_eval(3, {"val/f1": 0.75})
    w.close()
    assert _rows(wd) == [
        {"step": 1, "loss": 1.0},
        {"step": 2, "loss": 1.0},
        {"step": 3, "loss": 0.5},
        {"step": 3, "val/f1": 0.75},
    ]
    from tensorboardX import record_writer

    for prefix in ("gs", "s3"):
        assert isinstance(record_writer.REGISTERED_FACTORIES[prefix], metrics.EpathRecordWriterFactory)


@pytest.fixture
def memory_gs():
    """gs:// served from memory: epath's fsspec backend finds this filesystem for 'gs'/'gcs'
    (no network; the real client against an emulator is tested elsewhere)."""
    from etils.epath import backend
    from fsspec.implementations.memory import MemoryFileSystem
    from fsspec.registry import _registry

    class MemoryGCS(MemoryFileSystem):
        protocol = ("gcs", "gs")
        root_marker = ""
        store, pseudo_dirs = {}, [""]  # its own, not memory://'s

        @classmethod
        def _strip_protocol(cls, path):
            for prefix in ("gs://", "gcs://"):
                path = path[len(prefix) :] if path.startswith(prefix) else path
            return path.rstrip("/")

    before = {p: _registry.get(p) for p in ("gcs", "gs")}
    for p in before:
        _registry[p] = MemoryGCS
    backend.fsspec_backend._get_filesystem.cache_clear()
    try:
        yield MemoryGCS
    finally:
        for p, cls in before.items():
            if cls is None:
                _registry.pop(p, None)
            else:
                _registry[p] = cls
        backend.fsspec_backend._get_filesystem.cache_clear()


def test_gs_workdir(memory_gs):
    from etils import epath

    wd = epath.Path("gs://bucket/run")
    w = metrics.MetricWriter("gs://bucket/run", 0)
    assert not w.local
    for s in (1, 2, 3):
        w.write(s, {"loss": 1.0 / s})
    texts = artefacts.Texts(rows=({"x": 1},))
    w.write_eval(3, {"val/f1": 0.5, "a/im": artefacts.Images(_images(2, 8)), "t": texts})
    w.close()
    w = metrics.MetricWriter("gs://bucket/run", 2)  # resume: rows past step 2 dropped, rewritten whole
    w.write(3, {"loss": 0.125})
    w.close()
    rows = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 0.125)]
    assert (wd / "eval/step_3/a/im.png").exists() and (wd / "eval/step_3/t.jsonl").exists()
    files = sorted(memory_gs().find("bucket/run/tb"))
    assert len(files) == 2  # one per writer, through the epath record writer
    tags = {
        (ev.step, v.tag)
        for f in files
        for ev in _parse_events(memory_gs().cat(f))
        if ev.HasField("summary")
        for v in ev.summary.value
    }
    assert {(1, "loss"), (3, "loss"), (3, "val/f1"), (3, "a/im")} <= tags
    assert str(metrics.plot("gs://bucket/run")) == "gs://bucket/run/loss.png"
    assert (wd / "loss.png").read_bytes()[:4] == b"\x89PNG"


# ---- evaluation artefacts ----------------------------------------------------------------
def test_write_eval_artefacts(tmp_path):
    wd = str(tmp_path)
    imgs = _images(5)
    caps = tuple(f"a red circle left of a blue square, sample {i}" for i in range(5))
    texts = artefacts.Texts(
        rows=(
            {"prompt": "what colour?", "output": "red", "truth": "red"},
            {"prompt": "how many?", "output": "2", "truth": np.int64(3)},
        )
    )
    w = metrics.MetricWriter(wd, 0)
    w.write(40, {"loss": 0.5})
    row = w.write_eval(
        40,
        {
            "val/f1": np.float32(0.5),
            "vqa_0shot/samples": artefacts.Images(imgs, captions=caps, columns=4),
            "plain": artefacts.Images(imgs[:3].astype(np.float32) / 255.0, columns=2),
            "gen/texts": texts,
        },
    )
    w.close()
    assert row == {"step": 40, "val/f1": 0.5}
    assert _rows(wd)[-1] == {
        "step": 40,
        "val/f1": 0.5,
        "vqa_0shot/samples": "eval/step_40/vqa_0shot/samples.png",
        "plain": "eval/step_40/plain.png",
        "gen/texts": "eval/step_40/gen/texts.jsonl",
    }

    # The captioned grid: 4 columns x 2 rows of integer-upscaled tiles plus a caption strip.
    grid = np.asarray(Image.open(os.path.join(wd, "eval/step_40/vqa_0shot/samples.png")).convert("RGB"))
    gh, gw, _ = grid.shape
    tw = (gw - SEP * 5) / 4
    assert tw == int(tw) and tw % 32 == 0 and gw >= 256
    s, tw = int(tw) // 32, int(tw)
    th = tw
    strip = (gh - SEP * 3) / 2 - th
    assert strip == int(strip) and strip >= 10
    up = imgs.repeat(s, 1).repeat(s, 2)
    np.testing.assert_array_equal(grid[SEP : SEP + th, SEP : SEP + tw], up[0])
    x1, y1 = SEP + (tw + SEP), SEP + int(th + strip + SEP)  # tile 5 is row 1, column 0; tile 1 row 0 col 1
    np.testing.assert_array_equal(grid[SEP : SEP + th, x1 : x1 + tw], up[1])
    np.testing.assert_array_equal(grid[y1 : y1 + th, SEP : SEP + tw], up[4])
    caption = grid[SEP + th : SEP + th + int(strip), SEP : SEP + tw]
    assert (caption == 255).mean() > 0.5 and (caption < 128).any()  # white strip with dark text

    # Without captions the tiles are exactly packed: 2 columns x 2 rows.
    plain = np.asarray(Image.open(os.path.join(wd, "eval/step_40/plain.png")))
    s = artefacts.scale_factor(32, 2, False)
    assert s == 4 and plain.shape == (SEP + 2 * (32 * s + SEP), SEP + 2 * (32 * s + SEP), 3)
    tile = plain[SEP : SEP + 32 * s, SEP : SEP + 32 * s]
    np.testing.assert_array_equal(tile, imgs[0].repeat(s, 0).repeat(s, 1))

    with open(os.path.join(wd, "eval/step_40/gen/texts.jsonl")) as f:
        assert [json.loads(l) for l in f] == [
            {"prompt": "what colour?", "output": "red", "truth": "red"},
            {"prompt": "how many?", "output": "2", "truth": 3},
        ]

    summ = _summaries(os.path.join(wd, "tb"))
    scalars = [(st, v.tag, v.simple_value) for st, v in summ if v.HasField("simple_value")]
    assert (40, "val/f1", 0.5) in scalars
    tb_imgs = {v.tag: v.image for st, v in summ if v.HasField("image") and st == 40}
    assert set(tb_imgs) == {"vqa_0shot/samples", "plain"}
    im = tb_imgs["vqa_0shot/samples"]
    assert (im.height, im.width) == (gh, gw)
    decoded = np.asarray(Image.open(io.BytesIO(im.encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(decoded, grid)
    assert any(v.tag.startswith("gen/texts") for st, v in summ)  # the text table


def test_artefact_file_names(tmp_path):
    results = {"acc": 0.5, "a/im": artefacts.Images(_images(2)), "t": artefacts.Texts(rows=({"x": 1},))}
    assert [isinstance(v, artefacts.ARTEFACTS) for v in results.values()] == [False, True, True]
    saved = metrics.save_artefacts(str(tmp_path), 3, results)  # the eval CLI's writer
    assert saved == {"a/im": "eval/step_3/a/im.png", "t": "eval/step_3/t.jsonl"}
    assert all((tmp_path / p).is_file() for p in saved.values())
    assert metrics.artefact_relpath(7, "vqa_0shot/samples", "png") == "eval/step_7/vqa_0shot/samples.png"
    assert metrics.artefact_relpath(7, "a b/../c:d", "jsonl") == "eval/step_7/a_b/_/c_d.jsonl"


def test_artefact_validation(tmp_path):
    ok = _images(2)
    with pytest.raises(ValueError, match=r"uint8.*float"):
        artefacts.Images(ok.astype(np.int64))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        artefacts.Images(ok.astype(np.float32))  # 0..255 floats
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        artefacts.Images(ok[0])
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        artefacts.Images(ok[..., :1])
    with pytest.raises(ValueError, match="one per image"):
        artefacts.Images(ok, captions=("only one",))
    with pytest.raises(ValueError, match="single string"):
        artefacts.Images(ok[:1], captions="a caption")
    with pytest.raises(ValueError, match="columns"):
        artefacts.Images(ok, columns=0)
    with pytest.raises(ValueError, match=r"rows\[1\] must be a dict"):
        artefacts.Texts(rows=({"a": 1}, "b"))
    with pytest.raises(ValueError, match="JSON"):
        artefacts.Texts(rows=({"a": object()},))
    with pytest.raises(ValueError, match="sequence of dicts"):
        artefacts.Texts(rows={"a": 1})
    half = artefacts.Images(np.full((1, 4, 4, 3), 0.5, np.float32))
    assert half.images.dtype == np.uint8 and (half.images == 128).all()
    w = metrics.MetricWriter(str(tmp_path), 0)
    with pytest.raises(TypeError, match="Images"):
        w.write_eval(1, {"bad": "a string"})
    w.close()


# ---- TensorBoard through epath -----------------------------------------------------------
def test_epath_record_writer_factory(tmp_path, monkeypatch):
    factory = metrics.EpathRecordWriterFactory()
    d = tmp_path / "a" / "b"
    factory.directory_check(str(d))
    assert d.is_dir()
    rw = factory.open(str(d / "events"))
    rw.write(b"abc")
    assert not (d / "events").exists()  # buffered until a flush
    rw.flush()
    assert (d / "events").read_bytes() == b"abc"
    rw.write(b"def")
    rw.close()
    assert (d / "events").read_bytes() == b"abcdef"
    assert os.listdir(d) == ["events"]  # no temporary files left

    # Through tensorboardX's framing: route every record file to the factory.
    from tensorboardX import SummaryWriter, record_writer

    monkeypatch.setattr(record_writer, "open_file", factory.open)
    monkeypatch.setattr(record_writer, "directory_check", factory.directory_check)
    tb = SummaryWriter(str(tmp_path / "tb"))
    tb.add_scalar("loss", 0.25, 3)
    tb.close()
    assert [(s, v.tag, v.simple_value) for s, v in _summaries(str(tmp_path / "tb"))] == [(3, "loss", 0.25)]


# ---- Weights & Biases --------------------------------------------------------------------
def test_wandb_config_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    on = dict(enabled=True, project="mmjax", entity="", name="", mode="offline", tags=())
    with pytest.raises(ImportError, match="pip install wandb"):
        metrics.MetricWriter(str(tmp_path), 0, wandb=on)
    with pytest.raises(ValueError, match="mode"):
        metrics.MetricWriter(str(tmp_path), 0, wandb={**on, "mode": "sometimes"})
    for off in ({**on, "enabled": False}, {**on, "mode": "disabled"}, None):  # no import attempted
        metrics.MetricWriter(str(tmp_path), 0, wandb=off).close()


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    scratch = tmp_path / "wandb_home"
    scratch.mkdir()
    for var, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(scratch),
        "WANDB_CONFIG_DIR": str(scratch),
        "WANDB_CACHE_DIR": str(scratch),
        "WANDB_DATA_DIR": str(scratch),
        "WANDB_CONSOLE": "off",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
    }.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_wandb_offline(tmp_path, wandb_offline):
    import wandb

    wd = tmp_path / "run"
    cfg = dict(enabled=True, project="mmjax", entity="", name="test-run", mode="offline", tags=("ci",))
    w = metrics.MetricWriter(str(wd), 0, wandb=cfg, run_config={"optim": {"lr": 1e-3}})
    run_id = (wd / "wandb_id.txt").read_text().strip()
    assert wandb.run is not None and wandb.run.id == run_id
    w.write(10, {"loss": jnp.float32(1.25)})
    w.write_eval(
        10,
        {
            "val/f1": 0.5,
            "samples": artefacts.Images(_images(3, 8), captions=("a", "b", "c")),
            "gen": artefacts.Texts(rows=({"prompt": "p", "output": "o", "truth": ["t"]},)),
        },
    )
    w.write(20, {"loss": 0.75})
    summary = dict(wandb.run.summary)
    assert summary["loss"] == 1.25 and summary["val/f1"] == 0.5
    assert wandb.run.config["optim"] == {"lr": 1e-3} and list(wandb.run.tags) == ["ci"]
    w.close()
    assert wandb.run is None
    (run_dir,) = glob.glob(str(wd / "wandb" / f"offline-run-*-{run_id}"))
    assert os.path.exists(os.path.join(run_dir, f"run-{run_id}.wandb"))
    assert glob.glob(os.path.join(run_dir, "files", "media", "images", "samples_*.png"))
    assert glob.glob(os.path.join(run_dir, "files", "media", "table", "gen_*.table.json"))
    assert not glob.glob(str(tmp_path / "wandb_home" / "**" / "*run-*"), recursive=True)  # not in $WANDB_DIR

    w = metrics.MetricWriter(str(wd), 20, wandb=cfg)  # a resumed run continues the same W&B run
    assert wandb.run.id == run_id
    w.close()


# ---- the loss plot -----------------------------------------------------------------------
def _png_size(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_plot(tmp_path):
    wd = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        metrics.plot(str(wd))

    w = metrics.MetricWriter(str(wd), 0)
    w.write(1, {"loss": 2.0, "lr": 1e-4})  # a run with a single logged step
    w.close()
    out = metrics.plot(str(wd))
    assert str(out) == str(wd / "loss.png")
    w1, h1 = _png_size(out)
    assert 600 <= w1 <= 2000 and 300 <= h1 <= 1000

    rng = np.random.RandomState(0)
    w = metrics.MetricWriter(str(wd), 1)
    for step in range(2, 202):
        a, b = 1.0 / step + 0.05 * rng.rand(), 0.5 / step
        w.write(step, {"loss": a + b, "loss/flow": a, "loss/aux": b, "lr": 1e-4})
        if step % 50 == 0:
            w.write_eval(step, {"val/f1": step / 200, "vqa_0shot/accuracy": 0.3 + step / 1000})
    w.close()
    out = metrics.plot(str(wd), out=str(tmp_path / "curves.png"))
    w2, h2 = _png_size(out)
    assert w2 == w1 and h2 > 1.6 * h1  # a second panel for the evaluation scalars

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text('{"step": 3, "note": "x"}\n')
    with pytest.raises(ValueError, match="metrics.jsonl"):
        metrics.plot(str(empty))
