"""The one training loop. A recipe supplies model init, preprocessing, loss, hooks and evaluators
(mmjax/recipes/base.py); the trainer owns everything else.

Order of work: validate the config and build the mesh; abstract init (`jax.eval_shape`) to get
the variables' shapes and logical specs; build the optimizer (checks freeze/group patterns);
read the frozen models and the `config.init` weights straight onto their shardings; jitted init
with out_shardings (or restore the latest checkpoint onto this mesh); compile the train step with
explicit in/out shardings and a donated state; print its memory analysis; loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax import config as config_lib
from mmjax import parallel, recipes, tree, weights
from mmjax.config import ConfigError
from mmjax.data import pipeline
from mmjax.eval import artefacts
from mmjax.objectives import reduce
from mmjax.paths import resolve
from mmjax.recipes.base import Context
from mmjax.train import checkpoint as ckpt_lib
from mmjax.train import metrics as metrics_lib
from mmjax.train import optim, state as state_lib

log = logging.getLogger("mmjax")


class TooManyBadSteps(RuntimeError):
    pass


class Preempted(SystemExit):
    def __init__(self, step):
        super().__init__(143)
        self.step = step


class Trainer:
    def __init__(self, config, workdir: str, mesh: jax.sharding.Mesh | None = None):
        """`mesh`: one built (and the config validated) by the caller, e.g. over a TPU topology's
        compile-only devices (mmjax/plan.py); default: the config's mesh over jax.devices()."""
        self.config, self.workdir = config, str(workdir)
        self.mesh = mesh if mesh is not None else parallel.make_mesh(config)  # validates the config first
        self.rules = parallel.rules(config)
        self.recipe = recipes.get(config)
        self.base_key = jax.random.key(config.seed)
        with self._context():
            boxed = jax.eval_shape(self.recipe.init, self.base_key)
        if "params" not in boxed:
            raise TypeError(
                f"recipe {config.recipe!r}: init must return the variables {{'params': ..., ...}}"
            )
        specs, abstract = nn.get_partition_spec(boxed), nn.unbox(boxed)
        self.logical = tree.flat(specs["params"])
        every = tree.flat(abstract["params"])
        frozen = self._frozen_dtypes(every)
        self.frozen_names = set(frozen)
        self.abstract_params = tree.unflat({n: a for n, a in every.items() if n not in frozen})
        self.abstract_frozen = {n: jax.ShapeDtypeStruct(every[n].shape, d) for n, d in frozen.items()}
        self.num_params = sum(x.size for x in jax.tree.leaves(self.abstract_params))  # frozen models excluded
        self.opt = optim.build(
            config.optim, tree.flat(self.abstract_params), config.train.steps, self.recipe.fixed_params()
        )
        self.abstract_state = jax.eval_shape(self._init_state, self.base_key)
        self.state_shardings = self._state_shardings(self.abstract_state, specs)
        self.frozen_shardings = {n: self._sharding(n) for n in self.frozen_names}
        self.batch_sharding = parallel.batch_sharding(self.mesh, config)
        self.evaluators = self.recipe.evaluators()
        self._eval_steps = {}

    @contextlib.contextmanager
    def _context(self):
        """Mesh + logical rules, active while tracing anything that uses the model."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def _sharding(self, name: str) -> NamedSharding:
        return parallel.logical_shardings(self.logical[name], self.mesh, self.config)

    # ---- frozen models (config.frozen) ---------------------------------------------------------
    def _frozen_dtypes(self, every: dict) -> dict:
        """{parameter name: dtype} of the frozen models' parameters."""
        out = {}
        for entry, spec in self.config.frozen.items():
            hit = tree.under(every, spec.into)
            if not spec.into.strip("/") or not hit:
                raise ConfigError(
                    f"frozen.{entry}.into={spec.into!r} must name a parameter subtree of the model"
                )
            out.update(dict.fromkeys(hit, jnp.dtype(spec.dtype)))
        return out

    def load_frozen(self) -> tuple[dict, dict]:
        """(the frozen models' arrays {name: array} on their shardings, {entry: {path, fingerprint}})."""
        arrays, info = {}, {}
        for entry, spec in self.config.frozen.items():
            if not spec.path:
                raise ConfigError(
                    f"frozen.{entry}.path is empty; point it at the weights folder of the model to hold fixed"
                )
            names = tree.under(self.abstract_frozen, spec.into)
            targets = {n: self.abstract_frozen[n] for n in names}
            loaded = self._load(f"frozen.{entry}", spec, targets, jax.random.fold_in(self.base_key, 1))
            arrays.update(loaded)
            info[entry] = {"path": str(spec.path), "fingerprint": weights.fingerprint(loaded)}
        return arrays, info

    def _load(self, entry: str, spec, targets: dict, rng) -> dict:
        """The weights folder of `spec` read onto the shardings of `targets` and put in place."""
        sources = weights.plan(entry, spec, targets, self.logical)
        shardings = {n: self._sharding(n) for n in sources}
        raw = weights.read(spec.path, sources, shardings, {n: targets[n].dtype for n in sources})
        put = jax.jit(lambda r: weights.assemble(r, sources, targets, rng), out_shardings=shardings)
        return put(raw)

    def _check_frozen(self, saved: dict, now: dict) -> None:
        for entry, got in now.items():
            was = saved.get(entry)
            if was and was["fingerprint"] != got["fingerprint"]:
                raise ConfigError(
                    f"frozen.{entry}: the run was started with {was['path']} (fingerprint {was['fingerprint']}) but "
                    f"{got['path']} holds other weights ({got['fingerprint']}); resume with the same folder or use a "
                    f"new workdir"
                )

    # ---- state -------------------------------------------------------------------------------
    def _init_state(self, rng, loads=()):
        """A fresh state; `loads`: (arrays `weights.read` returned, their sources) per init entry."""
        variables = nn.unbox(self.recipe.init(rng))
        flat = {n: v for n, v in tree.flat(variables["params"]).items() if n not in self.frozen_names}
        for i, (raw, sources) in enumerate(loads):
            flat.update(weights.assemble(raw, sources, flat, jax.random.fold_in(rng, 1000 + i)))
        model_state = {k: v for k, v in variables.items() if k != "params"}
        return state_lib.create(
            tree.unflat(flat), model_state, self.opt.tx, self.opt.trainable, self.config.train.ema_decay > 0
        )

    def _state_shardings(self, abstract_state, specs):
        param_sh = parallel.logical_shardings(
            tree.unflat({n: self.logical[n] for n in tree.flat(self.abstract_params)}), self.mesh, self.config
        )
        by_name = tree.flat(param_sh)
        shapes = {n: a.shape for n, a in tree.flat(self.abstract_params).items()}
        replicated = NamedSharding(self.mesh, P())

        def for_opt_leaf(path, leaf):  # an optimizer leaf shaped like a parameter shards like it
            for key in path:
                name = getattr(key, "key", None)
                if name in by_name and shapes[name] == leaf.shape:
                    return by_name[name]
            return replicated

        model_state = {
            k: parallel.logical_shardings(specs[k], self.mesh, self.config)
            for k in abstract_state.model_state
        }
        return state_lib.TrainState(
            step=replicated,
            params=param_sh,
            model_state=model_state,
            opt_state=jax.tree_util.tree_map_with_path(for_opt_leaf, abstract_state.opt_state),
            ema={n: by_name[n] for n in abstract_state.ema},
            bad_streak=replicated,
            bad_total=replicated,
        )

    def init_state(self):
        """Fresh state, with the weights `config.init` names read onto their shardings."""
        flat, loads = tree.flat(self.abstract_params), []
        for name, spec in self.config.init.items():
            if not spec.get("path"):  # declared in the config, not set: fresh initialisation
                continue
            sources = weights.plan(f"init.{name}", spec, flat, self.logical)
            twice = sorted(set(sources) & {n for _, done in loads for n in done})
            if twice:
                raise ConfigError(f"init.{name} loads {twice[:3]}, which an earlier init entry loads too")
            shardings, dtypes = {n: self._sharding(n) for n in sources}, {n: flat[n].dtype for n in sources}
            loads.append((weights.read(spec.path, sources, shardings, dtypes), sources))
        static = [s for _, s in loads]
        init = jax.jit(
            lambda rng, raws: self._init_state(rng, list(zip(raws, static))),
            out_shardings=self.state_shardings,
        )
        with self._context():
            return init(self.base_key, [r for r, _ in loads])

    def abstract_state_with_shardings(self):
        return ckpt_lib.abstract_with_shardings(self.abstract_state, self.state_shardings)

    def abstract_frozen_with_shardings(self):
        return ckpt_lib.abstract_with_shardings(self.abstract_frozen, self.frozen_shardings)

    # ---- step --------------------------------------------------------------------------------
    def _loss_and_grads(self, trainable, fixed, batch, ctx):
        """(loss, metrics, stats, grads) of the batch, exactly the full batch's under accumulation:
        Mean losses and metrics add numerators and weights over micro-batches and divide once."""

        def loss_fn(tr, mb, c):
            out = self.recipe.loss(tree.unflat({**fixed, **tr}), mb, c)
            loss, metrics, stats = (*out, {})[:3]
            loss = reduce.additive(loss)
            return loss.total, (loss, reduce.additive(metrics), stats)

        accum = self.config.train.grad_accum
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if accum == 1:
            (_, (loss, metrics, stats)), grads = grad_fn(trainable, batch, ctx)
        else:

            def micro(x):  # strided split keeps every micro-batch spread over all devices
                x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
                return jax.lax.with_sharding_constraint(
                    x, NamedSharding(self.mesh, P(None, *self.batch_sharding.spec))
                )

            def body(carry, xs):
                mb, i = xs
                (_, aux), grads = grad_fn(trainable, mb, ctx.replace(rng=jax.random.fold_in(ctx.rng, i)))
                return jax.tree.map(jnp.add, carry, (aux, grads)), None

            micros = jax.tree.map(micro, batch)
            zero = jax.eval_shape(grad_fn, trainable, jax.tree.map(lambda x: x[0], micros), ctx)
            zero = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), (zero[0][1], zero[1]))
            ((loss, metrics, stats), grads), _ = jax.lax.scan(body, zero, (micros, jnp.arange(accum)))
        weight = jnp.maximum(loss.weight, 1e-12)
        grads = jax.tree.map(lambda g: g / weight.astype(g.dtype), grads)
        return loss.value(), reduce.finish(metrics), stats, grads

    def train_step(self, state: state_lib.TrainState, frozen: dict, batch: dict):
        ctx = Context(
            rng=jax.random.fold_in(self.base_key, state.step), step=state.step, state=state.model_state
        )
        flat = tree.flat(state.params)
        trainable = {n: flat[n] for n in self.opt.trainable}
        fixed = {**{n: v for n, v in flat.items() if n not in trainable}, **frozen}
        loss, metrics, stats, grads = self._loss_and_grads(trainable, fixed, batch, ctx)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        for s in jax.tree.leaves(stats):
            ok &= jnp.isfinite(s).all()
        decay = self.config.train.ema_decay

        def apply(_):
            updates, opt_state = self.opt.tx.update(grads, state.opt_state, trainable)
            model_state = (
                self.recipe.update_state(state.model_state, stats, ctx) if stats else state.model_state
            )
            params = self.recipe.constrain(
                tree.unflat({**flat, **optax.apply_updates(trainable, updates)}),
                ctx.replace(state=model_state),
            )
            new = tree.flat(params)
            ema = {n: decay * e + (1 - decay) * new[n] for n, e in state.ema.items()}
            return params, model_state, opt_state, ema

        keep = (state.params, state.model_state, state.opt_state, state.ema)
        params, model_state, opt_state, ema = jax.lax.cond(ok, apply, lambda _: keep, None)
        bad = (~ok).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            model_state=model_state,
            opt_state=opt_state,
            ema=ema,
            bad_streak=(state.bad_streak + bad) * bad,
            bad_total=state.bad_total + bad,
        )
        metrics = {
            **metrics,
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": self.opt.schedule(state.step - state.bad_total),  # optax counts applied updates only
            "skipped": bad,
            "bad_streak": new_state.bad_streak,
        }
        return new_state, metrics

    def compile_step(self, abstract_batch):
        """The jitted train step, lowered and compiled for this mesh; state is donated."""
        step = jax.jit(
            self.train_step,
            in_shardings=(self.state_shardings, self.frozen_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, None),
            donate_argnums=(0,),
        )
        with self._context():
            return step.lower(
                self.abstract_state_with_shardings(), self.abstract_frozen_with_shardings(), abstract_batch
            ).compile()

    def abstract_batch_from_config(self):
        """The global batch's abstract arrays, from one preprocessed row (no batch is drawn)."""
        row = pipeline.example_row(self.config, self.recipe.preprocess, self.recipe.packing())
        local = self.config.data.global_batch_size // jax.process_count()
        return self.abstract_batch(
            {k: jax.ShapeDtypeStruct((local, *np.shape(v)), np.asarray(v).dtype) for k, v in row.items()}
        )

    def abstract_batch(self, local_batch: dict):
        """The global batch's abstract arrays from this process's batch (arrays or shape structs)."""
        n = jax.process_count()
        return {
            k: jax.ShapeDtypeStruct((v.shape[0] * n, *v.shape[1:]), v.dtype, sharding=self.batch_sharding)
            for k, v in local_batch.items()
        }

    # ---- eval and sampling -------------------------------------------------------------------
    def full_params(self, state, frozen: dict):
        """Evaluation parameters (the EMA where there is one) with the frozen models in place."""
        return tree.unflat({**tree.flat(state.eval_params()), **frozen})

    def context(self, state, name: str = "") -> Context:
        """A fixed-seed context for evaluation or sampling (the same noise at every step evaluated)."""
        key = jax.random.fold_in(jax.random.key(self.config.seed + 1), zlib.crc32(name.encode()) & 0x7FFFFFFF)
        return Context(rng=key, step=state.step, state=state.model_state)

    def evaluate(self, state, frozen: dict) -> dict:
        """{evaluator/metric: float or artefact} over every evaluator."""
        results, params = {}, self.full_params(state, frozen)
        for name, ev in self.evaluators.items():
            ds = pipeline.eval_dataset(ev.data, self.config.data.image_size, ev.preprocess)
            ctx = self.context(state, name)
            with self._context():
                step = self._eval_steps.setdefault(name, jax.jit(ev.step))
                outs = []
                for b, local in enumerate(_while_all_have(ds)):
                    out = step(
                        params,
                        parallel.global_batch(local, self.batch_sharding),
                        ctx.replace(rng=jax.random.fold_in(ctx.rng, b)),
                    )
                    outs.append(jax.tree.map(np.asarray, multihost_utils.process_allgather(out, tiled=True)))
            merged = {k: np.concatenate([np.atleast_1d(o[k]) for o in outs]) for k in outs[0]}
            results.update(
                {
                    f"{name}/{k}": v if isinstance(v, artefacts.ARTEFACTS) else float(v)
                    for k, v in ev.finalize(merged).items()
                }
            )
        return results

    def latest(self):
        """(state, frozen arrays, frozen info, step) of the latest checkpoint in the workdir."""
        ckpt = ckpt_lib.Checkpointer(self.workdir, keep=self.config.train.keep)
        try:
            if ckpt.latest_step() is None:
                raise ConfigError(
                    f"no checkpoint in {self.workdir}/checkpoints; train first (mmjax train ...)"
                )
            frozen, info = self.load_frozen()
            self._check_frozen(ckpt.run_info().get("frozen", {}), info)
            state, step = ckpt.restore(self.abstract_state_with_shardings())
        finally:
            ckpt.close()
        return state, frozen, info, step

    def export(self, dst, part: str = "") -> dict:
        """Writes the latest checkpoint's (EMA) parameters of the recipe's export `part` ('' = the
        whole model; frozen models are never included, their folders are recorded) to `dst`."""
        parts = self.recipe.exports()
        if part not in parts:
            raise ConfigError(
                f"export part {part!r}: recipe {self.config.recipe!r} exports "
                + ", ".join(repr(p) for p in parts)
            )
        state, _, info, step = self.latest()
        ex, flat = parts[part], tree.flat(state.eval_params())
        prefix = ex.into.strip("/")
        params = {n[len(prefix) + 1 :] if prefix else n: flat[n] for n in tree.under(flat, prefix)}
        meta = {**ex.meta, "step": step, "source": self.workdir, "frozen": info}
        weights.save(dst, tree.unflat(params), meta, ex.tokenizer)
        return {"wrote": str(dst), "step": step, "part": part}

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, tc = self.config, self.config.train
        lead = jax.process_index() == 0
        data_iter = pipeline.train_dataset(
            cfg, self.recipe.preprocess, self.recipe.packing(), cfg.data.num_workers
        )
        frozen, run = self.load_frozen()
        ckpt = ckpt_lib.Checkpointer(self.workdir, tc.keep, tc.keep_period)
        start = 0
        if ckpt.latest_step() is not None:
            self._check_frozen(ckpt.run_info().get("frozen", {}), run)
            state, start = ckpt.restore(self.abstract_state_with_shardings(), data_iter)
            log.info("resumed from %s at step %d", ckpt.manager.directory, start)
        else:
            state = self.init_state()
        config_json = config_lib.to_json(cfg)
        writer = metrics_lib.MetricWriter(
            self.workdir, start, enabled=lead, wandb=cfg.wandb, run_config=config_json
        )
        compiled = self.compile_step(self.abstract_batch(pipeline.first_batch(data_iter)))
        log_memory(compiled, self.num_params)
        multi = jax.process_count() > 1
        # Several processes agree on a preemption step through JAX's preemption service, whose
        # SIGTERM handler must stay in place; one process turns SIGTERM into a flag itself.
        sigterm = None if multi else _SigtermFlag()
        progress = metrics_lib.Progress(start, tc.steps, cfg.data.global_batch_size, enabled=lead)
        profile = _Profile(cfg.profile, self.workdir, enabled=lead)
        last, prev = {}, None
        steps, log_every, save_every, eval_every = tc.steps, tc.log_every, tc.save_every, tc.eval_every
        kill_at, nan_from = cfg.debug.kill_at_step, cfg.debug.nan_from_step  # no ConfigDict lookups per step
        if cfg.debug.kill_process not in (-1, jax.process_index()):
            kill_at = -1
        try:
            for step in range(start + 1, steps + 1):
                local = next(data_iter)
                if 0 < nan_from <= step:  # fault injection for the NaN-guard tests
                    local = {
                        k: v * np.nan if np.issubdtype(v.dtype, np.floating) else v for k, v in local.items()
                    }
                profile.before(step)
                state, metrics = compiled(state, frozen, parallel.global_batch(local, self.batch_sharding))
                profile.after(step, metrics)
                if prev is not None:  # the previous step is done by now: reading it does not stall this one
                    self._check_streak(prev, step - 1)
                prev = metrics
                if (log_every and step % log_every == 0) or step == steps:
                    last = writer.write(step, {**metrics, **data_iter.metrics()})
                    progress.update(step, last["loss"])
                else:
                    progress.update(step)
                if eval_every and step % eval_every == 0 and step < steps:
                    writer.write_eval(step, self.evaluate(state, frozen))
                if kill_at == step:  # fault injection for the resume tests
                    ckpt.wait()
                    log.warning("debug.kill_at_step: %s at step %d", cfg.debug.kill_signal, step)
                    signal.raise_signal(getattr(signal, cfg.debug.kill_signal))
                stop = ckpt.reached_preemption(step) if multi else sigterm.is_set()
                if (save_every and step % save_every == 0) or step == steps or stop:
                    self._check_streak(metrics, step)  # never save the end of a bad streak
                    ckpt.save(step, state, data_iter, config_json, {"frozen": run}, force=stop)
                if stop:
                    log.warning("preempted: saved step %d, exiting", step)
                    raise Preempted(step)
            if prev is not None:
                self._check_streak(prev, steps)
            if self.evaluators:
                last.update(writer.write_eval(steps, self.evaluate(state, frozen)))
        finally:
            profile.close()
            progress.close()
            ckpt.close()
            writer.close()
            if sigterm is not None:
                sigterm.restore()
        if lead and writer.path.exists():
            metrics_lib.plot(self.workdir)
        return last

    def _check_streak(self, metrics, step: int):
        streak = int(metrics["bad_streak"])
        if streak > self.config.train.max_bad_steps:
            raise TooManyBadSteps(
                f"steps {step - streak + 1}..{step} were non-finite ({streak} in a row > train.max_bad_steps="
                f"{self.config.train.max_bad_steps}); stopped with the last good checkpoint intact. "
                "Lower the learning rate, enable gradient clipping, or check the data."
            )


