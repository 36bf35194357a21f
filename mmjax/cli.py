"""mmjax command line.

  mmjax train --config configs/NAME.py[:VARIANT] --workdir DIR [--config.key.sub=VALUE ...]
  mmjax eval  --config configs/NAME.py[:VARIANT] --workdir DIR [--config.key.sub=VALUE ...]
  mmjax convert hf-import SRC DST   # local HF folder (safetensors) -> mmjax weights (config.init)
  mmjax convert hf-export SRC DST   # mmjax LLM weights -> a folder transformers loads

`train` resumes from the latest checkpoint in DIR when there is one. `eval` runs the
recipe's evaluators on the latest checkpoint and prints and saves their table
(DIR/eval/step_N.json and .md).
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
    for name, text in (("train", "train (or resume) a run"), ("eval", "evaluate the latest checkpoint")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", required=True, help="configs/NAME.py[:VARIANT]")
        p.add_argument("--workdir", required=True, help="run folder: checkpoints, metrics.jsonl, tb/")
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
        else:
            print(evaluate(config, args.workdir))
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


def evaluate(config, workdir: str) -> str:
    """Evaluates the latest checkpoint in `workdir`; returns the table as markdown."""
    from mmjax.train import trainer as trainer_lib, checkpoint as ckpt_lib

    trainer = trainer_lib.Trainer(config, workdir)
    ckpt = ckpt_lib.Checkpointer(workdir, keep=config.train.keep)
    if ckpt.latest_step() is None:
        raise ConfigError(f"no checkpoint in {workdir}/checkpoints; train first (mmjax train ...)")
    state, step = ckpt.restore(trainer.abstract_state_with_shardings())
    ckpt.close()
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
