"""Per-device train-state bytes under FSDP (goal: state(fsdp=N) / state(fsdp=1) <= 1.1 / N).

  python benchmarks/state_memory.py                      # fsdp 1, 2, 4, 8 on 8 fake CPU devices
  python benchmarks/state_memory.py --width 768 --depth 12 --mlp 3072

For each fsdp size N the mesh is data=8/N x fsdp=N (tensor=1) over 8 fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8, set before jax is imported). The ViT is
configs/vit_shapes.py:tiny widened until parameters dominate the step's arguments.

  compiled   `Trainer.compile_step(...).memory_analysis()`: per-device argument bytes (train
             state + this device's slice of the batch), output, alias and temp bytes.
  state      argument bytes minus the per-device batch bytes (each batch leaf's shard shape
             under `Trainer.batch_sharding`).
  actual     sum over the leaves of a real `Trainer.init_state()` of
             `leaf.addressable_shards[0].data.nbytes` (device 0's bytes); `--no-init` skips it.
  ratio      state(N) / state(1); `ratio*N` is 1.0 for perfect sharding, goal <= 1.1.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

DEVICES = 8


def measure(fsdp: int, args) -> dict:
    import jax

    from mmjax.data import pipeline
    from mmjax.train import trainer as trainer_lib

    overrides = [
        f"mesh.data={DEVICES // fsdp}",
        f"mesh.fsdp={fsdp}",
        "mesh.tensor=1",
        f"model.width={args.width}",
        f"model.depth={args.depth}",
        f"model.mlp_dim={args.mlp}",
        f"model.num_heads={args.heads}",
        f"data.global_batch_size={args.batch}",
        f"model.scan={args.scan}",
        f"model.remat={args.remat}",
        f"model.patch_size={args.patch}",
        "model.pool=map",
        "model.dtype=float32",
    ]
    config = common.load_config("tiny", overrides)
    trainer = trainer_lib.Trainer(config, common.tempdir("mmjax_bench_mem_"))
    local = pipeline.train_dataset(config, trainer.recipe.preprocess)[0]
    abstract_batch = trainer.abstract_batch(local)
    t0 = time.perf_counter()
    compiled = trainer.compile_step(abstract_batch)
    compile_s = time.perf_counter() - t0
    stats = compiled.memory_analysis()
    batch_bytes = sum(
        math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in abstract_batch.values()
    )
    # What the shardings say device 0 holds, without allocating anything.
    expected = sum(
        math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
        for a, s in zip(jax.tree.leaves(trainer.abstract_state), jax.tree.leaves(trainer.state_shardings))
    )
    replicated = sum(
        math.prod(a.shape) * a.dtype.itemsize
        for a, s in zip(jax.tree.leaves(trainer.abstract_state), jax.tree.leaves(trainer.state_shardings))
        if s.is_fully_replicated
    )
    row = {
        "fsdp": fsdp,
        "mesh": f"data={DEVICES // fsdp} fsdp={fsdp}",
        "params": trainer.num_params,
        "argument_bytes": stats.argument_size_in_bytes,
        "batch_bytes": batch_bytes,
        "state_bytes": stats.argument_size_in_bytes - batch_bytes,
        "sharding_bytes": expected,
        "replicated_bytes": replicated,
        "output_bytes": stats.output_size_in_bytes,
        "alias_bytes": stats.alias_size_in_bytes,
        "temp_bytes": stats.temp_size_in_bytes,
        "compile_s": round(compile_s, 1),
    }
    if not args.no_init:
        state = trainer.init_state()
        jax.block_until_ready(state)
        row["actual_bytes"] = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(state))
        del state
    del compiled
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
        n = r["fsdp"]
        r["state_MiB"] = r["state_bytes"] / 2**20
        r["batch_share"] = f"{100 * r['batch_bytes'] / r['argument_bytes']:.2f}%"
        if "actual_bytes" in r:
            r["actual_MiB"] = r["actual_bytes"] / 2**20
            r["actual_vs_state"] = f"{r['actual_bytes'] - r['state_bytes']:+d} B"
        if base is not None:
            ratio = r["state_bytes"] / base["state_bytes"]
            r["ratio"] = ratio
            r["ideal"] = 1 / n
            r["ratio_x_N"] = ratio * n
            r["goal_met"] = "yes" if ratio <= 1.1 / n else "no"

    info = common.machine()
    print()
    print(f"machine: {info}")
    print(f"cpu use during the run: {monitor.summary()}")
    print(f"command: {common.command_line()}")
    print(
        f"model: ViT width={args.width} depth={args.depth} mlp={args.mlp} heads={args.heads} "
        f"scan={args.scan} remat={args.remat!r} patch={args.patch} pool=map image=32, adamw, float32; "
        f"global batch {args.batch}; params {rows[0]['params']:,}"
    )
    print()
    print(
        common.markdown_table(
            rows,
            [
                "fsdp",
                "mesh",
                "argument_bytes",
                "batch_bytes",
                "batch_share",
                "state_bytes",
                "state_MiB",
                "actual_bytes",
                "actual_vs_state",
                "replicated_bytes",
                "ratio",
                "ideal",
                "ratio_x_N",
                "goal_met",
            ],
        )
    )
    print()
    print(
        common.markdown_table(
            rows, ["fsdp", "output_bytes", "alias_bytes", "temp_bytes", "sharding_bytes", "compile_s"]
        )
    )
    common.emit("state_memory", {"machine": info, "model": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
