"""Tests of evaluate_robustness' cost model: survivors compacted into power-of-two buckets, Square
re-batched between segments, compiled functions cached across calls (and never a stale model)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import toy_mlp

from tscnc_jax import attacks as A
from tscnc_jax import evaluation as E
from tscnc_jax.evaluation import _batches as B
from tscnc_jax.evaluation import _compile as C
from tscnc_jax.evaluation import evaluate_robustness

# Cheap budgets for every member of the ensemble (FAB-T's fields only where it exists).
_FAB = {"fab_t_steps": 10, "fab_t_targets": 2}
SMALL_AA = A.AutoAttackConfig(
    apgd_ce_steps=10,
    apgd_t_steps=10,
    apgd_t_targets=2,
    square_queries=150,
    square_rescale_schedule=True,
    **{k: v for k, v in _FAB.items() if hasattr(A.AutoAttackConfig, k)},
)
KW = {"eps": 0.06, "sanity_checks": False, "key": jax.random.key(3)}

# Shapes seen while tracing ``_counting_apply`` (a module global, not a closure: a function whose
# closure holds a mutable list is, rightly, never cached across calls).
_TRACES: list = []


_apply = toy_mlp.apply


def _counting_apply(params, x):
    _TRACES.append(x.shape)
    return _apply(params, x)


@pytest.fixture(scope="module")
def models():
    """Two 64-64-10 MLPs trained from different seeds (clean accuracy about 0.95), and 100 test
    examples (not a power of two; with batch_size 48 the chunks are 48, 48 and a remainder)."""
    x, y = toy_mlp.data(jax.random.key(2), 100)
    return toy_mlp.train(0), toy_mlp.train(7), x, y


def _same_report(a, b):
    assert a.robust_accuracy == b.robust_accuracy
    assert a.n_broken == b.n_broken
    np.testing.assert_array_equal(a.clean_correct, b.clean_correct)
    np.testing.assert_array_equal(a.broken_by, b.broken_by)


# ------------------------------------------------------------------------------------------------
# Compaction: the same result for less work.
# ------------------------------------------------------------------------------------------------


def test_buckets():
    assert B._bucket_sizes(200) == [8, 16, 32, 64, 128, 200]
    assert B._bucket_sizes(4) == [4]
    assert [B._bucket(n, 200, True) for n in (1, 8, 9, 77, 128, 129, 200)] == [
        8, 8, 16, 128, 128, 200, 200]
    assert B._bucket(77, 200, False) == 200
    assert [B._smaller_bucket(s, 200) for s in (200, 128, 16, 8)] == [128, 64, 8, 0]
    chunks = list(B._chunks(np.arange(100, 277), 80, compact=True))
    assert [(len(p), m) for p, m in chunks] == [(80, 80), (80, 80), (32, 17)]
    np.testing.assert_array_equal(chunks[-1][0][17:], 260)  # padding repeats the first index
    padded = B._pad_labels(np.array([3, 4, 9, 9]), 2, 10)
    np.testing.assert_array_equal(padded, [3, 4, 0, 0])
    # Over 3 devices (mesh=): every size a multiple of 3, batch_size already rounded up to one.
    assert B._bucket_sizes(201, 3) == [9, 18, 33, 66, 129, 201]
    assert [len(p) for p, _ in B._chunks(np.arange(77), 201, compact=True, multiple=3)] == [129]


def test_mesh_argument(models):
    params, _, x, y = models
    logits_fn = functools.partial(_apply, params)
    kw = KW | {"attacks": SMALL_AA, "batch_size": 48}
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("batch",))
    _same_report(evaluate_robustness(logits_fn, [(x, y)], mesh=mesh, **kw),
                 evaluate_robustness(logits_fn, [(x, y)], **kw))
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        evaluate_robustness(logits_fn, [(x, y)], mesh=jax.devices(), **kw)


def test_compacted_equals_uncompacted_ensemble(models):
    params, _, x, y = models
    logits_fn = functools.partial(_apply, params)
    kw = KW | {"attacks": SMALL_AA, "batch_size": 48, "return_adversarial": True}
    compact = evaluate_robustness(logits_fn, [(x, y)], compact=True, **kw)
    full = evaluate_robustness(logits_fn, [(x, y)], compact=False, **kw)
    _same_report(compact, full)
    np.testing.assert_array_equal(compact.x_adv, full.x_adv)
    # A mixed workload: the later members ran on the survivors of APGD-CE, some of which survive.
    assert compact.n_broken["apgd-ce"] > 0 and compact.n_robust > 0, compact.n_broken


def test_square_work_follows_the_examples_still_robust(models):
    """Rows the model is queried on, counted by a host callback: Square on re-batched survivors
    costs at most about twice the queries the examples themselves use (buckets are powers of two),
    a fraction of Square on full padded batches, for the same result."""
    params, _, x, y = models
    rows = []

    def counting_fn(z):
        jax.debug.callback(lambda n: rows.append(int(n)), z.shape[0])
        return _apply(params, z)

    n_queries, eps, key = 300, 0.15, jax.random.key(3)
    square = functools.partial(A.square, n_queries=n_queries, rescale_schedule=True)
    kw = {"eps": eps, "key": key, "sanity_checks": False, "attacks": {"square": square},
          "batch_size": 32, "return_adversarial": True}
    compact = evaluate_robustness(counting_fn, [(x, y)], compact=True, **kw)
    rows_compact = sum(rows)
    rows.clear()
    full = evaluate_robustness(counting_fn, [(x, y)], compact=False, **kw)
    rows_full = sum(rows)
    _same_report(compact, full)
    np.testing.assert_array_equal(compact.x_adv, full.x_adv)
    assert 0 < compact.n_broken["square"] < compact.n_clean_correct  # a mixed workload
    # The queries the examples use: each example's own count, from its own run.
    idx = np.flatnonzero(compact.clean_correct)
    keys = jax.vmap(lambda e: jax.random.fold_in(jax.random.fold_in(key, 0), e))(idx)
    keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
    logits_fn = functools.partial(_apply, params)
    st = A.square_init(logits_fn, x[idx], y[idx], keys=keys, eps=eps)
    st = A.square_steps(logits_fn, x[idx], y[idx], st, keys=keys, eps=eps, n_queries=n_queries)
    used = int(np.sum(1 + np.asarray(st.queries)))
    overhead = 8 * 32 * 3  # clean pass, final predictions and verification, in chunks of 32
    assert rows_compact <= 2 * used + overhead, (rows_compact, used)
    assert rows_compact < 0.5 * rows_full, (rows_compact, rows_full, compact.n_broken)


def test_square_member_equals_the_attack_on_each_example(models):
    """The driver's Square (segments, buckets, restarts) gives example e the run of
    square_init / square_steps with the key fold_in(fold_in(fold_in(key, i), e), restart)."""
    params, _, x, y = models
    logits_fn = functools.partial(_apply, params)
    square = functools.partial(A.square, n_queries=200, restarts=2)
    key = jax.random.key(11)
    report = evaluate_robustness(logits_fn, [(x, y)], eps=0.05, key=key, attacks=[
        ("square", square)], batch_size=48, sanity_checks=False, return_adversarial=True)
    idx = np.flatnonzero(report.clean_correct)
    member_key = jax.random.fold_in(key, 0)
    keys = jax.vmap(lambda e: jax.random.fold_in(jax.random.fold_in(member_key, e), 0))(idx)
    kw = {"keys": keys, "eps": 0.05}
    st = A.square_init(logits_fn, x[idx], y[idx], **kw)
    st = A.square_steps(logits_fn, x[idx], y[idx], st, n_queries=200, **kw)
    broken0 = np.asarray(jnp.argmax(logits_fn(st.x_adv), -1)) != y[idx]
    assert 0 < broken0.sum() < len(idx)
    # Broken by the first run: the driver stored that run's point.
    np.testing.assert_array_equal(report.x_adv[idx[broken0]], np.asarray(st.x_adv)[broken0])
    assert (report.broken_by[idx[broken0]] == 0).all()
    # The second run only adds breaks.
    assert report.n_broken["square"] >= broken0.sum()


# ------------------------------------------------------------------------------------------------
# Compile once, never reuse a stale model.
# ------------------------------------------------------------------------------------------------


def test_second_call_does_not_trace_and_uses_the_new_parameters(models):
    params_a, params_b, x, y = models
    kw = KW | {"attacks": SMALL_AA, "batch_size": 48}
    _TRACES.clear()
    a = evaluate_robustness(functools.partial(_counting_apply, params_a), [(x, y)], **kw)
    assert _TRACES  # compiled
    _TRACES.clear()
    b = evaluate_robustness(functools.partial(_counting_apply, params_b), [(x, y)], **kw)
    assert _TRACES == []  # other parameters, same shapes: nothing traced again
    # jax.jit(partial(...)) is unwrapped: the same cache entries.
    b_jit = evaluate_robustness(jax.jit(functools.partial(_counting_apply, params_b)),
                                [(x, y)], **kw)
    assert _TRACES == []
    # A smaller data set whose chunks fall in the same buckets: nothing traced either.
    evaluate_robustness(functools.partial(_counting_apply, params_b), [(x[:96], y[:96])], **kw)
    assert _TRACES == []
    # ... and b is the second model's evaluation, not the first's: the same as with nothing
    # cached at all.
    E.clear_compile_cache()
    b_fresh = evaluate_robustness(functools.partial(_apply, params_b), [(x, y)], **kw)
    _same_report(b, b_fresh)
    _same_report(b_jit, b_fresh)
    assert a.clean_accuracy != b.clean_accuracy or not np.array_equal(a.broken_by, b.broken_by)


def test_eps_is_data(models):
    params, _, x, y = models
    kw = KW | {"attacks": ["fgsm", "pgd"], "batch_size": 48}
    evaluate_robustness(functools.partial(_counting_apply, params), [(x, y)], **kw)
    _TRACES.clear()
    for eps in (0.02, 0.1):
        evaluate_robustness(functools.partial(_counting_apply, params), [(x, y)],
                            **(kw | {"eps": eps}))
    assert _TRACES == []


def test_state_read_by_an_opaque_function_is_never_stale(models):
    """A function reading parameters from outside (a global, a dict, a mutated array) is
    compiled per call: the second evaluation sees the new parameters."""
    params_a, params_b, x, y = models
    kw = KW | {"attacks": SMALL_AA, "batch_size": 48}
    current = {"params": params_a}
    opaque = lambda z: _apply(current["params"], z)
    evaluate_robustness(opaque, [(x, y)], **kw)
    current["params"] = params_b
    got = evaluate_robustness(opaque, [(x, y)], **kw)
    _same_report(got, evaluate_robustness(functools.partial(_apply, params_b), [(x, y)], **kw))

    # NumPy arrays inside a partial are data: mutating them in place is seen.
    mutable = jax.tree.map(np.array, params_a)
    fn = functools.partial(_apply, mutable)
    evaluate_robustness(fn, [(x, y)], **kw)
    for k in mutable:
        mutable[k][...] = np.asarray(params_b[k])
    _same_report(evaluate_robustness(fn, [(x, y)], **kw),
                 evaluate_robustness(functools.partial(_apply, params_b), [(x, y)], **kw))


def test_what_is_cacheable(models):
    import flax.linen as nn

    params, _, _, _ = models
    assert C._split_model(functools.partial(_apply, params)).cacheable
    assert C._split_model(jax.jit(functools.partial(_apply, params))).cacheable
    assert not C._split_model(lambda z: _apply(params, z)).cacheable  # closes over arrays
    # Containers are pytrees (their leaves are keyed by value); any other object may be
    # mutated between calls, unseen.
    assert C._split_model(functools.partial(_apply, params, [1])).cacheable
    assert not C._split_model(functools.partial(_apply, params, object())).cacheable
    assert C._split_model(functools.partial(_apply, params)).arrays  # params travel as data

    model = nn.Dense(10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 64)))
    assert C._split_model(functools.partial(model.apply, variables)).cacheable
    assert not C._split_model(model.bind(variables)).cacheable  # a bound module holds its params
    key_a = C._split_model(functools.partial(nn.Dense(10).apply, variables)).key
    assert key_a == C._split_model(functools.partial(model.apply, variables)).key  # by value
    assert key_a != C._split_model(functools.partial(nn.Dense(5).apply, variables)).key

    # Attacks: functions and partials by value, closures by the values they close over.
    assert C._attack_key(functools.partial(A.pgd, steps=3)) == C._attack_key(
        functools.partial(A.pgd, steps=3))
    assert C._attack_key(functools.partial(A.pgd, steps=3)) != C._attack_key(
        functools.partial(A.pgd, steps=4))

    def factory(v):
        return lambda logits_fn, x, y, **kw: A.pgd(logits_fn, x, y, steps=v, **kw)

    assert C._attack_key(factory(2)) == C._attack_key(factory(2))
    assert C._attack_key(factory(2)) != C._attack_key(factory(3))
    assert not C._attack_key(factory(jnp.ones(2)))[0]  # an array in the closure


def test_benchmark_pairs_members_by_name_and_reports():
    pytest.importorskip("torch")
    pytest.importorskip("torchattacks")  # benchmark-only dependencies
    from benchmarks import evaluation as bench

    r = bench.compare(n=8, eps=0.1, repeats=1, versions=["fast"], sides=list(bench.SIDES),
                      train_steps=2, sanity_checks=False)
    row = r["versions"]["fast"]
    assert row["members"] == [m[0] for m in A.autoattack_members("fast", n_classes=10)]
    assert row["ours"]["images_per_s"] > 0 and row["torchattacks"]["images_per_s"] > 0
    assert set(row["ours"]["member_seconds"]) == set(row["members"])
    assert "| fast |" in bench.to_markdown(r)
    with pytest.raises(ValueError, match="counterpart"):
        bench.torchattacks_members(None, "fast", 0.1, ["pgd"])
