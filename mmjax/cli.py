"""mmjax command line.

  mmjax train  --config configs/NAME.py[:VARIANT] --workdir DIR [--config.key.sub=VALUE ...]
  mmjax eval   --config ... --workdir DIR            # the recipe's evaluators on the latest checkpoint
  mmjax sample --config ... --workdir DIR (--prompt TEXT | --prompts FILE) [--image REF.png] --out OUT
  mmjax export --config ... --workdir DIR [--part NAME] [--out DST]   # a weights folder (config.init)
  mmjax check  --config ...                          # validate, init abstractly, compile the step
  mmjax plan   --config ... (--devices N | --topology v5e:4x4) [--memory-gb 16]  # memory, FLOPs, what fits
  mmjax plot   DIR [--out PNG]                       # the loss curves of a run (also written after training)
  mmjax convert hf-import SRC DST   # local HF folder (safetensors) -> mmjax weights (config.init)
  mmjax convert hf-export SRC DST   # mmjax LLM weights -> a folder transformers loads
  mmjax data convert SRC DST [--shard-size N] [--workers N]   # images / tar shards -> ArrayRecord
  mmjax data inspect PATH [-n N] [--grid OUT.png]   # a data source's size, schema, records, picture

`train` resumes from the latest checkpoint in DIR when there is one; a pipeline config (a variant
that declares stages) runs its stages in order into DIR/<stage>, skipping finished ones, and
`eval` / `sample` / `export` on its DIR use the last stage. `eval` prints the table and writes it
to DIR/eval/step_N.{json,md} (artefacts under DIR/eval/step_N/). `sample` writes PNGs (or texts)
and index.jsonl to OUT (`shapes-eval --images OUT --prompts OUT/index.jsonl` scores images).
`check` compiles a config's train step from abstract shapes (no weights are allocated) and prints
its per-device memory: try a cluster config on fake CPU devices before launching it, e.g.
XLA_FLAGS=--xla_force_host_platform_device_count=8. `export` writes the latest checkpoint's
parameters (the EMA when there is one), or the part `--part` names (e.g. `llm`), as a weights
folder (default DIR/export or DIR/export_PART). Frozen models are never exported.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from mmjax.config import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmjax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("train", "train (or resume) a run, or every stage of a pipeline"),
        ("eval", "evaluate the latest checkpoint"),
        ("sample", "run the recipe's sampler on the latest checkpoint"),
        ("export", "write the latest checkpoint's weights as a folder config.init can load"),
        ("check", "validate a config and compile its train step abstractly"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", required=True, help="configs/NAME.py[:VARIANT]")
        if name != "check":
            p.add_argument("--workdir", required=True, help="run folder: checkpoints, metrics.jsonl, tb/")
        if name == "export":
            p.add_argument("--out", default="", help="destination folder (default: WORKDIR/export[_PART])")
            p.add_argument("--part", default="", help="a part of the model the recipe exports, e.g. llm")
        if name == "sample":
            src = p.add_mutually_exclusive_group(required=True)
            src.add_argument("--prompt", help="one prompt")
            src.add_argument(
                "--prompts", help="JSONL, one object with 'text' per line (shapes-eval prompt files work)"
            )
            p.add_argument("--image", default="", help="a reference image (PNG/JPEG) for every prompt")
            p.add_argument("--num-samples", type=int, default=1, help="outputs per prompt")
            p.add_argument("--out", required=True, help="output folder")
    from mmjax import plan

    plan.add_parser(sub)
    p = sub.add_parser("plot", help="plot a run's loss curves to a PNG")
    p.add_argument("workdir")
    p.add_argument("--out", default="", help="default: WORKDIR/loss.png")
    data = sub.add_parser("data", help="convert or inspect a data set").add_subparsers(
        dest="data", required=True
    )
    p = data.add_parser("convert", help="an image folder or WebDataset shards -> ArrayRecord shards")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--source", default="", help="image_folder or webdataset (default: guessed from SRC)")
    p.add_argument("--shard-size", type=int, default=4096, help="records per ArrayRecord shard")
    p.add_argument("--workers", type=int, default=0, help="processes (default: one per core)")
    p = data.add_parser("inspect", help="a data source's size, schema, first records, a picture")
    p.add_argument("path")
    p.add_argument("--source", default="", help="default: guessed from PATH")
    p.add_argument("-n", type=int, default=4, help="records to print")
    p.add_argument("--grid", default="", help="write a PNG of up to 16 images with their captions")
    p.add_argument("--size", type=int, default=128, help="image side the records are decoded to")
    p = sub.add_parser("convert", help="convert weights between Hugging Face and mmjax")
    p.add_argument("direction", choices=["hf-import", "hf-export"])
    p.add_argument("src")
    p.add_argument("dst")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, rest = _parser().parse_known_args(argv)
    overrides = [a[len("--config.") :] for a in rest if a.startswith("--config.")]
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        _parser().error(
            f"unrecognized arguments: {' '.join(unknown)} (overrides look like --config.key=VALUE)"
        )
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mmjax").setLevel(logging.INFO)
    from absl import flags  # grain's worker processes read absl flags

    flags.FLAGS.mark_as_parsed()
    if args.command == "convert":
        return convert(args.direction, args.src, args.dst)
    if args.command == "data":
        return data_command(args)
    if args.command == "plan":
        from mmjax import plan

        return plan.main(args, overrides)
    from mmjax import config as config_lib, distributed

    if args.command == "plot":
        from mmjax.train import metrics

        print(metrics.plot(args.workdir, args.out or None))
        return 0
    try:
        config = config_lib.load(args.config, overrides)
    except ConfigError as e:
        print(f"mmjax: config error: {e}", file=sys.stderr)
        return 2
    if distributed.should_supervise(config):
        return distributed.supervise(argv, getattr(args, "workdir", ""))
    from mmjax.train import stages, trainer as trainer_lib  # heavy imports after argument parsing

    try:
        distributed.initialize(config)
        if args.command == "train":
            print(json.dumps(stages.train(config, args.workdir)))
            print(report(*stages.last(config, args.workdir)))
            return 0
        if args.command == "check":  # every stage of a pipeline, its links left open (no weights)
            for name, part in stages.parts(config):
                print(json.dumps({**({"stage": name} if name else {}), **check(part)}))
            return 0
        config, workdir = stages.last(config, args.workdir)
        if args.command == "eval":
            print(evaluate(config, workdir))
        elif args.command == "sample":
            print(json.dumps(sample(config, workdir, args)))
        else:
            default = f"{workdir}/export" + (f"_{args.part}" if args.part else "")
            print(json.dumps(export(config, workdir, args.out or default, args.part)))
    except ConfigError as e:
        print(f"mmjax: config error: {e}", file=sys.stderr)
        return 2
    except trainer_lib.TooManyBadSteps as e:
        print(f"mmjax: {e}", file=sys.stderr)
        return 3
    except trainer_lib.Preempted as e:
        return e.code
    return 0


def convert(direction: str, src: str, dst: str) -> int:
    from mmjax.interop import hf

    try:
        meta = (hf.hf_import if direction == "hf-import" else hf.hf_export)(src, dst)
    except (hf.ConversionError, ConfigError) as e:
        print(f"mmjax convert: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"wrote": dst, **{k: v for k, v in meta.items() if k != "model"}}))
    return 0


def data_command(args) -> int:
    from mmjax.data import convert as data_lib

    try:
        if args.data == "convert":
            out = data_lib.convert(args.src, args.dst, args.source, args.shard_size, args.workers)
        else:
            out = data_lib.inspect(args.path, args.source, args.n, args.grid, args.size)
    except ConfigError as e:
        print(f"mmjax data {args.data}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=1))
    return 0


def check(config) -> dict:
    """Validates `config`, builds the state abstractly and compiles the train step; returns the
    parameter count, per-device memory and compile time. Nothing is allocated or trained."""
    import time

    from mmjax.train import trainer as trainer_lib

    start = time.perf_counter()
    trainer = trainer_lib.Trainer(config, "")
    compiled = trainer.compile_step(trainer.abstract_batch_from_config())
    info = trainer_lib.log_memory(compiled, trainer.num_params)
    return {**info, "mesh": dict(trainer.mesh.shape), "seconds": round(time.perf_counter() - start, 1)}


def export(config, workdir: str, dst: str, part: str = "") -> dict:
    """Writes the latest checkpoint's (EMA) weights of `part` ('' = the whole model) to `dst`."""
    from mmjax.train import trainer as trainer_lib

    return trainer_lib.Trainer(config, workdir).export(dst, part)


