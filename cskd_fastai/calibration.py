"""Deprecated: the calibration tools moved to `cskd_fastai.metrics` (the metric functions, the fastai
metrics, temperature scaling) and `cskd_fastai.interpret` (`CalibrationInterpretation`, the plots,
`compare_reliability`, `compare_table`). This module re-exports them for one release."""

# Written by hand, NOT exported from a notebook: no notebook has `#| default_exp calibration`, so
# `nbdev-export` leaves this file alone. Delete it in the release after the one that deprecated it.

import warnings

from .metrics import *
from .interpret import *

__all__ = ['bin_index', 'ece', 'mce', 'adaptive_ece', 'classwise_ece', 'nll', 'brier_score', 'ECE', 'MCE', 'AdaptiveECE',
           'ClasswiseECE', 'NLL', 'BrierScore', 'fit_temperature', 'apply_temperature', 'CalibrationInterpretation',
           'compare_reliability', 'compare_table']

warnings.warn("cskd_fastai.calibration is deprecated; import from cskd_fastai.metrics and cskd_fastai.interpret "
              "(or cskd_fastai.all)", DeprecationWarning, stacklevel=2)
