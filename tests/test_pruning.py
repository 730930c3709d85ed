"""Pruning engine: exact counts, structured masks, HYDRA, and the no-revival optax wrapper."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tscnc_jax as tj
from tscnc_jax import pruning
from tscnc_jax.pruning.schedules import IterativeSchedule, OneShotSchedule, PolynomialSchedule
from tscnc_jax.tree_utils import apply_masks

SPARSITIES = [0.5, 0.9, 0.95, 0.99, 0.995]
SHAPES = [(3, 3, 3, 64), (3, 3, 16, 32), (512, 10), (300, 100), (7, 5), (1, 1, 1, 8)]


def _kernels(seed=0, shapes=SHAPES, ties=False):
    """Random kernels; with ``ties`` the magnitudes take only 5 values (massive ties)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i, shape in enumerate(shapes):
        w = rng.standard_normal(shape).astype(np.float32)
        if ties:
            w = np.round(w * 2) / 2
        out[f"layer{i}"] = {"kernel": jnp.asarray(w), "bias": jnp.zeros(shape[-1])}
    return out


def _ref_keep(scores, k):
    """NumPy reference: the k largest (flattened), ties kept in order of index."""
    order = np.argsort(-np.asarray(scores, np.float64).ravel(), kind="stable")
    keep = np.zeros(scores.size, bool)
    keep[order[:k]] = True
    return keep.reshape(scores.shape)


def _n_pruned(n, s):
    return min(int(np.ceil(s * n - 1e-9 * n)), n - 1)


# ----------------------------------------------------------------------------------------------
# Exact counts.
# ----------------------------------------------------------------------------------------------


def test_num_to_prune_rule():
    assert pruning.num_to_prune(1000, 0.99) == 990
    assert pruning.num_to_prune(10, 0.95) == 9  # 9.5 -> 10, clamped: one weight always kept
    assert pruning.num_to_prune(288, 0.99) == 286  # 285.12: never below the target
    assert pruning.num_to_prune(100, 0.29) == 29  # 28.999... in float64
    assert pruning.num_to_prune(3, 0.5) == 2  # 1.5 -> 2
    assert pruning.num_to_prune(5, 0.0) == 0
    assert pruning.num_to_prune(0, 0.9) == 0
    traced = jax.jit(lambda s: pruning.num_to_prune(1000, s))(0.99)
    assert int(traced) == 990


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_layerwise_magnitude_exact(ties):
    params = _kernels(ties=ties)
    make = jax.jit(pruning.layerwise_magnitude_masks)  # static sparsity: see the next test
    for sparsity in SPARSITIES:
        masks = make(params, sparsity)
        for name, layer in params.items():
            assert masks[name]["bias"] is None
            w, m = np.asarray(layer["kernel"]), np.asarray(masks[name]["kernel"])
            assert m.dtype == np.bool_ and m.shape == w.shape
            n_pruned = _n_pruned(w.size, sparsity)
            assert (~m).sum() == n_pruned, (name, sparsity)
            # The kept set is the reference top-k (magnitude order, ties to the lower index).
            np.testing.assert_array_equal(m, _ref_keep(np.abs(w), w.size - n_pruned))
        summary = pruning.summarize_sparsity(apply_masks(params, masks))
        for i, shape in enumerate(SHAPES):
            n = int(np.prod(shape))
            assert summary.layers[f"layer{i}/kernel"].num_pruned == _n_pruned(n, sparsity)


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_static_sparsity_gives_the_same_masks(ties):
    """The static (Python float, float64 count) path equals the traced one for these sizes."""
    params = _kernels(1, ties=ties)
    f = jax.jit(pruning.layerwise_magnitude_masks)
    for s in SPARSITIES:
        chex.assert_trees_all_equal(f(params, s), pruning.layerwise_magnitude_masks(params, s))