def evaluate(config, workdir: str) -> str:
    """Evaluates the latest checkpoint in `workdir`; returns the table as markdown."""
    from mmjax.eval import artefacts
    from mmjax.paths import resolve
    from mmjax.train import metrics

    from mmjax.train import trainer as trainer_lib

    trainer = trainer_lib.Trainer(config, workdir)
    state, frozen, _, step = trainer.latest()
    results = trainer.evaluate(state, frozen)
    saved = metrics.save_artefacts(workdir, step, results)
    scalars = {k: v for k, v in results.items() if not isinstance(v, artefacts.ARTEFACTS)}
    table = "| metric | value |\n|---|---|\n" + "".join(
        f"| {k} | {v:.4f} |\n" for k, v in sorted(scalars.items())
    )
    table += "".join(f"| {k} | {v} |\n" for k, v in sorted(saved.items()))
    out = resolve(workdir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"step_{step}.json").write_text(json.dumps({"step": step, **scalars, **saved}, indent=1))
    (out / f"step_{step}.md").write_text(f"step {step}\n\n{table}")
    return f"step {step}\n{table}"


def report(config, workdir: str) -> str:
    """The last evaluation of a run (a pipeline's last stage): a table per evaluator, with the
    paths of its artefacts (PNG grids, JSONL texts)."""
    from mmjax.paths import resolve
    from mmjax.train import metrics

    names = set(config.evals)
    rows = [r for r in metrics.read_rows(workdir) if any(k.partition("/")[0] in names for k in r)]
    if not rows:
        return ""
    row, out = rows[-1], [f"evaluation at step {rows[-1]['step']} ({workdir}):"]
    for name in sorted(names):
        items = {k.partition("/")[2]: v for k, v in row.items() if k.partition("/")[0] == name}
        out += [f"\n{name}\n| metric | value |\n|---|---|"]
        out += [f"| {k} | {v:.4f} |" for k, v in items.items() if isinstance(v, float)]
        out += [f"{k}: {resolve(workdir) / v}" for k, v in items.items() if isinstance(v, str)]
    return "\n".join(out)


