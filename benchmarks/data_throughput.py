"""Real-data input throughput: decode + crop + augment samples/s against a PyTorch DataLoader +
PIL pipeline, reduced-size JPEG decode against full decode, and `mmjax data convert` MB/s
against a plain file copy.

  python benchmarks/data_throughput.py --images 400 --reps 3

The data: `--images` JPEGs of 640 x 480 (random smooth colour fields with noise, quality 90,
about 100 KB each) in a folder. Every pipeline makes 64 x 64 random crops with random flips in
batches of 32, for num_workers 0 and 2:

  mmjax        the training stream (`pipeline.train_dataset`) over the image_folder source
               (`crop=random_crop, flip=True`, decode with Pillow's draft at the target size)
  torch_pil    torch.utils.data.DataLoader over a Dataset doing what a typical PIL pipeline
               does: Image.open, convert('RGB'), a random square crop resized to 64, a flip,
               np.asarray; DataLoader's default collate to a torch tensor
  torch_same   the same DataLoader over mmjax's own decode + resize_crop (the loaders compared
               on equal per-image work)

decode: ms per image of `decode.decode(data)` (full) and `decode.decode(data, 64)` (draft),
then `resize_crop` to 64. convert: MB/s of source bytes for `mmjax data convert` (2 workers,
every image checked to decode) and for `shutil.copytree` of the same folder.
"""

from __future__ import annotations

import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common


def make_images(folder: str, n: int) -> int:
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    total = 0
    for i in range(n):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(small).resize((640, 480), Image.BICUBIC), np.int16)
        image = np.clip(image + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)
        path = os.path.join(folder, f"{i:05d}.jpg")
        Image.fromarray(image).save(path, "JPEG", quality=90)
        total += os.path.getsize(path)
    return total


class TorchPIL:
    """The typical PIL pipeline (no reduced-size decode)."""

    def __init__(self, files, size):
        self.files, self.size = files, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(i)
        with Image.open(self.files[i]) as im:
            im = im.convert("RGB")
            side = min(im.size)
            x, y = rng.integers(0, im.size[0] - side + 1), rng.integers(0, im.size[1] - side + 1)
            im = im.crop((x, y, x + side, y + side)).resize((self.size, self.size), Image.BILINEAR)
            a = np.asarray(im)
        return a[:, ::-1].copy() if rng.random() < 0.5 else a


class TorchSame:
    """mmjax's decode and crop inside a torch Dataset."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return self.source[i]["image"]


def _image_only(record):
    return {"image": record["image"]}


def rate(make_iter, batches: int, batch: int) -> float:
    it = make_iter()
    next(it)  # worker start-up, not measured
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - t0)


def main():
    p = common.parser(__doc__)
    p.add_argument("--images", type=int, default=400)
    args = p.parse_args()
    common.setup()
    import torch

    from mmjax.config import component
    from mmjax.data import convert, decode, pipeline

    root = common.tempdir("mmjax_bench_data_")
    folder = os.path.join(root, "images")
    nbytes = make_images(folder, args.images)
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    source = pipeline.make_source(
        component(source="image_folder", path=folder, crop="random_crop", flip=True), 64, cache=False
    )
    batch, batches = 32, max(args.images // 32 - 2, 4)
    monitor = common.CpuMonitor()

    config = common.load_config(overrides=["data.image_size=64", f"data.global_batch_size={batch}"])
    with config.unlocked():
        config.data.components = {
            "photos": component(source="image_folder", path=folder, crop="random_crop", flip=True)
        }

    def mmjax_iter(workers):  # the training stream itself: shuffled, mixed, chunked to the workers
        return pipeline.train_dataset(config, lambda name: _image_only, num_workers=workers)

    def torch_iter(dataset, workers):
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, shuffle=False)
        return iter(loader)

    pipelines = {
        "mmjax": mmjax_iter,
        "torch_pil": lambda w: torch_iter(TorchPIL(files, 64), w),
        "torch_same": lambda w: torch_iter(TorchSame(source), w),
    }
    rows = {(name, w): [] for name in pipelines for w in (0, 2)}
    blobs = [open(f, "rb").read() for f in files[:100]]
    import numpy as np

    crop_rng = np.random.default_rng(0)
    timings = {"full": [], "draft": []}
    copy_mbs, convert_mbs = [], []
    for rep in range(args.reps):
        for (name, w), out in rows.items():
            common.quiet(args.wait_quiet)
            out.append(rate(lambda: pipelines[name](w), batches, batch))
        for mode, target in (("full", None), ("draft", 64)):
            t0 = time.perf_counter()
            for b in blobs:
                decode.resize_crop(decode.decode(b, target).image, 64, "random_crop", crop_rng, True)
            timings[mode].append(1e3 * (time.perf_counter() - t0) / len(blobs))
        t0 = time.perf_counter()
        shutil.copytree(folder, os.path.join(root, f"copy{rep}"))
        copy_mbs.append(nbytes / 1e6 / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        convert.convert(folder, os.path.join(root, f"ar{rep}"), shard_size=64, workers=2, progress=False)
        convert_mbs.append(nbytes / 1e6 / (time.perf_counter() - t0))
    med = common.median
    table = [
        {
            "pipeline": name,
            "num_workers": w,
            "samples/s": med(v),
            "range": common.spread(v),
            "ratio to torch_pil": med(v) / med(rows[("torch_pil", w)]),
        }
        for (name, w), v in rows.items()
    ]
    decode_rows = [
        {
            "decode": m,
            "ms per image": med(v),
            "range": common.spread(v),
            "speed-up": med(timings["full"]) / med(v),
        }
        for m, v in timings.items()
    ]
    convert_rows = [
        {
            "what": "mmjax data convert (2 workers)",
            "MB/s": med(convert_mbs),
            "range": common.spread(convert_mbs),
        },
        {"what": "shutil.copytree", "MB/s": med(copy_mbs), "range": common.spread(copy_mbs)},
    ]
    common.report(
        "data_throughput",
        monitor,
        [
            (
                f"{args.images} JPEGs 640x480 ({nbytes / 1e6:.1f} MB) -> 64 px random crops, batch 32:",
                table,
                ["pipeline", "num_workers", "samples/s", "range", "ratio to torch_pil"],
            ),
            ("decode + resize_crop to 64 px:", decode_rows, ["decode", "ms per image", "range", "speed-up"]),
            ("conversion:", convert_rows, ["what", "MB/s", "range"]),
        ],
        {"pipelines": table, "decode": decode_rows, "convert": convert_rows, "source_mb": nbytes / 1e6},
    )


if __name__ == "__main__":
    main()
