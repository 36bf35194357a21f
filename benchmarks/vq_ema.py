"""Time and memory of one UniCode EMA codebook update step at the full-scale codebook.

  python benchmarks/vq_ema.py                                   # K 16384 x E 4096, N 4096: ~5.5 min, 2 cores
  python benchmarks/vq_ema.py --num-codes 1024 --width 256 --features 1024 --chunks 512,256  # smoke

One update, jitted, on one device: `nearest(x, codebook, chunk)` from mmjax.objectives.quantization,
then the EMA statistics, then `ema_update`, for x [N, E] (this device's features) and a codebook,
EMA cluster sizes and EMA sums of K codes of width E, all float32 (random normals, so no ties).
K = 16,384 codes of width 4,096 (LLaMA-2-7B's embedding width) is UniCode's full-scale codebook.
The statistics are computed two ways (--stats): `segment_sum` (`jax.ops.segment_sum`, the body of
`quantization.ema_stats`) and `onehot` (a one-hot [N, K] matrix times x, its previous body).

Table 1, the update: chunk 0 is the dense lookup (the [N, K] distances at once); chunk c maps
over N / c row chunks (`lax.map`), holding [c, K] distances at a time. Table 2, the statistics
alone on fixed indices, against a float64 numpy reference (`np.add.at`).

  ms           median wall time of --reps calls of the compiled function (after one warm-up call),
               each timed to `jax.block_until_ready`; all configurations interleaved per round
  argument     `jax.jit(f).lower(...).compile().memory_analysis()`: argument_size_in_bytes;
  output, temp output_size_in_bytes, temp_size_in_bytes (XLA's scratch)
  donated temp temp_size_in_bytes with the codebook state donated (donate_argnums: codebook,
               cluster sizes, EMA sums), as a train step donates it. Without donation XLA may put
               temporaries in the output buffers before the outputs are written (at K = 16,384,
               E = N = 4,096 the [N, K] distances are exactly the size of a [K, E] output), so
               the plain temp can read near zero
  / dense      the ratio to the dense (chunk 0) row with the same statistics; / onehot: to onehot
  distances    the distance block one lookup step holds, rows x K x 4 bytes

The CPU compiler's buffer assignment estimates what a TPU or GPU compile needs; it is not its
figure, and CPU times say nothing of an accelerator's.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

MiB = 2**20


def onehot_stats(x, indices, num_codes):
    """`ema_stats` by a one-hot [N, K] matmul (the body before segment_sum)."""
    import jax
    import jax.numpy as jnp

    onehot = jax.nn.one_hot(indices, num_codes, dtype=jnp.float32)
    sums = jnp.matmul(onehot.T, x.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return onehot.sum(0), sums


def segment_stats(x, indices, num_codes):
    """`ema_stats` by `jax.ops.segment_sum` (no [N, K] array)."""
    import jax
    import jax.numpy as jnp

    counts = jax.ops.segment_sum(jnp.ones(indices.shape, jnp.float32), indices, num_segments=num_codes)
    return counts, jax.ops.segment_sum(x.astype(jnp.float32), indices, num_segments=num_codes)


def memory(fn, args, donate=()) -> dict:
    import jax

    stats = jax.jit(fn, donate_argnums=donate).lower(*args).compile().memory_analysis()
    return {
        "argument_MiB": stats.argument_size_in_bytes / MiB,
        "output_MiB": stats.output_size_in_bytes / MiB,
        "alias_MiB": stats.alias_size_in_bytes / MiB,
        "temp_MiB": stats.temp_size_in_bytes / MiB,
    }


def compile_row(fn, args, **fields) -> dict:
    import jax

    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - start
    jax.block_until_ready(compiled(*args))  # warm-up
    return {
        **fields,
        "compiled": compiled,
        "args": args,
        "times": [],
        **memory(fn, args),
        "compile_s": seconds,
    }


def time_rows(rows: list[dict], reps: int) -> None:
    import jax

    for _ in range(reps):  # interleaved: a slow spell of other load hits every row alike
        for row in rows:
            t0 = time.perf_counter()
            jax.block_until_ready(row["compiled"](*row["args"]))
            row["times"].append(1e3 * (time.perf_counter() - t0))


def finish(rows: list[dict], base: dict) -> list[dict]:
    """The rows with their medians and their ratios to the `base` row (the same stats' dense one)."""
    out = []
    for row in rows:
        ref = base[row["stats"]]
        row = {k: v for k, v in row.items() if k not in ("compiled", "args")}
        row |= {"ms": common.median(row["times"]), "ms_range": common.spread(row["times"])}
        row["ms_over_dense"] = row["ms"] / common.median(ref["times"])
        for key in ("temp_MiB", "donated_temp_MiB"):
            if key in row:
                row[key.replace("_MiB", "_over_dense")] = row[key] / ref[key] if ref[key] else float("nan")
        out.append(row)
    return out


def main():
    parser = common.parser(__doc__)
    parser.set_defaults(data="")  # no input pipeline here
    parser.add_argument("--num-codes", type=int, default=16384, help="K, codebook size")
    parser.add_argument("--width", type=int, default=4096, help="E, code width")
    parser.add_argument("--features", type=int, default=4096, help="N, features per device")
    parser.add_argument("--chunks", default="1024,512,256", help="nearest row chunks, comma list (0: dense)")
    parser.add_argument("--stats", default="segment_sum,onehot", help="ema_stats bodies, comma list")
    parser.add_argument("--decay", type=float, default=0.99)
    args = parser.parse_args()

    common.setup()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mmjax.objectives import quantization as vq

    K, E, N = args.num_codes, args.width, args.features
    chunks = [0]
    for c in map(int, args.chunks.split(",")):
        if c <= 0 or c >= N or N % c:
            print(f"skipping chunk={c}: not a proper divisor of N={N}", flush=True)
        elif c not in chunks:
            chunks.append(c)

    kx, kc = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (N, E), jnp.float32)
    codebook = jax.random.normal(kc, (K, E), jnp.float32)
    cluster_size = jnp.ones((K,), jnp.float32)
    embed_sum = codebook  # a codebook of EMA means with cluster size 1
    state = (x, codebook, cluster_size, embed_sum)

    def update(chunk, stats):
        def step(x, codebook, cluster_size, embed_sum):
            idx = vq.nearest(x, codebook, chunk)
            counts, sums = stats(x, idx, K)
            return vq.ema_update(cluster_size, embed_sum, counts, sums, args.decay)

        return step

    variants = {"segment_sum": segment_stats, "onehot": onehot_stats}
    names = args.stats.split(",")
    monitor = common.quiet(args.wait_quiet)
    updates = []
    for name in names:
        for c in chunks:
            row = compile_row(update(c, variants[name]), state, chunk=c, stats=name)
            row["distances_MiB"] = (c or N) * K * 4 / MiB
            # a train step donates the codebook state: its outputs alias the inputs
            row["donated_temp_MiB"] = memory(update(c, variants[name]), state, donate=(1, 2, 3))["temp_MiB"]
            updates.append(row)
    idx = jax.jit(vq.nearest)(x, codebook)
    stats_rows = [compile_row(lambda x, i, fn=variants[n]: fn(x, i, K), (x, idx), stats=n) for n in names]
    time_rows(updates + stats_rows, args.reps)

    x64, idx64 = np.asarray(x, np.float64), np.asarray(idx)
    true_sums = np.zeros((K, E))
    np.add.at(true_sums, idx64, x64)
    true_counts = np.bincount(idx64, minlength=K)
    for row in stats_rows:
        counts, sums = (np.asarray(a) for a in variants[row["stats"]](x, idx, K))
        row["counts_exact"] = "yes" if np.array_equal(counts, true_counts) else "no"
        row["max_abs_err_vs_f64"] = float(np.abs(sums - true_sums).max())
    used = int((true_counts > 0).sum())

    dense = {row["stats"]: row for row in updates if row["chunk"] == 0}
    onehot = next((r for r in stats_rows if r["stats"] == "onehot"), stats_rows[0])
    updates, stats_rows = finish(updates, dense), finish(stats_rows, {r["stats"]: onehot for r in stats_rows})
    stats_rows = [{k.replace("_over_dense", "_over_onehot"): v for k, v in r.items()} for r in stats_rows]
    cols = [
        "stats",
        "chunk",
        "distances_MiB",
        "ms",
        "ms_range",
        "ms_over_dense",
        "argument_MiB",
        "output_MiB",
    ]
    cols += ["temp_MiB", "temp_over_dense", "donated_temp_MiB", "donated_temp_over_dense", "compile_s"]
    stats_cols = ["stats", "ms", "ms_range", "ms_over_onehot", "argument_MiB", "output_MiB", "temp_MiB"]
    stats_cols += ["temp_over_onehot", "counts_exact", "max_abs_err_vs_f64"]
    shape = f"K={K} codes x E={E}, N={N} features, float32, {args.reps} reps"
    tables = [
        (f"EMA update (nearest + ema_stats + ema_update), {shape}; MiB:", updates, cols),
        (f"ema_stats alone ({used} of {K} codes used), {shape}; MiB:", stats_rows, stats_cols),
    ]
    payload = {"args": vars(args), "updates": updates, "stats": stats_rows}
    common.report("vq_ema", monitor, tables, payload)


if __name__ == "__main__":
    main()
