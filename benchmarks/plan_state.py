"""Per-device train-state bytes of the full-scale configs against the 1/N ideal at 8, 64 and 256
chips (BENCHMARKS.md section 18): `mmjax plan`'s exact state bytes, from the shardings on N fake
CPU devices, without compiling (the mesh, and so the bytes, are those of a v5p or v5e slice).

  python benchmarks/plan_state.py                            # every full-scale config, 8 / 64 / 256
  python benchmarks/plan_state.py --configs configs/mm1.py:3b --chips 64
"""

from __future__ import annotations

import argparse
import json

CONFIGS = ("mm1.py:1b", "mm1.py:3b", "mm1.py:3b_moe", "iomm.py:b", "mmgem.py:l14", "unicode.py:7b")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=[f"configs/{c}" for c in CONFIGS])
    ap.add_argument("--chips", nargs="+", type=int, default=[8, 64, 256])
    args = ap.parse_args()
    import jax

    jax.config.update("jax_num_cpu_devices", max(args.chips))
    from mmjax import config as config_lib, plan
    from mmjax.train import stages

    G = 2**30
    for name in args.configs:
        for n in args.chips:
            for stage, part in stages.parts(config_lib.load(name)):
                part, _ = plan._train_only(part, n)
                t = plan.abstract_trainer(part, jax.devices()[:n])
                r = plan.state_bytes(t, t.abstract_batch_from_config())
                ratio = r["state_bytes"] / r["state_ideal_bytes"]
                row = dict(config=name, stage=stage, chips=n, mesh=r["mesh"], state_gib=r["state_bytes"] / G)
                print(
                    json.dumps({**row, "ideal_gib": r["state_ideal_bytes"] / G, "ratio": ratio}), flush=True
                )


if __name__ == "__main__":
    main()
