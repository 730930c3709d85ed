"""Default hyperparameters of the TSCNC penalties, in one place.

Every function, transformation and config that has one of these as a default reads it from here,
so a changed default changes everywhere at once. The gated-TSC values are those of the TSCNC
authors' code (Feng et al., arXiv 2503.20454), the hard-concrete constants those of Louizos,
Welling, Kingma (2018, arXiv 1712.01312).
"""

from __future__ import annotations

#: Temperature ``tau`` of the smooth log-condition-number surrogate.
CNC_TEMPERATURE = 0.1
#: Singular-value shift ``delta`` of the surrogate (small against He-initialised
#: ``sigma_max ~ 1``).
CNC_DELTA = 1e-3
#: Reduction of the CNC over kernels: the mean keeps the penalty's size independent of depth.
CNC_REDUCE = "mean"

#: Transformed-L1 shape ``a`` of the unstructured TSC (``rho_a(x) = (a + 1)|x| / (a + |x|)``).
TSC_A = 1.0
#: Reduction of the unstructured TSC: ``"sum"`` gives every weight the same gradient
#: ``weight * rho_a'(w)``, about ``weight * (a + 1) / a`` per weight for ``|w| << a``, which is
#: directly comparable to weight decay's ``wd * w`` (see
#: :func:`tscnc_jax.transformed_sparsity_penalty`).
TSC_REDUCE = "sum"

#: Gated (structured) TSC of the authors' code: TL1 shape, the constant ``N`` (training-set
#: size), the weight decay in the prior precision ``p = N wd / prior_keep``, the L0 cost per
#: weight and the prior keep probability.
GATED_A = 100.0
GATED_NUM_TRAIN = 50_000
GATED_WEIGHT_DECAY = 5e-4
GATED_LAMBDA0 = 1e-3
GATED_PRIOR_KEEP = 0.7
