"""The one training loop. A recipe supplies model init, preprocessing, loss and evaluators.

Order of work: validate the config and build the mesh; abstract init (`jax.eval_shape`) to
get parameter shapes and logical specs; build the optimizer (checks freeze/group patterns);
jitted init with out_shardings (or restore the latest checkpoint onto this mesh); compile
the train step with explicit in/out shardings and a donated state; print its memory
analysis; loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax import config as config_lib
from mmjax import parallel, recipes
from mmjax.data import pipeline
from mmjax.train import checkpoint as ckpt_lib
from mmjax.train import metrics as metrics_lib
from mmjax.train import optim, pretrained, state as state_lib

log = logging.getLogger("mmjax")


class TooManyBadSteps(RuntimeError):
    pass


class Trainer:
    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, workdir
        self.mesh = parallel.make_mesh(config)  # validates the config first
        self.rules = parallel.rules(config)
        self.recipe = recipes.get(config)
        self.base_key = jax.random.key(config.seed)
        with self._context():
            boxed = jax.eval_shape(self.recipe.init, self.base_key)
        self.param_specs = nn.get_partition_spec(boxed)
        self.abstract_params = nn.unbox(boxed)
        self.num_params = sum(x.size for x in jax.tree.leaves(self.abstract_params))
        self.opt = optim.build(config.optim, parallel.flat(self.abstract_params), config.train.steps)
        self.abstract_state = jax.eval_shape(self._init_state, self.base_key)
        self.state_shardings = self._state_shardings(self.abstract_state)
        self.batch_sharding = parallel.batch_sharding(self.mesh, config)
        self.evaluators = self.recipe.evaluators()
        self._eval_steps = {}

    @contextlib.contextmanager
    def _context(self):
        """Mesh + logical rules, active while tracing anything that uses the model."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    # ---- state -------------------------------------------------------------------------
    def _init_state(self, rng, pretrained_params=None):
        params = nn.unbox(self.recipe.init(rng))
        if pretrained_params:
            flat = parallel.flat(params)
            loaded = {n: v.astype(flat[n].dtype) for n, v in pretrained_params.items()}
            params = parallel.unflat({**flat, **loaded})
        return state_lib.create(params, self.opt.tx, self.opt.trainable, self.config.train.ema_decay > 0)

    def _state_shardings(self, abstract_state):
        param_sh = parallel.logical_shardings(self.param_specs, self.mesh, self.config)
        by_name = parallel.flat(param_sh)
        shapes = {n: a.shape for n, a in parallel.flat(self.abstract_params).items()}
        replicated = NamedSharding(self.mesh, P())

        def for_opt_leaf(path, leaf):  # an optimizer leaf shaped like a parameter shards like it
            for key in path:
                name = getattr(key, "key", None)
                if name in by_name and shapes[name] == leaf.shape:
                    return by_name[name]
            return replicated

        return state_lib.TrainState(
            step=replicated,
            params=param_sh,
            opt_state=jax.tree_util.tree_map_with_path(for_opt_leaf, abstract_state.opt_state),
            ema={n: by_name[n] for n in abstract_state.ema},
            bad_streak=replicated,
            bad_total=replicated,
        )

    def init_state(self):
        """Fresh state, with the weights `config.init` names put in place."""
        loaded = {}
        for name, spec in self.config.init.items():
            if not spec.get("path"):  # declared in the config, not set: fresh initialisation
                continue
            loaded.update(pretrained.overlay(self.abstract_params, name, spec))
        shardings = parallel.flat(self.state_shardings.params)
        init = jax.jit(
            self._init_state,
            in_shardings=(None, {n: shardings[n] for n in loaded}),
            out_shardings=self.state_shardings,
        )
        with self._context():
            return init(self.base_key, loaded)

    def abstract_state_with_shardings(self):
        return ckpt_lib.abstract_with_shardings(self.abstract_state, self.state_shardings)

    # ---- step --------------------------------------------------------------------------
    def _loss_and_grads(self, trainable, frozen, batch, rng):
        def loss_fn(tr, mb, key):
            loss, metrics = self.recipe.loss(parallel.unflat({**frozen, **tr}), mb, key)
            return loss, metrics

        accum = self.config.train.grad_accum
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if accum == 1:
            (loss, metrics), grads = grad_fn(trainable, batch, rng)
            return loss, metrics, grads

        def micro(x):  # strided split keeps every micro-batch spread over all devices
            x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
            return jax.lax.with_sharding_constraint(
                x, NamedSharding(self.mesh, P(None, *self.batch_sharding.spec))
            )

        def body(carry, xs):
            mb, i = xs
            (loss, metrics), grads = grad_fn(trainable, mb, jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

        zero = jax.eval_shape(
            grad_fn, trainable, jax.tree.map(lambda x: x[0], jax.tree.map(micro, batch)), rng
        )
        zero = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), (zero[0][0], zero[0][1], zero[1]))
        total, _ = jax.lax.scan(body, zero, (jax.tree.map(micro, batch), jnp.arange(accum)))
        return jax.tree.map(lambda x: x / accum, total)

    def train_step(self, state: state_lib.TrainState, batch: dict):
        rng = jax.random.fold_in(self.base_key, state.step)
        flat = parallel.flat(state.params)
        trainable = {n: flat[n] for n in self.opt.trainable}
        frozen = {n: v for n, v in flat.items() if n not in trainable}
        loss, metrics, grads = self._loss_and_grads(trainable, frozen, batch, rng)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        decay = self.config.train.ema_decay

        def apply(_):
            updates, opt_state = self.opt.tx.update(grads, state.opt_state, trainable)
            new = optax.apply_updates(trainable, updates)
            ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema, new) if state.ema else {}
            return new, opt_state, ema

        new, opt_state, ema = jax.lax.cond(ok, apply, lambda _: (trainable, state.opt_state, state.ema), None)
        bad = (~ok).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1,
            params=parallel.unflat({**flat, **new}),
            opt_state=opt_state,
            ema=ema,
            bad_streak=(state.bad_streak + bad) * bad,
            bad_total=state.bad_total + bad,
        )
        metrics = {
            **metrics,
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": self.opt.schedule(state.step),
            "skipped": bad,
        }
        return new_state, metrics

    def compile_step(self, abstract_batch):
        """The jitted train step, lowered and compiled for this mesh; state is donated."""
        step = jax.jit(
            self.train_step,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, None),
            donate_argnums=(0,),
        )
        with self._context():
            return step.lower(self.abstract_state_with_shardings(), abstract_batch).compile()

    def abstract_batch_from_config(self):
        """The global batch's abstract arrays, from one preprocessed row (no batch is drawn)."""
        row = pipeline.example_row(self.config, self.recipe.preprocess, self.recipe.packing())
        local = self.config.data.global_batch_size // jax.process_count()
        return self.abstract_batch({k: jax.ShapeDtypeStruct((local, *np.shape(v)), np.asarray(v).dtype) for k, v in row.items()})

    def abstract_batch(self, local_batch: dict):
        """The global batch's abstract arrays from this process's batch (arrays or shape structs)."""
        n = jax.process_count()
        return {
            k: jax.ShapeDtypeStruct((v.shape[0] * n, *v.shape[1:]), v.dtype, sharding=self.batch_sharding)
            for k, v in local_batch.items()
        }

    # ---- eval --------------------------------------------------------------------------
    def evaluate(self, params) -> dict[str, float]:
        results = {}
        for name, ev in self.evaluators.items():
            ds = pipeline.eval_dataset(ev.data, self.config.data.image_size, ev.preprocess)
            with self._context():
                step = self._eval_steps.setdefault(
                    name, jax.jit(ev.step, in_shardings=(self.state_shardings.params, self.batch_sharding))
                )
                outs = []
                for local in ds:
                    out = step(params, parallel.global_batch(local, self.batch_sharding))
                    outs.append(jax.tree.map(np.asarray, multihost_utils.process_allgather(out, tiled=True)))
            merged = {k: np.concatenate([np.atleast_1d(o[k]) for o in outs]) for k in outs[0]}
            results.update({f"{name}/{k}": float(v) for k, v in ev.finalize(merged).items()})
        return results

    # ---- the loop ----------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, tc = self.config, self.config.train
        lead = jax.process_index() == 0
        ds = pipeline.train_dataset(cfg, self.recipe.preprocess, self.recipe.packing())
        data_iter = iter(pipeline.to_iter(ds, cfg.data.num_workers, cfg.data.prefetch))
        ckpt = Checkpointer(self.workdir, tc)
        start = 0
        if ckpt.latest_step() is not None:
            state, start = ckpt.restore(self.abstract_state_with_shardings(), data_iter)
            log.info("resumed from %s at step %d", ckpt.manager.directory, start)
        else:
            state = self.init_state()
        writer = metrics_lib.MetricWriter(self.workdir, start, enabled=lead)
        compiled = self.compile_step(self.abstract_batch(pipeline.first_batch(ds)))
        log_memory(compiled, self.num_params)
        preempted = _SigtermFlag()
        progress = metrics_lib.Progress(start, tc.steps, cfg.data.global_batch_size, enabled=lead)
        config_json = config_lib.to_json(cfg)
        last = {}
        steps, log_every, save_every, eval_every = tc.steps, tc.log_every, tc.save_every, tc.eval_every
        kill_at, multi = cfg.debug.kill_at_step, jax.process_count() > 1  # no ConfigDict lookups per step
        try:
            for step in range(start + 1, steps + 1):
                batch = parallel.global_batch(next(data_iter), self.batch_sharding)
                state, metrics = compiled(state, batch)
                if step % log_every == 0 or step == steps:
                    last = writer.write(step, metrics)
                    progress.update(step, last["loss"])
                    self._check_bad_steps(state)
                else:
                    progress.update(step)
                if eval_every and step % eval_every == 0 and step < steps:
                    writer.write(step, self.evaluate(state.eval_params()))
                if kill_at == step:  # fault injection for the resume tests
                    ckpt.wait()
                    os.kill(os.getpid(), getattr(signal, cfg.debug.kill_signal))
                # Several processes must agree on a preemption step: JAX's preemption service does that.
                stop = ckpt.reached_preemption(step) if multi else preempted.is_set()
                if step % save_every == 0 or step == steps or stop:
                    self._check_bad_steps(state)
                    ckpt.save(step, state, data_iter, config_json, force=stop)
                if stop:
                    log.warning("preempted: saved step %d, exiting", step)
                    raise Preempted(step)
            if self.evaluators:
                last.update(writer.write(steps, self.evaluate(state.eval_params())))
        finally:
            progress.close()
            ckpt.close()
            writer.close()
            preempted.restore()
        return last

    def _check_bad_steps(self, state):
        streak = int(state.bad_streak)
        if streak > self.config.train.max_bad_steps:
            raise TooManyBadSteps(
                f"{streak} consecutive non-finite steps (train.max_bad_steps="
                f"{self.config.train.max_bad_steps}); stopped with the last good checkpoint intact. "
                "Lower the learning rate, enable gradient clipping, or check the data."
            )


class Preempted(SystemExit):
    def __init__(self, step):
        super().__init__(143)
        self.step = step


def Checkpointer(workdir, tc):
    return ckpt_lib.Checkpointer(workdir, tc.keep, tc.keep_period)


class _SigtermFlag:
    """Turns SIGTERM into a flag the loop checks after each step (main thread only)."""

    def __init__(self):
        self._event = threading.Event()
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, lambda *_: self._event.set())

    def is_set(self):
        return self._event.is_set()

    def restore(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def log_memory(compiled, num_params: int) -> dict:
    stats = compiled.memory_analysis()
    info = {"params": num_params}
    if stats is not None:
        info.update(
            argument_bytes=stats.argument_size_in_bytes,
            output_bytes=stats.output_size_in_bytes,
            temp_bytes=stats.temp_size_in_bytes,
            alias_bytes=stats.alias_size_in_bytes,
        )
    if jax.process_index() == 0:
        print("compiled train step, per device: " + json.dumps(info), flush=True)
    return info


def train(config, workdir: str) -> dict:
    os.makedirs(workdir, exist_ok=True)
    return Trainer(config, workdir).fit()