def sample(config, workdir: str, args) -> dict:
    """Runs the recipe's sampler on the latest checkpoint; writes PNGs or texts and index.jsonl."""
    import numpy as np
    from PIL import Image

    from mmjax.paths import resolve

    if args.prompt is not None:
        prompts = [{"text": args.prompt}]
    else:
        file = resolve(args.prompts)
        if not file.exists():
            raise ConfigError(f"--prompts {args.prompts}: no such file")
        prompts = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    if args.image:
        with resolve(args.image).open("rb") as f:
            image = np.asarray(Image.open(f).convert("RGB"))
        prompts = [{**p, "image": image} for p in prompts]
    from mmjax.train import trainer as trainer_lib

    from mmjax.recipes.base import Recipe

    trainer = trainer_lib.Trainer(config, workdir)
    if type(trainer.recipe).sample is Recipe.sample:
        trainer.recipe.sample(None, [], 0, None)  # raises the recipe's "no sampler" error
    state, frozen, _, step = trainer.latest()
    ctx = trainer.context(
        state, "sample"
    )  # outside the mesh rules: a few prompts need not fill the batch axis
    outputs = trainer.recipe.sample(trainer.full_params(state, frozen), prompts, args.num_samples, ctx)
    out = resolve(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines, images = [], 0
    for i, (p, samples) in enumerate(zip(prompts, outputs)):
        fields = {k: v for k, v in p.items() if k not in ("image", "file")}
        for j, s in enumerate(samples):
            if "image" in s:
                name = f"{i:05d}_{j}.png"
                with (out / name).open("wb") as f:
                    Image.fromarray(np.asarray(s["image"], np.uint8)).save(f, format="PNG")
                lines.append({"file": name, **fields, "sample": j})
                images += 1
            else:
                lines.append({**fields, "sample": j, "output": s["text"]})
    (out / "index.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return {
        "wrote": str(out),
        "step": step,
        "prompts": len(prompts),
        "images": images,
        "texts": len(lines) - images,
    }


if __name__ == "__main__":
    sys.exit(main())
