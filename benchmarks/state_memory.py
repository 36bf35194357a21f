"""Per-device train-state bytes under FSDP (goal: state(fsdp=N) / state(fsdp=1) <= 1.1 / N).

  python benchmarks/state_memory.py                      # fsdp 1, 2, 4, 8 on 8 fake CPU devices
  python benchmarks/state_memory.py --scan --remat nothing_saveable --no-init

For each fsdp size N the mesh is data=8/N x fsdp=N (tensor=1) over 8 fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8, set before jax is imported). The ViT is
configs/vit_shapes.py:tiny widened until parameters dominate the step's arguments.

  argument   `Trainer.compile_step(...).memory_analysis()`: per-device argument bytes (train
             state + this device's slice of the batch); temp: XLA's per-device scratch.
  state      argument bytes minus the per-device batch bytes (each batch leaf's shard shape
             under `Trainer.batch_sharding`).
  actual     sum over the leaves of a real `Trainer.init_state()` of
             `leaf.addressable_shards[0].data.nbytes` (device 0's bytes); `--no-init` skips it.
  replicated the state bytes whose sharding is fully replicated (they keep ratio*N above 1).
  ratio      state(N) / state(1); `ratio*N` is 1.0 for perfect sharding, goal <= 1.1.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

DEVICES = 8


def measure(fsdp: int, args) -> dict:
    import jax

    from mmjax.data import pipeline
    from mmjax.train import trainer as trainer_lib

    model = {"width": args.width, "depth": args.depth, "mlp_dim": args.mlp, "num_heads": args.heads}
    model |= {
        "patch_size": args.patch,
        "scan": args.scan,
        "remat": args.remat,
        "pool": "map",
        "dtype": "float32",
    }
    overrides = [f"mesh.data={DEVICES // fsdp}", f"mesh.fsdp={fsdp}", "mesh.tensor=1"]
    overrides += [f"model.{k}={v}" for k, v in model.items()] + [f"data.global_batch_size={args.batch}"]
    config = common.load_config("tiny", "render", overrides)  # render: no cache to fill for one batch
    trainer = trainer_lib.Trainer(config, common.tempdir("mmjax_bench_mem_"))
    abstract_batch = trainer.abstract_batch(pipeline.train_dataset(config, trainer.recipe.preprocess)[0])
    stats = trainer.compile_step(abstract_batch).memory_analysis()
    nbytes = lambda a, sharding: math.prod(sharding.shard_shape(a.shape)) * a.dtype.itemsize
    batch_bytes = sum(nbytes(a, a.sharding) for a in abstract_batch.values())
    leaves = zip(jax.tree.leaves(trainer.abstract_state), jax.tree.leaves(trainer.state_shardings))
    row = {
        "fsdp": fsdp,
        "mesh": f"data={DEVICES // fsdp} fsdp={fsdp}",
        "params": trainer.num_params,
        "argument_bytes": stats.argument_size_in_bytes,
        "batch_bytes": batch_bytes,
        "state_bytes": stats.argument_size_in_bytes - batch_bytes,
        "replicated_bytes": sum(
            math.prod(a.shape) * a.dtype.itemsize for a, s in leaves if s.is_fully_replicated
        ),
        "temp_bytes": stats.temp_size_in_bytes,
    }
    if not args.no_init:
        state = jax.block_until_ready(trainer.init_state())
        row["actual_bytes"] = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(state))
    return row


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fsdp", default="1,2,4,8", help="fsdp sizes, comma list (each divides 8)")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--mlp", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64, help="global batch (a multiple of 8)")
    parser.add_argument("--scan", action="store_true", help="model.scan=True (layers in one nn.scan)")
    parser.add_argument("--remat", default="", help="model.remat policy, e.g. nothing_saveable")
    parser.add_argument("--no-init", action="store_true", help="skip the init_state cross-check")
    args = parser.parse_args()

    common.setup(devices=DEVICES)
    import jax

    assert jax.device_count() == DEVICES, jax.devices()
    monitor = common.CpuMonitor()
    rows = [measure(int(n), args) for n in args.fsdp.split(",")]
    base = next((r for r in rows if r["fsdp"] == 1), None)
    for r in rows:
        r["state_MiB"] = r["state_bytes"] / 2**20
        if "actual_bytes" in r:
            r["actual_minus_state"] = r["actual_bytes"] - r["state_bytes"]
        if base is not None:
            r["ratio"] = r["state_bytes"] / base["state_bytes"]
            r["ratio_x_N"] = r["ratio"] * r["fsdp"]
            r["goal_met"] = "yes" if r["ratio"] <= 1.1 / r["fsdp"] else "no"
    columns = [
        "fsdp",
        "mesh",
        "argument_bytes",
        "batch_bytes",
        "state_bytes",
        "state_MiB",
        "actual_minus_state",
    ]
    columns += ["replicated_bytes", "ratio", "ratio_x_N", "goal_met", "temp_bytes"]
    title = (
        f"ViT width={args.width} depth={args.depth} mlp={args.mlp} heads={args.heads} patch={args.patch} "
        f"scan={args.scan} remat={args.remat!r}, adamw, float32; global batch {args.batch}; "
        f"params {rows[0]['params']:,}; bytes per device:"
    )
    common.report("state_memory", monitor, [(title, rows, columns)], {"model": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