def test_all_equal_and_zero_kernels_break_ties_by_index():
    params = {"a": jnp.ones((4, 5)), "b": jnp.zeros((10, 3))}
    masks = pruning.layerwise_magnitude_masks(params, 0.5, filter_fn=lambda p, x: True)
    np.testing.assert_array_equal(np.asarray(masks["a"]).ravel(), np.arange(20) < 10)
    np.testing.assert_array_equal(np.asarray(masks["b"]).ravel(), np.arange(30) < 15)


def test_float64_ranking(x64):
    w = jnp.array([[1.0, 1.0 + 1e-12], [1.0 + 2e-12, 0.5]], jnp.float64)  # equal in float32
    masks = pruning.layerwise_magnitude_masks({"w": w}, 0.5)
    np.testing.assert_array_equal(masks["w"], [[False, True], [True, False]])


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_global_magnitude_exact(ties):
    params = _kernels(2, ties=ties)
    make = jax.jit(pruning.global_magnitude_masks)
    names = list(params)
    w_all = np.concatenate([np.asarray(params[n]["kernel"]).ravel() for n in names])
    for sparsity in SPARSITIES:
        masks = make(params, sparsity)
        if sparsity == 0.99:
            chex.assert_trees_all_equal(masks, pruning.global_magnitude_masks(params, sparsity))
        m_all = np.concatenate([np.asarray(masks[n]["kernel"]).ravel() for n in names])
        assert (~m_all).sum() == _n_pruned(w_all.size, sparsity)
        np.testing.assert_array_equal(m_all, _ref_keep(np.abs(w_all), m_all.sum()))
        # One threshold: every kept magnitude >= every pruned one.
        assert np.abs(w_all[m_all]).min() >= np.abs(w_all[~m_all]).max()


def test_global_magnitude_min_kept_per_layer():
    params = _kernels(3, shapes=[(64, 64), (32, 16)])
    params["layer1"]["kernel"] = params["layer1"]["kernel"] * 1e-3  # would die globally
    plain = pruning.global_magnitude_masks(params, 0.9)
    assert not np.asarray(plain["layer1"]["kernel"]).any()
    masks = pruning.global_magnitude_masks(params, 0.9, min_kept_per_layer=5)
    kept1 = np.asarray(masks["layer1"]["kernel"])
    assert kept1.sum() == 5
    np.testing.assert_array_equal(kept1, _ref_keep(np.abs(params["layer1"]["kernel"]), 5))
    total = 64 * 64 + 32 * 16
    n_pruned = sum(int((~np.asarray(masks[n]["kernel"])).sum()) for n in masks)
    assert n_pruned == _n_pruned(total, 0.9)
    traced = jax.jit(functools.partial(pruning.global_magnitude_masks, min_kept_per_layer=5))
    chex.assert_trees_all_equal(traced(params, 0.9), masks)
    with pytest.raises(ValueError, match="min_kept_per_layer"):
        pruning.global_magnitude_masks(params, 0.99, min_kept_per_layer=40)


def test_random_masks_exact_deterministic_nested():
    params = _kernels(4)
    key = jax.random.key(7)
    make = jax.jit(pruning.random_masks)  # traced sparsity: compiled once for all sparsities
    looser = make(params, 0.3, key=key)
    for sparsity in SPARSITIES:
        masks = make(params, sparsity, key=key)
        for name, layer in params.items():
            n = layer["kernel"].size
            assert int((~masks[name]["kernel"]).sum()) == _n_pruned(n, sparsity)
            # Same key: the sparser mask is inside the looser one.
            assert not (masks[name]["kernel"] & ~looser[name]["kernel"]).any()
    chex.assert_trees_all_equal(masks, pruning.random_masks(params, sparsity, key=key))
    other = make(params, 0.5, key=jax.random.key(8))
    same = make(params, 0.5, key=key)
    assert not all(bool((other[n]["kernel"] == same[n]["kernel"]).all()) for n in params)


