"""Meshes and sharding: the mesh and the logical->mesh rules are config data.

Modules annotate parameters and activations with logical names (`batch`, `embed`, `mlp`,
`heads`, ...); `config.sharding_rules` maps each to mesh axes; `config.mesh` sizes the axes.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax import config as config_lib


def maybe_initialize_distributed() -> None:
    """Starts multi-host JAX when the launcher says so (coordinator env vars or a TPU pod)."""
    if os.environ.get("MMJAX_COORDINATOR"):
        jax.distributed.initialize(
            coordinator_address=os.environ["MMJAX_COORDINATOR"],
            num_processes=int(os.environ["MMJAX_NUM_PROCESSES"]),
            process_id=int(os.environ["MMJAX_PROCESS_ID"]),
        )
    elif os.environ.get("MMJAX_DISTRIBUTED") == "auto":
        jax.distributed.initialize()  # TPU pods, SLURM, Open MPI: auto-detected


def make_mesh(config) -> jax.sharding.Mesh:
    shape = config_lib.validate(config, jax.device_count(), jax.process_count())
    return jax.make_mesh(
        tuple(shape.values()), tuple(shape.keys()), axis_types=(jax.sharding.AxisType.Auto,) * len(shape)
    )


def rules(config) -> tuple:
    return tuple((name, tuple(t) if isinstance(t, list) else t) for name, t in config.sharding_rules)


def logical_shardings(logical_specs, mesh, config):
    """Maps a tree of logical PartitionSpecs to NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules(config))


def batch_sharding(mesh, config) -> NamedSharding:
    return NamedSharding(mesh, P(config_lib.batch_axes(config) or None))


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles this process's slice of the batch into global arrays."""
    if jax.process_count() == 1:  # one transfer for the whole dict
        return jax.device_put(local, sharding)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
