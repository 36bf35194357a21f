"""Rematerialisation by name, from config: what a block keeps for its backward pass.

  '' / 'none'  keep everything (no remat)
  'full'       keep nothing: the backward recomputes the whole block (least memory)
  'dots'       keep the matmul outputs without a batch dimension (projections; attention scores
               and everything element-wise are recomputed): most of the speed at a fraction of the memory
  'offload'    'dots', kept in pinned host memory instead of on the device
               (`offload_dot_with_no_batch_dims`: device -> pinned_host), for memory-bound steps
Any other `jax.checkpoint_policies` name works too (e.g. 'nothing_saveable', 'checkpoint_dots').
"""

import flax.linen as nn
import jax

_NAMED = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'offload': jax.checkpoint_policies.offload_dot_with_no_batch_dims('device', 'pinned_host'),
}


ORDER = ('none', 'dots', 'full')  # least to most recomputation (`mmjax plan --memory-gb` tries them in turn)
_ALIASES = {'': 'none', False: 'none', None: 'none', True: 'full', 'nothing_saveable': 'full'}
_ALIASES['dots_with_no_batch_dims_saveable'] = 'dots'


def canonical(name) -> str:
    """The ORDER name of a remat setting where it has one ('nothing_saveable' is 'full'), else itself."""
    return _ALIASES.get(name, name)


def policy(name: str):
    """The `jax.checkpoint` policy of `name`; a ValueError lists the choices."""
    if name in _NAMED:
        return _NAMED[name]
    found = getattr(jax.checkpoint_policies, name, None)
    if not callable(found) or name.startswith('_'):
        choices = ", ".join(["'none'", *map(repr, _NAMED)])
        raise ValueError(f"remat={name!r}: use {choices} or a jax.checkpoint_policies name")
    if name.startswith(('offload_', 'save_', 'save_and_')):  # factories: they need arguments
        raise ValueError(f"remat={name!r} needs arguments; use 'offload' or name a ready policy")
    return found


def wrap(block_cls, name: str | bool, *, scan: bool):
    """`block_cls` rematerialised by `name` (True: 'full'), or unchanged for '' / 'none' / False."""
    if canonical(name) == 'none':
        return block_cls
    return nn.remat(block_cls, policy=policy(canonical(name)), prevent_cse=not scan)