def test_previous_masks_rank_below_survivors():
    w = jnp.arange(1.0, 101.0).reshape(10, 10)  # |w| increasing with the index
    prev = {"w": jnp.arange(100).reshape(10, 10) < 90}  # the 10 *largest* were pruned before
    masks = pruning.layerwise_magnitude_masks({"w": w}, 0.5, masks=prev)
    m = np.asarray(masks["w"]).ravel()
    assert m.sum() == 50 and not m[90:].any()
    np.testing.assert_array_equal(m, (np.arange(100) >= 40) & (np.arange(100) < 90))


# ----------------------------------------------------------------------------------------------
# Structured masks.
# ----------------------------------------------------------------------------------------------


def _channel_kept(mask):
    m = np.asarray(mask)
    kept = m.reshape(-1, m.shape[-1]).any(axis=0)
    # Whole output channels and nothing else: constant along every axis but the last.
    np.testing.assert_array_equal(m, np.broadcast_to(kept, m.shape))
    return kept


@pytest.mark.parametrize("sparsity", [0.5, 0.75, 0.9])
def test_layerwise_channel_masks(sparsity):
    params = _kernels(5, shapes=[(3, 3, 3, 64), (3, 3, 64, 32), (128, 10)])
    masks = pruning.layerwise_channel_masks(params, sparsity)
    for name, layer in params.items():
        w = np.asarray(layer["kernel"])
        kept = _channel_kept(masks[name]["kernel"])
        c = w.shape[-1]
        assert (~kept).sum() == _n_pruned(c, sparsity)
        norms = np.sqrt((w.reshape(-1, c) ** 2).sum(axis=0))
        np.testing.assert_array_equal(kept, _ref_keep(norms, kept.sum()))
        pruned_w = np.asarray(apply_masks(layer, masks[name])["kernel"])
        assert (pruned_w[..., ~kept] == 0).all() and (pruned_w[..., kept] != 0).all()


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_global_channel_masks(sparsity):
    params = _kernels(6, shapes=[(3, 3, 3, 64), (3, 3, 64, 32), (128, 10)])
    masks = pruning.global_channel_masks(params, sparsity, min_kept_per_layer=1)
    kept, norms = [], []
    for name, layer in params.items():
        w = np.asarray(layer["kernel"])
        k = _channel_kept(masks[name]["kernel"])
        assert k.any()
        kept.append(k)
        norms.append(np.sqrt((w.reshape(-1, w.shape[-1]) ** 2).sum(axis=0)))
    kept, norms = np.concatenate(kept), np.concatenate(norms)
    assert (~kept).sum() == _n_pruned(kept.size, sparsity)
    if sparsity == 0.5:  # the per-layer minimum is not binding here: one global threshold
        assert norms[kept].min() >= norms[~kept].max()


# ----------------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------------


def test_summarize_intersect_nonzero():
    params = {"d": {"kernel": jnp.array([[1.0, 0.0], [0.0, 2.0]]), "bias": jnp.ones(2)}}
    masks = {"d": {"kernel": jnp.array([[True, True], [False, True]]), "bias": None}}
    s = pruning.summarize_sparsity(params)
    assert s.layers == {"d/kernel": pruning.LayerSparsity(4, 2, 0.5)}
    assert (s.size, s.num_pruned, s.sparsity) == (4, 2, 0.5)
    sm = pruning.summarize_sparsity(masks)
    assert (sm.size, sm.num_pruned, sm.sparsity) == (4, 1, 0.25)
    assert "| **total** | 4 | 1 | 25.0000% |" in sm.table()
    nz = pruning.nonzero_masks(params)
    assert nz["d"]["bias"] is None
    both = pruning.intersect_masks(masks, nz, None)
    np.testing.assert_array_equal(both["d"]["kernel"], [[True, False], [False, True]])
    assert both["d"]["bias"] is None
    with pytest.raises(ValueError, match="structure"):
        pruning.intersect_masks(masks, {"d": {"kernel": None}})


# ----------------------------------------------------------------------------------------------
# HYDRA.
# ----------------------------------------------------------------------------------------------


