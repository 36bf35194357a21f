"""Per-device memory of CLIP's contrastive loss with batch-sharded (row-sharded) logits (MM-GEM).

  python benchmarks/contrastive_memory.py                   # batch 4096, 16384, 81920 on 64, 256 devices
  python benchmarks/contrastive_memory.py --devices 8 --batch 4096

The step is `jax.value_and_grad(mmjax.objectives.contrastive.clip_loss)` w.r.t. the image and text
embeddings [B, 768] (float32) and the logit scale, jitted over a mesh data=N of fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=256, set before jax is imported) with the logical
rule batch -> data; the embeddings are `jax.ShapeDtypeStruct`s sharded by rows, so nothing is
allocated. Figures per device, from `compiled.memory_analysis()`:

  argument, output  this device's embeddings (in) and their gradients + the loss (out)
  temp              XLA's scratch: the row-sharded logits, their softmax and gradients, the gathered
                    embeddings
  local logits      open_clip's local_loss logits: (B/N) x B floats x 2 matrices x 4 bytes
  gathered          the all-gathered embeddings, B x D floats x 2 x 4 bytes (open_clip holds them too)
  temp / (local + gathered)  XLA's scratch against those two
  naive             the full B x B logits x 2 matrices x 4 bytes (what every device holds unsharded)
  rows_only         the optimized HLO has a (B/N, B) buffer and no (B, B) one

The CPU compiler's temporaries estimate what a TPU or GPU compile needs; they are not its figure.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common


def measure(devices: int, batch: int, dim: int) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from mmjax.objectives import contrastive

    mesh = jax.make_mesh(
        (devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:devices]
    )
    emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    scale = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
    step = jax.jit(jax.value_and_grad(contrastive.clip_loss, argnums=(0, 1, 2)))  # fresh: traced here
    start = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules([("batch", "data")]):
        compiled = step.lower(emb, emb, scale).compile()
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    shapes = set(re.findall(r"\b[a-z]+\d*\[(\d+),(\d+)\]", compiled.as_text()))
    rows = batch // devices
    local, gathered = 2 * rows * batch * 4, 2 * batch * dim * 4
    return {
        "devices": devices,
        "batch": batch,
        "rows": rows,
        "argument_MiB": stats.argument_size_in_bytes / 2**20,
        "output_MiB": stats.output_size_in_bytes / 2**20,
        "temp_MiB": stats.temp_size_in_bytes / 2**20,
        "local_logits_MiB": local / 2**20,
        "gathered_MiB": gathered / 2**20,
        "temp_over_local_gathered": stats.temp_size_in_bytes / (local + gathered),
        "naive_MiB": 2 * batch * batch * 4 / 2**20,
        "rows_only": "yes" if (str(rows), str(batch)) in shapes and (str(batch),) * 2 not in shapes else "no",
        "compile_s": seconds,
    }


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", default="64,256", help="data-parallel sizes, comma list (<= 256)")
    parser.add_argument("--batch", default="4096,16384,81920", help="global batch sizes, comma list")
    parser.add_argument("--dim", type=int, default=768, help="embedding dimension")
    args = parser.parse_args()

    common.setup(devices=256)
    monitor = common.CpuMonitor()
    rows = []
    for n in map(int, args.devices.split(",")):
        for b in map(int, args.batch.split(",")):
            rows.append(measure(n, b, args.dim))
            print(rows[-1], flush=True)
    columns = ["devices", "batch", "rows", "argument_MiB", "output_MiB", "temp_MiB", "local_logits_MiB"]
    columns += ["gathered_MiB", "temp_over_local_gathered", "naive_MiB", "rows_only", "compile_s"]
    title = (
        f"clip_loss + gradient w.r.t. both embeddings [B, {args.dim}] float32 and the scale, "
        "batch-sharded over data=N; MiB per device:"
    )
    common.report("contrastive_memory", monitor, [(title, rows, columns)], {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
