"""Meshes and sharding: the mesh and the logical->mesh rules are config data.

Modules annotate parameters and activations with logical names (`batch`, `embed`, `mlp`,
`heads`, ...); `config.sharding_rules` maps each to mesh axes; `config.mesh` sizes the axes.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax import config as config_lib


def _by_slice(devices) -> bool:
    return devices[0].platform == "tpu" and hasattr(devices[0], "slice_index")


def granules(devices) -> int:
    """What `config.mesh_dcn` spans: TPU slices (multislice), else processes (GPU or CPU hosts)."""
    return len({d.slice_index if _by_slice(devices) else d.process_index for d in devices})


def make_mesh(config, devices=None) -> jax.sharding.Mesh:
    """The config's mesh over `devices` (default: every device; `mmjax plan` passes a TPU slice's
    compile-only ones); with `mesh_dcn`, a hybrid mesh whose DCN part spans slices or hosts and
    whose ICI part stays within one (`mesh_utils.create_hybrid_device_mesh`)."""
    devices = list(jax.devices() if devices is None else devices)
    n, hosts = granules(devices), len({d.process_index for d in devices})
    shape = config_lib.validate(config, len(devices), hosts, n)
    names, auto = tuple(shape), (jax.sharding.AxisType.Auto,) * len(shape)
    within, across = config_lib.mesh_shapes(config, len(devices), n)
    if math.prod(across.values()) > 1:
        grid = mesh_utils.create_hybrid_device_mesh(
            [within[k] for k in names],
            [across[k] for k in names],
            devices,
            process_is_granule=not _by_slice(devices),
        )
    else:
        try:
            return jax.make_mesh(tuple(shape.values()), names, axis_types=auto, devices=devices)
        except NotImplementedError:  # an axis no product of a TPU slice's axes (8 on 4x4x4): split one
            grid = mesh_utils.create_device_mesh(
                tuple(shape.values()), devices, allow_split_physical_axes=True
            )
    return jax.sharding.Mesh(grid, names, axis_types=auto)


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