def test_hydra_init_scores_formula_and_initial_mask_is_lwm():
    params = _kernels(9)
    scores = pruning.init_scores(params)
    for name, layer in params.items():
        w = np.asarray(layer["kernel"], np.float64)
        want = np.sqrt(6.0 / np.prod(w.shape[:-1])) * w / np.abs(w).max()
        np.testing.assert_allclose(scores[name]["kernel"], want, rtol=1e-6)
        assert scores[name]["bias"] is None
    from_scores = jax.jit(pruning.scores_to_masks)
    lwm = jax.jit(pruning.layerwise_magnitude_masks)
    for s in SPARSITIES:
        chex.assert_trees_all_equal(from_scores(scores, s), lwm(params, s))
    chex.assert_trees_all_equal(
        pruning.scores_to_masks(scores, 0.99), pruning.layerwise_magnitude_masks(params, 0.99)
    )
    zero = pruning.init_scores({"w": jnp.zeros((3, 4))})
    assert not np.asarray(zero["w"]).any()


def test_hydra_straight_through_gradient_hand_checked():
    score = jnp.array([[0.5, -2.0, 0.1], [0.0, 3.0, -0.2]])
    c = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = pruning.topk_mask_ste(score, 0.5)  # keep the 3 largest |score|: 3.0, -2.0, 0.5
    np.testing.assert_array_equal(mask, [[1, 1, 0], [0, 1, 0]])
    grad = jax.grad(lambda s: jnp.sum(c * pruning.topk_mask_ste(s, 0.5)))(score)
    # dL/dmask = c, dL/dscore = c * sign(score) (sign(0) = 0), pruned entries included.
    np.testing.assert_array_equal(grad, [[1.0, -2.0, 3.0], [0.0, 5.0, -6.0]])
    # Through the masked weights: dL/dscore = dL/dw' * w * sign(score).
    w = jnp.array([[2.0, 1.0, -1.0], [3.0, 0.5, 4.0]])
    g = jax.grad(
        lambda s: jnp.sum(c * pruning.masked_params_from_scores({"w": w}, {"w": s}, 0.5)["w"])
    )(score)
    np.testing.assert_array_equal(g, [[2.0, -2.0, -3.0], [0.0, 2.5, -24.0]])


def test_hydra_scores_train_weights_frozen():
    rng = np.random.default_rng(10)
    x = jnp.asarray(rng.standard_normal((64, 16)), jnp.float32)
    params = {"w1": jnp.asarray(rng.standard_normal((16, 32)) / 4, jnp.float32),
              "b1": jnp.zeros(32), "w2": jnp.asarray(rng.standard_normal((32, 3)) / 6, jnp.float32)}
    y = jnp.tanh(x @ params["w1"]) @ params["w2"] + 0.1 * jnp.asarray(rng.standard_normal((64, 3)))
    sparsity = 0.8

    def loss(tree):
        p = pruning.masked_params_from_scores(tree["params"], tree["scores"], sparsity)
        return jnp.mean((jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] - y) ** 2)

    tree = {"params": params, "scores": pruning.init_scores(params)}
    tx = optax.adam(1e-2)
    opt_state = tx.init(tree)

    @jax.jit
    def step(tree, opt_state):
        value, grads = jax.value_and_grad(loss)(tree)
        updates, opt_state = tx.update(grads, opt_state, tree)
        return optax.apply_updates(tree, updates), opt_state, value, grads

    first = None
    for _ in range(50):
        tree, opt_state, value, grads = step(tree, opt_state)
        first = value if first is None else first
        assert all(not np.asarray(g).any() for g in jax.tree.leaves(grads["params"]))
    chex.assert_trees_all_equal(tree["params"], params)  # weights did not move
    init = pruning.init_scores(params)
    assert not np.allclose(tree["scores"]["w1"], init["w1"])  # scores did
    assert float(loss(tree)) < float(first)
    masks = pruning.scores_to_masks(tree["scores"], sparsity)
    assert masks["b1"] is None
    assert int((~masks["w1"]).sum()) == _n_pruned(16 * 32, sparsity)


