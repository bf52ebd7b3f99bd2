"""The train state's parameter groups, phases and objective registry (ldm_jax/train/state.py,
ldm_jax/train/objectives/__init__.py), checked against optax applied by hand: one chained
optimizer over the whole tree (the update before parameter groups), per-group learning rates,
a generator / discriminator pair of phases. Toy losses on small vectors: each test compiles in
seconds."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import REPO
from ldm_jax.config import load_config
from ldm_jax.data.pipeline import StepIndexedBatches
from ldm_jax.runs import Checkpointer, open_run
from ldm_jax.train import loop, objectives, trainer
from ldm_jax.train import state as state_lib
from ldm_jax.train.objectives import Task

SHAPES = str(REPO / "configs" / "shapes.py")
OPT = dict(
    learning_rate=0.1, warmup_steps=0, lr_schedule="constant", b1=0.9, b2=0.99, weight_decay=0.01
)
TARGET = np.array([1.0, -2.0, 3.0], np.float32)


def _params():
    return {"a": {"w": jnp.array([0.5, 0.5, 0.5])}, "b": {"w": jnp.array([2.0, 0.0, -1.0])}}


def _loss(params, frozen, batch, rng):
    """A quadratic coupling both groups, with a batch term so the data matters."""
    del rng
    a, b = params["a"]["w"], params["b"]["w"]
    x = jnp.mean(batch["x"])
    loss = jnp.sum((a + 2 * b - frozen["target"] * x) ** 2) + 0.1 * jnp.sum(a**2)
    return loss, {"a_norm": jnp.linalg.norm(a)}


def _batch():
    return {"x": np.linspace(0.5, 1.5, 8).astype(np.float32)}


def _groups(lr_b=0.1, ema_b=0.9):
    return {
        "a": state_lib.ParamGroup(state_lib.make_optimizer(OPT, 10), 0.9),
        "b": state_lib.ParamGroup(
            state_lib.make_optimizer(OPT | {"learning_rate": lr_b}, 10), ema_b
        ),
    }


def _old_update(params, ema, opt_state, optimizer, step, batch, decay=0.9):
    """The update as it was before parameter groups: one optax chain (clip, then AdamW) over the
    whole parameter tree, one EMA."""
    frozen = {"target": TARGET}
    grads = jax.grad(lambda p: _loss(p, frozen, batch, None)[0])(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    d = min(decay, (1.0 + step) / (10.0 + step))
    ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params)
    return params, ema, opt_state


def _assert_close(a, b, **kw):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


def test_groups_with_one_optimizer_equal_one_chained_optimizer_over_the_tree():
    """Two groups with the same AdamW, clipped together: the update of one `chain(clip, adamw)`
    over both (as the demo trained before groups), to float32 round-off, for 3 steps."""
    groups = _groups()
    update = jax.jit(state_lib.make_update_fn([state_lib.Phase(_loss, ("a", "b"), 0.5)], groups, 0))
    state = state_lib.init_state(_params(), groups, {"target": jnp.asarray(TARGET)})
    old_opt = optax.chain(optax.clip_by_global_norm(0.5), state_lib.make_optimizer(OPT, 10))
    params, ema = _params(), _params()
    opt_state = old_opt.init(params)
    for step in range(3):
        state, metrics = update(state, _batch())
        params, ema, opt_state = _old_update(params, ema, opt_state, old_opt, step, _batch())
    _assert_close(state.params, params, rtol=1e-6)
    _assert_close(state.ema_params, ema, rtol=1e-6)
    assert float(metrics["grad_norm"]) > 0.5  # the clip was active
    assert set(metrics) >= {"loss", "grad_norm", "a_norm", "skipped_updates"}


def test_each_group_has_its_own_learning_rate_and_ema():
    """Group b at learning rate 0 stays put (AdamW's decay is scaled by the rate too), group a
    moves as its own AdamW alone would move it; b keeps no EMA copy (decay 0)."""
    groups = _groups(lr_b=0.0, ema_b=0.0)
    update = jax.jit(state_lib.make_update_fn(_loss, groups, 0))
    state = state_lib.init_state(_params(), groups, {"target": jnp.asarray(TARGET)})
    assert set(state.ema_params) == {"a"} and set(state.opt_state) == {"a", "b"}
    state, _ = update(state, _batch())
    _assert_close(state.params["b"], _params()["b"], rtol=0)
    grads = jax.grad(lambda p: _loss(p, {"target": TARGET}, _batch(), None)[0])(_params())
    opt = state_lib.make_optimizer(OPT, 10)
    updates, _ = opt.update(grads["a"], opt.init(_params()["a"]), _params()["a"])
    _assert_close(state.params["a"], optax.apply_updates(_params()["a"], updates), rtol=1e-6)
    averaged = state.averaged()
    assert averaged["b"] is state.params["b"] and averaged["a"] is state.ema_params["a"]


def test_two_phases_alternate_generator_then_discriminator():
    """Phase 2 differentiates its own loss at phase 1's updated parameters, with its own stream
    of randomness; each phase steps only its groups; metrics of phase 2 carry its name."""
    sgd = {g: state_lib.ParamGroup(optax.sgd(0.1)) for g in ("g", "d")}

    def g_loss(params, frozen, batch, rng):
        return jnp.sum((params["g"] - params["d"]) ** 2), {"noise": jax.random.normal(rng)}

    def d_loss(params, frozen, batch, rng):
        return jnp.sum((params["d"] - 2 * params["g"]) ** 2), {"noise": jax.random.normal(rng)}

    phases = [state_lib.Phase(g_loss, ("g",)), state_lib.Phase(d_loss, ("d",), name="disc")]
    update = jax.jit(state_lib.make_update_fn(phases, sgd, seed=3))
    g0, d0 = jnp.array([1.0, 2.0]), jnp.array([0.0, 1.0])
    state, metrics = update(state_lib.init_state({"g": g0, "d": d0}, sgd), {"x": np.zeros(2)})
    g1 = g0 - 0.1 * 2 * (g0 - d0)
    d1 = d0 - 0.1 * 2 * (d0 - 2 * g1)  # at the new generator
    np.testing.assert_allclose(state.params["g"], g1, rtol=1e-6)
    np.testing.assert_allclose(state.params["d"], d1, rtol=1e-6)
    np.testing.assert_allclose(metrics["disc_loss"], jnp.sum((d0 - 2 * g1) ** 2), rtol=1e-6)
    assert float(metrics["noise"]) != float(metrics["disc_noise"])
    with pytest.raises(ValueError, match="phase 'x' trains"):
        state_lib.make_update_fn([state_lib.Phase(g_loss, ("nope",), name="x")], sgd, 0)


def test_param_groups_from_the_config():
    config = load_config(
        SHAPES + ":ldm,smoke",
        ["param_groups.text_encoder.learning_rate=0.5", "param_groups.text_encoder.ema_decay=0"],
    )
    groups = state_lib.groups_from_config(config, ("unet", "text_encoder"))
    assert groups["unet"].ema_decay == config.ema_decay and groups["text_encoder"].ema_decay == 0
    with pytest.raises(ValueError, match=r"names \['text_encoder'\], which this objective"):
        state_lib.groups_from_config(config, ("unet",))
    with pytest.raises(Exception, match="unknown config key 'param_groups.unet.lr'"):
        load_config(SHAPES + ":ldm,smoke", ["param_groups.unet.lr=1"])


def _toy_config(tmp_path, steps):
    config = load_config(SHAPES + ":autoencoder,smoke", ["checkpoint_every=1", "log_every=1"])
    with config.unlocked():
        config.num_train_steps = steps
        config.stage = "toy"
        config.param_groups = {}
    return config


def test_a_checkpoint_written_before_parameter_groups_resumes(tmp_path):
    """A checkpoint in the old layout (one params tree, `chain(clip, adamw)` state, no
    "state_layout" in its meta), written here by the old update rule itself, resumes: the
    next steps equal those of a run that used groups from the start."""
    config = _toy_config(tmp_path, 4)
    frozen = {"target": TARGET}
    batches = StepIndexedBatches({"x": _batch()["x"]}, 8, 0)
    groups = {g: state_lib.ParamGroup(state_lib.make_optimizer(OPT, 4), 0.9) for g in "ab"}

    def run(workdir):
        return loop.run(
            config,
            workdir,
            init_fn=lambda: (_params(), frozen),
            phases=_loss,
            groups=groups,
            batches=batches,
            signature={"toy": 1},
        )

    straight = run(tmp_path / "straight")
    # Two steps by the old rule, saved as the old code saved them.
    old_opt = optax.chain(
        optax.clip_by_global_norm(config.optimizer.grad_clip_norm), state_lib.make_optimizer(OPT, 4)
    )
    params, ema = _params(), _params()
    opt_state = old_opt.init(params)
    for step in range(2):
        batch = {"x": batches[step]["x"]}
        params, ema, opt_state = _old_update(params, ema, opt_state, old_opt, step, batch)
    old = state_lib.TrainState(
        step=jnp.int32(2), params=params, ema_params=ema, opt_state=opt_state,
        frozen=frozen, num_skipped=jnp.int32(0), nonfinite_streak=jnp.int32(0),
    )  # fmt: skip
    checkpointer = Checkpointer(tmp_path / "old")
    meta = {"signature": {"toy": 1}, "data": None}
    checkpointer.save(2, old, meta, force=True)
    checkpointer.close()
    resumed = run(tmp_path / "old")
    _assert_close(resumed.params, straight.params, rtol=1e-6)
    _assert_close(resumed.ema_params, straight.ema_params, rtol=1e-6)
    assert Checkpointer(tmp_path / "old", read_only=True).read_meta(4)["state_layout"] == 2


def test_an_objective_registered_by_name_trains_through_the_trainer(tmp_path):
    """The registry's contract: `register(name, build)`, a config whose stage is the name, and
    `train_and_evaluate` runs it (here a two-phase objective with a frozen group)."""

    def build(config, workdir):
        def d_loss(params, frozen, batch, rng):
            return jnp.sum((params["d"]["w"] - params["a"]["w"]) ** 2), {}

        return Task(
            groups=("a", "b", "d"),
            init_fn=lambda: ({**_params(), "d": {"w": jnp.zeros(3)}}, {"target": TARGET}),
            phases=[
                state_lib.Phase(_loss, ("a", "b"), 1.0),
                state_lib.Phase(d_loss, ("d",), 1.0, name="d"),
            ],
            batches=StepIndexedBatches({"x": _batch()["x"]}, 8, 0),
            signature={"toy": 2},
        )

    objectives.register("toy", build)
    try:
        state = trainer.train_and_evaluate(_toy_config(tmp_path, 3), tmp_path)
    finally:
        del objectives.OBJECTIVES["toy"]
    assert set(state.params) == {"a", "b", "d"} and int(state.step) == 3
    _, saved, step = open_run(tmp_path)
    assert step == 3 and set(saved["opt_state"]) == {"a", "b", "d"}
    np.testing.assert_array_equal(saved["frozen"]["target"], TARGET)  # frozen: not trained
    with pytest.raises(ValueError, match="unknown stage 'toy'; valid: autoencoder, ldm"):
        objectives.get("toy")
