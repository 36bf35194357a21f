"""mmjax command line.

  mmjax train --config configs/NAME.py[:VARIANT] --workdir DIR [--config.key.sub=VALUE ...]
  mmjax eval  --config configs/NAME.py[:VARIANT] --workdir DIR [--config.key.sub=VALUE ...]
  mmjax check  --config configs/NAME.py[:VARIANT]            # validate, init abstractly, compile the step
  mmjax export --config configs/NAME.py[:VARIANT] --workdir DIR [--out DST]  # weights folder (config.init)
  mmjax convert hf-import SRC DST   # local HF folder (safetensors) -> mmjax weights (config.init)
  mmjax convert hf-export SRC DST   # mmjax LLM weights -> a folder transformers loads

`train` resumes from the latest checkpoint in DIR when there is one. `eval` runs the
recipe's evaluators on the latest checkpoint and prints and saves their table
(DIR/eval/step_N.json and .md). `check` compiles a config's train step from abstract shapes (no weights are allocated) and
prints its per-device memory: try a cluster config on fake CPU devices before launching it,
e.g. XLA_FLAGS=--xla_force_host_platform_device_count=8. `export` writes the latest checkpoint's parameters (the EMA
when there is one) as a weights folder (default DIR/export) that any config's `init` can name.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from mmjax.config import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmjax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("train", "train (or resume) a run"),
        ("eval", "evaluate the latest checkpoint"),
        ("export", "write the latest checkpoint's weights as a folder config.init can load"),
        ("check", "validate a config and compile its train step abstractly"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", required=True, help="configs/NAME.py[:VARIANT]")
        if name != "check":
            p.add_argument("--workdir", required=True, help="run folder: checkpoints, metrics.jsonl, tb/")
        if name == "export":
            p.add_argument("--out", default="", help="destination folder (default: WORKDIR/export)")
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
    from mmjax import config as config_lib, parallel  # heavy imports after argument parsing
    from mmjax.train import trainer as trainer_lib

    try:
        config = config_lib.load(args.config, overrides)
        parallel.maybe_initialize_distributed()
        if args.command == "train":
            final = trainer_lib.train(config, args.workdir)
            print(json.dumps(final))
        elif args.command == "check":
            print(json.dumps(check(config)))
        elif args.command == "eval":
            print(evaluate(config, args.workdir))
        else:
            print(json.dumps(export(config, args.workdir, args.out or os.path.join(args.workdir, "export"))))
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
    print(json.dumps({"wrote": os.path.abspath(dst), **{k: v for k, v in meta.items() if k != "model"}}))
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


def _latest(config, workdir: str):
    """(trainer, restored state, step) for the latest checkpoint in `workdir`."""
    from mmjax.train import trainer as trainer_lib, checkpoint as ckpt_lib

    trainer = trainer_lib.Trainer(config, workdir)
    ckpt = ckpt_lib.Checkpointer(workdir, keep=config.train.keep)
    if ckpt.latest_step() is None:
        raise ConfigError(f"no checkpoint in {workdir}/checkpoints; train first (mmjax train ...)")
    state, step = ckpt.restore(trainer.abstract_state_with_shardings())
    ckpt.close()
    return trainer, state, step


def export(config, workdir: str, dst: str) -> dict:
    """Writes the latest checkpoint's (EMA) parameters and the model config to `dst`."""
    from mmjax import config as config_lib
    from mmjax.train import pretrained

    _, state, step = _latest(config, workdir)
    meta = {"kind": config.recipe, "model": config_lib.to_json(config.model), "step": step, "source": workdir}
    pretrained.save(dst, state.eval_params(), meta)
    return {"wrote": os.path.abspath(dst), "step": step}


def evaluate(config, workdir: str) -> str:
    """Evaluates the latest checkpoint in `workdir`; returns the table as markdown."""
    trainer, state, step = _latest(config, workdir)
    results = trainer.evaluate(state.eval_params())
    table = "| metric | value |\n|---|---|\n" + "".join(
        f"| {k} | {v:.4f} |\n" for k, v in sorted(results.items())
    )
    out = os.path.join(workdir, "eval")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"step_{step}.json"), "w") as f:
        json.dump({"step": step, **results}, f, indent=1)
    with open(os.path.join(out, f"step_{step}.md"), "w") as f:
        f.write(f"step {step}\n\n{table}")
    return f"step {step}\n{table}"


if __name__ == "__main__":
    sys.exit(main())