# ----------------------------------------------------------------------------------------------
# The wrapper.
# ----------------------------------------------------------------------------------------------


def _regression(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((128, 16)), jnp.float32)
    w1 = rng.standard_normal((16, 32)) / 4
    w2 = rng.standard_normal((32, 4)) / 6
    y = jnp.asarray(np.tanh(np.asarray(x) @ w1) @ w2, jnp.float32)
    params = {
        "h": {"kernel": jnp.asarray(rng.standard_normal((16, 32)) / 4, jnp.float32),
              "bias": jnp.zeros(32)},
        "o": {"kernel": jnp.asarray(rng.standard_normal((32, 4)) / 6, jnp.float32),
              "bias": jnp.zeros(4)},
    }

    def loss(p):
        h = jnp.tanh(x @ p["h"]["kernel"] + p["h"]["bias"])
        return jnp.mean((h @ p["o"]["kernel"] + p["o"]["bias"] - y) ** 2)

    return params, loss


OPTIMIZERS = {
    "sgd_momentum": lambda: optax.sgd(0.05, momentum=0.9),
    "nesterov": lambda: optax.sgd(0.05, momentum=0.9, nesterov=True),
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
}
SCHEDULES = {
    "one_shot": OneShotSchedule(),
    "polynomial": PolynomialSchedule(begin_step=0, end_step=400, update_freq=50),
}


def _run(tx, params, loss, num_steps):
    """``num_steps`` jitted steps in one scan; per step: pruned counts, expected counts, revival."""
    kernels = ["h", "o"]

    def body(carry, _):
        p, state, ever_pruned = carry
        grads = jax.grad(loss)(p)
        updates, state = tx.update(grads, state, p)
        p = optax.apply_updates(p, updates)
        ever_pruned = {k: ever_pruned[k] | ~state.masks[k]["kernel"] for k in kernels}
        revived = jnp.stack([jnp.any(ever_pruned[k] & (p[k]["kernel"] != 0)) for k in kernels])
        zeros = jnp.stack([jnp.sum(p[k]["kernel"] == 0) for k in kernels])
        unmasked = jnp.stack([jnp.sum(~state.masks[k]["kernel"]) for k in kernels])
        return (p, state, ever_pruned), (zeros, unmasked, revived)

    ever = {k: jnp.zeros(params[k]["kernel"].shape, bool) for k in kernels}
    run = jax.jit(lambda p, s: jax.lax.scan(body, (p, s, ever), None, length=num_steps))
    return run(params, tx.init(params))


@pytest.mark.parametrize("sched_name", list(SCHEDULES))
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_no_revival_1000_steps(opt_name, sched_name):
    params, loss = _regression()
    schedule = SCHEDULES[sched_name]
    target = 0.9
    tx = pruning.sparsify(OPTIMIZERS[opt_name](), mask_fn=pruning.layerwise_magnitude_masks,
                          schedule=schedule, target_sparsity=target)
    (p, state, _), (zeros, unmasked, revived) = _run(tx, params, loss, 1000)
    zeros, unmasked, revived = map(np.asarray, (zeros, unmasked, revived))
    assert not revived.any(), "a pruned weight became non-zero"
    # Measured sparsity (exact zeros in the weights) equals the masks' at every step ...
    np.testing.assert_array_equal(zeros, unmasked)
    # ... which is the scheduled sparsity, by the exact-count rule, at every step.
    sizes = [16 * 32, 32 * 4]
    for t in range(1000):
        s = float(schedule.get_sparsity_at_step(target, t))
        want = [pruning.num_to_prune(n, s) for n in sizes]
        assert zeros[t].tolist() == want, (t, s)
    assert zeros[-1].tolist() == [_n_pruned(n, target) for n in sizes]
    # Moments are zero at pruned entries, and training still worked on the survivors.
    for leaf in jax.tree.leaves(state.inner_state):
        if getattr(leaf, "shape", None) == (16, 32):
            assert not np.asarray(leaf)[~np.asarray(state.masks["h"]["kernel"])].any()
    assert float(loss(p)) < float(loss(apply_masks(params, state.masks)))
    assert state.target_sparsities["h"]["kernel"] == np.float32(target)
    assert state.target_sparsities["h"]["bias"] is None


