"""`mmjax data convert` (folder / tar shards -> ArrayRecord: parallel, resumable, stats) and
`mmjax data inspect` (size, schema, records, a grid picture)."""

import json

import numpy as np
import pytest
from PIL import Image
from test_sources import COLORS, TRUNCATED, encode, sample, write_shard

from mmjax import cli
from mmjax.config import ConfigError, component
from mmjax.data import convert, sources
from mmjax.data.pipeline import make_source


def _folder(root, n=7):
    root.mkdir()
    lines = []
    for i in range(n):
        (root / f"{i}.png").write_bytes(encode(COLORS[i % len(COLORS)]))
        lines.append(json.dumps({"image": f"{i}.png", "caption": f"picture {i}", "tag": i}))
    (root / "bad.jpg").write_bytes(TRUNCATED)
    (root / "text.jpg").write_bytes(b"not an image")
    lines += [json.dumps({"image": "bad.jpg", "caption": "bad"}), json.dumps({"image": "text.jpg"}), "{oops"]
    (root / "captions.jsonl").write_text("\n".join(lines))
    return root


def _records(path, kind):
    src = make_source(component(source=kind, path=str(path)), 32, cache=False)
    return [r for r in (src[i] for i in range(len(src))) if sources.keep(r)]


def test_convert_a_folder_in_parallel_resumes_and_keeps_the_records(tmp_path):
    folder, out = _folder(tmp_path / "images"), tmp_path / "ar"
    stats = convert.convert(folder, out, shard_size=3, workers=2, progress=False)
    assert (stats["records"], stats["shards"], stats["converted_now"]) == (7, 3, 3)
    assert stats["skipped"] == {"truncated or corrupt": 1, "not an image": 1, "bad manifest line": 1}
    assert stats["bytes"] == sum(len((folder / f"{i}.png").read_bytes()) for i in range(7))
    assert json.loads((out / "_stats.json").read_text())["records"] == 7
    want, got = _records(folder, "image_folder"), _records(out, "array_record")
    assert [r["text"] for r in got] == [r["text"] for r in want] == [f"picture {i}" for i in range(7)]
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["key"] == b["key"] and a["tag"] == b["tag"]

    # interrupted: the last shard never finished (a temporary file left, no stats), then resumed
    last = "data-00002-of-00003"
    (out / f"{last}.stats.json").unlink()
    (out / f"{last}.array_record").rename(out / f"_tmp_{last}")
    again = convert.convert(folder, out, shard_size=3, workers=1, progress=False)
    assert again["converted_now"] == 1 and again["records"] == 7
    assert [r["text"] for r in _records(out, "array_record")] == [r["text"] for r in want]
    with pytest.raises(ConfigError, match="other settings"):
        convert.convert(folder, out, shard_size=4, progress=False)


def test_cli_converts_webdataset_and_inspects(tmp_path, capsys):
    wds = tmp_path / "wds"
    wds.mkdir()
    write_shard(
        wds / "00000.tar",
        [sample(f"{i:09d}", COLORS[i % 3], "jpg", f"caption {i}") for i in range(5)]
        + [("000000009", {"txt": b"no image"})],
    )
    out = tmp_path / "ar"
    assert cli.main(["data", "convert", str(wds), str(out), "--workers", "1"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["source"] == "webdataset" and stats["records"] == 5 and stats["skipped"] == {"no image": 1}

    grid = tmp_path / "grid.png"
    assert cli.main(["data", "inspect", str(out), "-n", "2", "--grid", str(grid)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["records"] == 5 and info["schema"]["image"] == "uint8[128, 128, 3]"
    assert [r["text"] for r in info["first"]] == ["caption 0", "caption 1"]
    assert Image.open(grid).size[0] >= 4 * 128
    assert cli.main(["data", "convert", str(tmp_path / "missing"), str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
