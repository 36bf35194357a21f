"""The local GCS emulator (tests/gcs.py) serves gs:// to every client mmjax uses: epath
(fsspec + gcsfs), Orbax (tensorstore's `gcs` driver for arrays, epath for the rest),
Grain's iterator checkpoints, and child processes that get the emulator's env."""

import json
import os
import subprocess
import sys
import urllib.request

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


def _tree(seed):
    k = jax.random.key(seed)
    return {
        "w": jax.random.normal(k, (8, 16), jnp.float32),
        "b": jnp.arange(16, dtype=jnp.bfloat16),
        "step": jnp.asarray(seed, jnp.int32),
    }


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _objects(emulator, prefix):
    """Object names under `prefix`, asked from the emulator itself (not through a client)."""
    url = f"{emulator.url}/storage/v1/b/{emulator.bucket}/o?prefix={prefix}"
    with urllib.request.urlopen(url, timeout=10) as r:
        return [o["name"] for o in json.loads(r.read()).get("items", [])]


def _assert_emulator_log_clean(emulator):
    with open(emulator.log_path, errors="replace") as f:
        log = f.read()
    # an API call the emulator lacks (501) or a handler crash
    assert "not implemented" not in log and "Traceback" not in log, log[-4000:]


def test_tensorstore_kvstore(gcs_emulator):
    import tensorstore as ts

    kv = ts.KvStore.open("gs://bucket/ts/").result()
    kv.write(b"a/b", b"value").result()
    assert kv.read(b"a/b").result().value == b"value"
    assert kv.list().result() == [b"a/b"]
    assert _objects(gcs_emulator, "ts/") == ["ts/a/b"]
    assert epath.Path("gs://bucket/ts/a/b").read_bytes() == b"value"  # the same bucket via gcsfs

    # generation preconditions (OCDBT commits its manifest by compare-and-swap)
    g1 = kv.write(b"m", b"one").result().generation
    g2 = kv.write(b"m", b"two", if_equal=g1).result().generation
    assert g2 not in (b"", g1)
    assert kv.write(b"m", b"stale", if_equal=g1).result().generation == b""  # 412: not written
    read = kv.read(b"m").result()  # a media read: its generation is the x-goog-generation header
    assert read.value == b"two" and read.stamp.generation == g2
    assert kv.read(b"m", if_not_equal=g2).result().state == "unspecified"  # 304: not modified


def test_epath_file_ops(gcs_emulator, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a gs:// path mistaken for a local one would land here
    root = epath.Path("gs://bucket/epath")
    assert str(root) == "gs://bucket/epath"
    a = root / "a.txt"
    a.write_text("hello")
    (root / "sub" / "b.bin").write_bytes(b"\x00\x01")
    assert a.exists() and a.read_text() == "hello"
    assert (root / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    assert not (root / "missing").exists()
    assert root.is_dir() and (root / "sub").is_dir() and not a.is_dir()
    assert sorted(p.name for p in root.iterdir()) == ["a.txt", "sub"]
    assert [str(p) for p in root.glob("*.txt")] == ["gs://bucket/epath/a.txt"]
    assert [str(p) for p in root.glob("*/*.bin")] == ["gs://bucket/epath/sub/b.bin"]

    a.rename(root / "c.txt")  # file rename (gcsfs objects.moveTo)
    assert not a.exists() and (root / "c.txt").read_text() == "hello"
    (root / "sub").rename(root / "sub2")  # "directory" rename: every object under the prefix
    assert not (root / "sub").exists() and (root / "sub2" / "b.bin").read_bytes() == b"\x00\x01"

    (root / "d").mkdir(parents=True, exist_ok=True)
    (root / "d" / "x").write_text("x")
    root.rmtree()
    assert not root.exists() and not (root / "sub2" / "b.bin").exists()

    # gs:// paths never land on the local disk (e.g. as a `gs:` folder in the cwd)
    assert not os.path.exists("gs:") and list(tmp_path.iterdir()) == []
    _assert_emulator_log_clean(gcs_emulator)


def test_orbax_and_grain_on_bucket(gcs_emulator, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt_dir = epath.Path("gs://bucket/run/checkpoints")
    tree = _tree(1)

    ds = grain.MapDataset.range(100).shuffle(seed=0).batch(4)
    it = iter(ds)
    for _ in range(3):
        next(it)

    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True, create=True)
    with ocp.CheckpointManager(ckpt_dir, options=options) as mngr:
        for step in (1, 2, 3):
            assert mngr.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(_tree(step)),
                    data=grain.checkpoint.CheckpointSave(it),
                ),
            )
        mngr.wait_until_finished()
        assert mngr.all_steps() == [2, 3]  # max_to_keep deleted step 1 on the bucket
    after_save = [next(it) for _ in range(2)]

    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["2", "3"]
    assert not (ckpt_dir / "1").exists()
    # the arrays went through tensorstore's gcs driver to the emulator (OCDBT files)
    names = _objects(gcs_emulator, "run/checkpoints/3/")
    assert "run/checkpoints/3/state/manifest.ocdbt" in names, names
    assert any(n.startswith("run/checkpoints/3/state/ocdbt.process_0/d/") for n in names), names
    assert any(n.startswith("run/checkpoints/3/data/") for n in names), names

    # A fresh manager (as after a restart) finds the steps by listing the bucket.
    with ocp.CheckpointManager(ckpt_dir, options=options) as mngr:
        assert mngr.latest_step() == 3
        it2 = iter(ds)
        restored = mngr.restore(
            3,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(tree)),
                data=grain.checkpoint.CheckpointRestore(it2),
            ),
        )
    _assert_trees_equal(restored["state"], _tree(3))
    for want in after_save:
        np.testing.assert_array_equal(next(it2), want)

    # A single StandardCheckpointer tree (e.g. exported params), with enough leaves that
    # tensorstore revalidates the OCDBT manifest by ranged reads (their generation comes from
    # the x-goog-generation header) and commits it several times.
    params = epath.Path("gs://bucket/w/params")
    tree = {**tree, **{f"a{i}": jnp.full((64,), i, jnp.float32) for i in range(100)}}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(params, tree)
        ckptr.wait_until_finished()
    assert params.is_dir() and any(params.iterdir())
    with ocp.StandardCheckpointer() as ckptr:
        back = ckptr.restore(params, _abstract(tree))
    _assert_trees_equal(back, tree)

    assert not os.path.exists("gs:") and list(tmp_path.iterdir()) == []
    _assert_emulator_log_clean(gcs_emulator)


def test_child_process_reads_bucket(gcs_emulator):
    """A child (as `python -m mmjax.cli ...` would be) sees the parent's bucket via the env."""
    import tensorstore as ts

    src = epath.Path("gs://bucket/child/from_parent.txt")
    src.write_text("written by the parent")
    ts.KvStore.open("gs://bucket/child/kv/").result().write(b"k", b"tensorstore").result()
    code = (
        "import tensorstore as ts\n"
        "from etils import epath\n"
        "p = epath.Path('gs://bucket/child/from_parent.txt')\n"
        "print(p.read_text())\n"
        "print(ts.KvStore.open('gs://bucket/child/kv/').result().read(b'k').result().value.decode())\n"
        "(p.parent / 'from_child.txt').write_text('written by the child')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=gcs_emulator.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[:2] == ["written by the parent", "tensorstore"]
    assert (src.parent / "from_child.txt").read_text() == "written by the child"
    _assert_emulator_log_clean(gcs_emulator)