def test_naive_gradient_masking_revives_control():
    """Control: masking only the gradients lets momentum revive pruned weights."""
    params, loss = _regression(1)
    tx = optax.sgd(0.05, momentum=0.9)
    state = tx.init(params)
    for _ in range(20):
        updates, state = tx.update(jax.grad(loss)(params), state)
        params = optax.apply_updates(params, updates)
    masks = pruning.layerwise_magnitude_masks(params, 0.9)
    params = apply_masks(params, masks)
    grads = apply_masks(jax.grad(loss)(params), masks)
    updates, state = tx.update(grads, state)
    assert pruning.summarize_sparsity(optax.apply_updates(params, updates)).sparsity < 0.1


def test_iterative_reaches_target_on_last_round():
    params, loss = _regression(2)
    schedule = IterativeSchedule(num_rounds=3, round_length=20, begin_step=5)
    target = 0.95
    tx = pruning.sparsify(optax.sgd(0.05, momentum=0.9), mask_fn=pruning.global_magnitude_masks,
                          schedule=schedule, target_sparsity=target)
    _, (zeros, _, revived) = _run(tx, params, loss, 60)
    total = np.asarray(zeros).sum(axis=1)
    assert not np.asarray(revived).any()
    n = 16 * 32 + 32 * 4
    for t, r in [(4, 0), (5, 1), (24, 1), (25, 2), (44, 2), (45, 3), (59, 3)]:
        s = 0.0 if r == 0 else 1 - (1 - target) ** (r / 3)
        if r == 3:
            s = target
        assert abs(total[t] - _n_pruned(n, s)) <= (0 if r in (0, 3) else 1), (t, total[t])
    assert total[45] == _n_pruned(n, target)


def test_fixed_masks_from_dense_params():
    params, loss = _regression(3)
    masks = pruning.layerwise_magnitude_masks(params, 0.95)
    tx = pruning.sparsify(optax.adam(1e-2), masks=masks)
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
    for _ in range(5):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
        chex.assert_trees_all_equal(pruning.nonzero_masks(params), masks)
    assert state.target_sparsities["h"]["kernel"] == np.float32(1 - 25 / 512)  # ceil(486.4)


def test_bfloat16_params_are_zeroed_exactly():
    key = jax.random.key(11)
    x = jax.random.normal(key, (64, 32))
    params = {"w": jax.random.normal(jax.random.fold_in(key, 1), (32, 16), jnp.bfloat16)}

    def loss(p):
        return jnp.mean((x @ p["w"].astype(jnp.float32) - 1.0) ** 2)

    tx = pruning.sparsify(optax.adam(1e-2), mask_fn=pruning.layerwise_magnitude_masks,
                          schedule=PolynomialSchedule(0, 4, 2), target_sparsity=0.9)
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
    for _ in range(8):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
    assert params["w"].dtype == jnp.bfloat16
    assert pruning.summarize_sparsity(params).num_pruned == _n_pruned(512, 0.9)
    chex.assert_trees_all_equal(pruning.nonzero_masks(params), state.masks)


def test_channel_masks_in_the_wrapper():
    params, loss = _regression(4)
    tx = pruning.sparsify(optax.sgd(0.05, momentum=0.9), mask_fn=pruning.layerwise_channel_masks,
                          schedule=PolynomialSchedule(0, 30, 10), target_sparsity=0.75)
    (p, state, _), (_, _, revived) = _run(tx, params, loss, 40)
    assert not np.asarray(revived).any()
    kept = _channel_kept(p["h"]["kernel"] != 0)
    assert kept.sum() == 8 and _channel_kept(state.masks["h"]["kernel"]).sum() == 8