def _while_all_have(batches):
    """Batches for as long as every process has one: processes whose evaluation data lost
    different numbers of records to skips stop together instead of waiting on each other."""
    for local in batches:
        if jax.process_count() > 1 and not multihost_utils.process_allgather(np.int32(1)).all():
            return
        yield local
    if jax.process_count() > 1:
        multihost_utils.process_allgather(np.int32(0))  # the others learn this one is done


class _Profile:
    """`config.profile`: a `jax.profiler` trace of `steps` steps from `start_step` on, written
    by process 0 to WORKDIR/profile (open it with XProf or TensorBoard's Profile tab)."""

    def __init__(self, pc, workdir: str, enabled: bool):
        self.first, self.last = pc.start_step, pc.start_step + pc.steps - 1
        self.on, self.active, self.dir = enabled and pc.steps > 0, False, f"{workdir}/profile"

    def before(self, step: int):
        if self.on and step == self.first:
            jax.profiler.start_trace(self.dir)
            self.active = True

    def after(self, step: int, out):
        if self.active and step == self.last:
            jax.block_until_ready(out)  # the traced steps' device work ends inside the trace
            self.close()
            log.info("profile of steps %d..%d written to %s", self.first, self.last, self.dir)

    def close(self):
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


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


def memory_stats(compiled) -> dict:
    """The compiled step's per-device bytes (arguments, outputs, temporaries, donated), if known."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    return dict(
        argument_bytes=stats.argument_size_in_bytes,
        output_bytes=stats.output_size_in_bytes,
        temp_bytes=stats.temp_size_in_bytes,
        alias_bytes=stats.alias_size_in_bytes,
    )


def log_memory(compiled, num_params: int) -> dict:
    info = {"params": num_params, **memory_stats(compiled)}
    if jax.process_index() == 0:
        print("compiled train step, per device: " + json.dumps(info), flush=True)
    return info


def train(config, workdir: str) -> dict:
    p = resolve(workdir)
    if jax.process_index() == 0:
        p.mkdir(parents=True, exist_ok=True)
    return Trainer(config, workdir).fit()
