"""The public API: every top-level name resolves, moved names still work and say where to."""

import pytest

import tscnc_jax as tj


def test_every_public_name_resolves():
    assert len(tj.__all__) == len(set(tj.__all__))
    for name in tj.__all__:
        assert getattr(tj, name) is not None, name


@pytest.mark.parametrize("name,home", [("pgd", tj.attacks), ("num_to_prune", tj.pruning),
                                       ("hard_concrete_gate", tj.sparsity),
                                       ("trades_loss", tj.training),
                                       ("set_fast_cpu_flags", tj.xla_cpu),
                                       ("tracked_condition_number_penalty", tj.spectral_tracking)])
def test_moved_names_warn_and_are_the_same_object(name, home):
    with pytest.warns(DeprecationWarning, match=f"moved to {home.__name__}.{name}"):
        old = getattr(tj, name)
    assert old is getattr(home, name)
    assert name not in tj.__all__


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        _ = tj.no_such_name