def test_composes_with_condition_number_penalty():
    transforms = pytest.importorskip("tscnc_jax.transforms")
    penalties = pytest.importorskip("tscnc_jax.penalties")
    params, loss = _regression(5)
    lr, weight = 0.05, 0.01
    inner = optax.chain(transforms.add_condition_number_penalty(weight), optax.sgd(lr))
    tx = pruning.sparsify(inner, mask_fn=pruning.layerwise_magnitude_masks,
                          schedule=OneShotSchedule(), target_sparsity=0.8)
    state = tx.init(params)
    grads = jax.grad(loss)(params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    masks = state.masks
    # The penalty acts on the *pruned* kernels; pruned entries get -params.
    pruned = apply_masks(params, masks)
    pen_grads = jax.grad(penalties.condition_number_penalty)(pruned)
    want = jax.tree.map(
        lambda m, g, pg, p: -lr * (g + weight * pg) if m is None
        else jnp.where(m, -lr * (g + weight * pg), -p),
        masks, grads, pen_grads, params, is_leaf=lambda x: x is None,
    )
    chex.assert_trees_all_close(updates, want, rtol=1e-5, atol=1e-7)
    params = optax.apply_updates(params, updates)
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
    for _ in range(10):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
    chex.assert_trees_all_equal(pruning.nonzero_masks(params), masks)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_inner_inject_hyperparams():
    params, loss = _regression(6)
    inner = optax.inject_hyperparams(optax.sgd)(learning_rate=0.05, momentum=0.9)
    tx = pruning.sparsify(inner, mask_fn=pruning.layerwise_magnitude_masks,
                          schedule=OneShotSchedule(), target_sparsity=0.9)
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    # Momentum lives under inject_hyperparams' state: still masked.
    trace = state.inner_state.inner_state[0].trace
    assert not np.asarray(trace["h"]["kernel"])[~np.asarray(state.masks["h"]["kernel"])].any()
    state.inner_state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    state.inner_state.hyperparams["momentum"] = jnp.asarray(0.0)
    updates, _ = step(params, state)
    assert all(not np.asarray(u).any() for u in jax.tree.leaves(updates))


def test_wrapper_under_inject_hyperparams_traced_target():
    params, loss = _regression(7)
    tx = optax.inject_hyperparams(pruning.sparsify, static_args=("mask_fn",))(
        optax.sgd(0.05, momentum=0.9), mask_fn=pruning.global_magnitude_masks,
        schedule=OneShotSchedule(2), target_sparsity=0.5,
    )
    state = tx.init(params)
    state.hyperparams["target_sparsity"] = jnp.asarray(0.85)
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
    for _ in range(4):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
    n = 16 * 32 + 32 * 4
    assert pruning.summarize_sparsity(params).num_pruned == _n_pruned(n, 0.85)
    assert state.inner_state.target_sparsities["o"]["kernel"] == np.float32(0.85)


def test_compiles_once_across_mask_updates():
    params, loss = _regression(8)
    tx = pruning.sparsify(optax.sgd(0.05, momentum=0.9, nesterov=True),
                          mask_fn=pruning.layerwise_magnitude_masks,
                          schedule=PolynomialSchedule(0, 9, 3), target_sparsity=0.9)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(p, s):
        updates, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, updates), s

    state = tx.init(params)
    for _ in range(12):
        params, state = step(params, state)
    assert pruning.summarize_sparsity(params).layers["h/kernel"].num_pruned == _n_pruned(512, 0.9)


# ----------------------------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [1.0, -0.01, float("nan")])
def test_bad_sparsity_is_rejected(bad):
    params = _kernels(shapes=[(4, 4)])
    makers = [pruning.layerwise_magnitude_masks, pruning.global_magnitude_masks,
              pruning.layerwise_channel_masks, pruning.global_channel_masks,
              functools.partial(pruning.random_masks, key=jax.random.key(0))]
    for make in makers:
        with pytest.raises(ValueError, match="0 <= sparsity < 1"):
            make(params, bad)
    with pytest.raises(ValueError, match="0 <= sparsity < 1"):
        pruning.topk_mask_ste(jnp.ones((4, 4)), bad)
    with pytest.raises(ValueError, match="target_sparsity"):
        pruning.sparsify(optax.sgd(0.1), mask_fn=pruning.layerwise_magnitude_masks,
                         schedule=OneShotSchedule(), target_sparsity=bad)


def test_mismatched_masks_are_rejected():
    params, _ = _regression()
    wrong_tree = {"h": {"kernel": jnp.ones((16, 32), bool)}}
    wrong_shape = jax.tree.map(lambda x: jnp.ones(x.shape[::-1], bool), params)
    for masks in (wrong_tree, wrong_shape):
        with pytest.raises(ValueError, match="masks"):
            pruning.sparsify(optax.sgd(0.1), masks=masks).init(params)
        with pytest.raises(ValueError, match="masks"):
            pruning.layerwise_magnitude_masks(params, 0.5, masks=masks)
        with pytest.raises(ValueError, match="masks"):
            apply_masks(params, masks)
    with pytest.raises(ValueError, match="scores"):
        pruning.masked_params_from_scores(params, wrong_tree, 0.5)


def test_wrapper_misuse():
    params, _ = _regression()
    with pytest.raises(ValueError, match="mask_fn"):
        pruning.sparsify(optax.sgd(0.1))
    with pytest.raises(ValueError, match="all of"):
        pruning.sparsify(optax.sgd(0.1), mask_fn=pruning.layerwise_magnitude_masks,
                         target_sparsity=0.9)
    tx = pruning.sparsify(optax.sgd(0.1), mask_fn=pruning.layerwise_magnitude_masks,
                          schedule=OneShotSchedule(), target_sparsity=0.9)
    state = tx.init(params)
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(params, state)
    with pytest.raises(ValueError, match="k"):
        pruning.topk_mask(jnp.ones(5), 6)


def test_docstring_examples():
    import doctest

    from tscnc_jax.pruning import hydra, masks, schedules, topk, wrapper

    attempted = 0
    for module in (pruning, hydra, masks, schedules, topk, wrapper):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__
        attempted += result.attempted
    assert attempted > 0


def test_scores_to_masks_global_scope():
    rng = np.random.default_rng(0)
    params = {"c": jnp.asarray(rng.standard_normal((3, 3, 1, 32))),
              "d": jnp.asarray(rng.standard_normal((3136, 128)) * 0.02)}
    scores = tj.init_scores(params)
    layer = tj.scores_to_masks(scores, 0.99)
    glob = tj.scores_to_masks(scores, 0.99, scope="global")
    n = 288 + 3136 * 128
    kept = int(sum(np.sum(m) for m in jax.tree.leaves(glob)))
    assert kept == n - tj.pruning.num_to_prune(n, 0.99)
    assert int(np.sum(layer["c"])) == 288 - tj.pruning.num_to_prune(288, 0.99) == 2
    # HYDRA's sqrt(6 / fan_in) scaling ranks the 9-fan-in conv above the 3136-fan-in Dense.
    assert int(np.sum(glob["c"])) > 100
    ref = tj.global_magnitude_masks(scores, 0.99, filter_fn=lambda p, x: True,
                                    min_kept_per_layer=1)
    for a, b in zip(jax.tree.leaves(glob), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(a, b)
    masked = tj.masked_params_from_scores(params, scores, 0.99, scope="global")
    np.testing.assert_array_equal(np.asarray(masked["d"]) != 0, np.asarray(glob["d"]))
    with pytest.raises(ValueError, match="scope"):
        tj.scores_to_masks(scores, 0.99, scope="per_channel")
