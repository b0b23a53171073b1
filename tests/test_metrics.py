"The calibration metrics of `cskd_fastai.metrics` against the references written from the definitions (tests/reference.py), hand-worked cases, torchmetrics, scikit-learn and torch; temperature scaling against a grid search"
import math
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cskd_fastai.metrics import *
from reference import (ref_bin, ref_ece, ref_mce, ref_adaptive_ece, ref_adaptive_ece_ties, ref_classwise, ref_nll, ref_brier,
                       ref_top_k_error, random_preds)   # written from the definitions: tests/reference.py


# --- the bin rule ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('M', [1, 2, 4, 8, 15, 16])
def test_bin_index_matches_rule_on_and_off_edges(M):
    vals = sorted({m/M for m in range(M+1)} | {0.25, 0.5, 0.75, 1.0, 0.0} | set(np.linspace(0, 1, 37).tolist()))
    np.testing.assert_array_equal(bin_index(vals, n_bins=M), [ref_bin(v, M) for v in vals])


def test_quarter_edges_go_to_the_lower_bin():
    # quarters are exact floats: each edge value belongs to the bin it closes
    np.testing.assert_array_equal(bin_index([0., 0.25, 0.5, 0.75, 1.], 4), [0, 0, 1, 2, 3])
    np.testing.assert_array_equal(bin_index([np.nextafter(0.25, 1), np.nextafter(0.75, 0)], 4), [1, 2])


def test_ece_on_edges_by_hand():
    # M=4: conf 1 (right) -> bin 4; 0.75 (wrong), 0.75 (right) -> bin 3; 0.5 (tie, wrong) -> bin 2
    probs = torch.tensor([[1., 0.], [0.75, 0.25], [0.25, 0.75], [0.5, 0.5]])
    targs = torch.tensor([0, 1, 1, 1])
    assert ece(probs, targs, n_bins=4) == pytest.approx(1/4*0.5 + 2/4*0.25)
    assert mce(probs, targs, n_bins=4) == pytest.approx(0.5)
    assert ece(probs, targs, n_bins=4) == pytest.approx(ref_ece(probs, targs, 4))
    # M=2: the wrong 0.5 is in (0, 0.5], alone; the right 0.75 in (0.5, 1]
    probs = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    assert ece(probs, [0, 1], n_bins=2) == pytest.approx(0.5*0.5 + 0.5*0.25)
    assert mce(probs, [0, 1], n_bins=2) == pytest.approx(0.5)


def test_confidences_of_exactly_one():
    eye = torch.eye(4)
    assert ece(eye, [0, 1, 2, 3]) == 0. and mce(eye, [0, 1, 2, 3]) == 0.
    assert ece(eye, [1, 1, 2, 3]) == pytest.approx(0.25)      # last bin: accuracy 3/4 at confidence 1
    assert mce(eye, [1, 1, 2, 3]) == pytest.approx(0.25)
    assert adaptive_ece(eye, [1, 1, 2, 3], n_bins=2) == pytest.approx(0.25)
    # confidence 1 next to confidences just below: both in the last bin
    probs = torch.tensor([[1., 0.], [0.99, 0.01]], dtype=torch.float64)
    assert ece(probs, [0, 1], n_bins=10) == pytest.approx(abs(0.5 - 0.995))
    # confidence 0 for a class goes in its first bin (class-wise)
    assert classwise_ece(eye, [0, 1, 2, 3], n_bins=4) == 0.


def test_torchmetrics_puts_edge_values_in_the_upper_bin():
    "The documented difference: on edges torchmetrics (bins closed on the left) gives another number"
    from torchmetrics.classification import MulticlassCalibrationError
    probs = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    targs = torch.tensor([0, 1])
    tm = MulticlassCalibrationError(num_classes=2, n_bins=2, norm='l1')(probs, targs).item()
    assert tm == pytest.approx(abs(0.5 - 0.625))                # both in [0.5, 1]
    assert ece(probs, targs, n_bins=2) == pytest.approx(0.375)


# --- agreement with torchmetrics away from edges ---------------------------------------------------------

@pytest.mark.parametrize('K', [2, 3, 10, 100])
@pytest.mark.parametrize('n_bins', [1, 5, 15, 20])
def test_ece_mce_agree_with_torchmetrics(K, n_bins):
    from torchmetrics.classification import MulticlassCalibrationError
    probs, targs = random_preds(3000, K, seed=K*100 + n_bins, scale=2.)
    probs = probs.float()
    conf = probs.max(1).values.double()
    keep = (conf - (conf*n_bins).round()/n_bins).abs() > 1e-5           # keep confidences away from the edges
    probs, targs = probs[keep], targs[keep]
    assert len(targs) > 2900
    for norm, f in [('l1', ece), ('max', mce)]:
        tm = MulticlassCalibrationError(num_classes=K, n_bins=n_bins, norm=norm)(probs, targs).item()
        assert f(probs, targs, n_bins=n_bins) == pytest.approx(tm, abs=2e-6), (norm, K, n_bins)


# --- every metric against the reference loops ------------------------------------------------------------

@pytest.mark.parametrize('K,N,M,absent', [(2, 300, 15, ()), (3, 200, 10, ()), (10, 400, 15, ()), (10, 300, 15, (3, 7)),
                                          (5, 7, 40, ()), (100, 150, 15, ())])
def test_metrics_match_reference(K, N, M, absent):
    probs, targs = random_preds(N, K, seed=K + N + M, absent=absent)
    for a in absent: assert not (targs == a).any()
    assert ece(probs, targs, M) == pytest.approx(ref_ece(probs, targs, M), abs=1e-12)
    assert mce(probs, targs, M) == pytest.approx(ref_mce(probs, targs, M), abs=1e-12)
    assert adaptive_ece(probs, targs, M) == pytest.approx(ref_adaptive_ece(probs, targs, M), abs=1e-12)
    assert adaptive_ece(probs, targs, M) == pytest.approx(ref_adaptive_ece_ties(probs, targs, M), abs=1e-12)
    per = classwise_ece(probs, targs, M, per_class=True)
    np.testing.assert_allclose(per, ref_classwise(probs, targs, M), atol=1e-12)
    assert classwise_ece(probs, targs, M) == pytest.approx(np.mean(ref_classwise(probs, targs, M)), abs=1e-12)
    assert nll(probs, targs) == pytest.approx(ref_nll(probs, targs), rel=1e-12)
    assert brier_score(probs, targs) == pytest.approx(ref_brier(probs, targs), rel=1e-12)
    for k in [1, 2, 5]: assert top_k_error(probs, targs, k) == ref_top_k_error(probs, targs, k)
    for a in absent:      # an absent class adds the probability mass the model gives it
        assert per[a] == pytest.approx(probs[:, a].mean().item())


def test_nll_agrees_with_sklearn_and_torch():
    from sklearn.metrics import log_loss
    probs, targs = random_preds(500, 7, seed=3)
    assert nll(probs, targs) == pytest.approx(log_loss(targs.numpy(), probs.numpy(), labels=list(range(7))), rel=1e-9)
    logits = torch.randn(100, 4, dtype=torch.float64)
    t = torch.randint(0, 4, (100,))
    assert nll(logits.softmax(1), t) == pytest.approx(F.cross_entropy(logits, t).item(), rel=1e-9)


def test_top_k_error_agrees_with_torch_topk():
    "Without ties, the label among torch's k largest probabilities"
    probs, targs = random_preds(400, 10, seed=4)
    for k in [1, 3, 5, 10]:
        right = (probs.topk(k, dim=1).indices == targs[:, None]).any(1)
        assert top_k_error(probs, targs, k) == pytest.approx(1 - right.double().mean().item())
    # ties: k=1 takes the first of tied classes, k>1 lets a tied label in
    tie = torch.tensor([[0.4, 0.4, 0.2]])
    assert top_k_error(tie, [1], 1) == 1. and top_k_error(tie, [1], 2) == 0. and top_k_error(tie, [2], 2) == 1.
    for k in [0, -1, 1.5, True]:
        with pytest.raises(ValueError, match='`k`'): top_k_error(probs, targs, k)


def test_brier_score_does_not_change_its_input():
    probs, targs = random_preds(20, 3, seed=2)
    P = probs.numpy().copy(); before = P.copy()
    brier_score(P, targs.numpy()); brier_score(probs, targs)
    np.testing.assert_array_equal(P, before)
    np.testing.assert_array_equal(probs.numpy(), before)


def test_empty_bins_are_ignored():
    # 3 samples, 50 bins: 47 empty bins, which must not count in MCE (their gap would be 0 anyway) nor ECE
    probs = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.55, 0.45]], dtype=torch.float64)
    targs = torch.tensor([0, 0, 0])
    assert ece(probs, targs, 50) == pytest.approx((0.1 + 0.7 + 0.45)/3)
    assert mce(probs, targs, 50) == pytest.approx(0.7)
    # a model whose every confidence is in one bin: MCE over that bin only
    probs = torch.tensor([[0.6, 0.4]]*4, dtype=torch.float64)
    assert mce(probs, [0, 0, 0, 1], 15) == pytest.approx(0.15)
    # fewer samples than equal-mass bins: one sample per bin
    probs, targs = random_preds(4, 3, seed=1)
    assert adaptive_ece(probs, targs, 10) == pytest.approx(ref_adaptive_ece(probs, targs, 4))


def test_adaptive_ece_keeps_ties_together():
    conf = torch.tensor([0.6, 0.6, 0.6, 0.6, 0.9, 0.9], dtype=torch.float64)
    probs = torch.stack([conf, 1 - conf], 1)
    targs = torch.tensor([0, 1, 0, 1, 0, 0])
    # 3 runs of 2 would split the 0.6s; by the rule they share the first bin, the 0.9s the second
    expected = 4/6*abs(0.5 - 0.6) + 2/6*abs(1. - 0.9)
    assert adaptive_ece(probs, targs, 3) == pytest.approx(expected)
    assert ref_adaptive_ece_ties(probs, targs, 3) == pytest.approx(expected)
    perm = torch.tensor([3, 5, 0, 2, 4, 1])
    assert adaptive_ece(probs[perm], targs[perm], 3) == pytest.approx(expected)


def test_inputs_of_any_kind_give_the_same_result():
    probs, targs = random_preds(50, 4, seed=9)
    ref = ece(probs, targs)
    assert ece(probs.numpy(), targs.numpy()) == ref
    assert ece(probs.tolist(), targs.tolist()) == ref
    assert ece(probs.float(), targs.int()) == pytest.approx(ref, abs=1e-6)
    assert ece(probs, targs.double()) == ref                       # whole-number float labels
    assert isinstance(ref, float) and isinstance(nll(probs, targs), float)
    # float16 probabilities (sums off by round-off) are accepted
    assert ece(probs.half(), targs) == pytest.approx(ref, abs=2e-3)


# --- bad input -------------------------------------------------------------------------------------------

GOOD_P = torch.tensor([[0.7, 0.3], [0.2, 0.8]])
GOOD_Y = torch.tensor([0, 1])

BAD = [
    ('nan', torch.tensor([[0.7, float('nan')], [0.2, 0.8]]), GOOD_Y, 'NaN or infinite'),
    ('inf', torch.tensor([[float('inf'), 0.3], [0.2, 0.8]]), GOOD_Y, 'NaN or infinite'),
    ('logits', torch.tensor([[2.3, -1.], [0.2, 0.8]]), GOOD_Y, r'\[0, 1\]'),
    ('negative', torch.tensor([[1.2, -0.2], [0.2, 0.8]]), GOOD_Y, r'\[0, 1\]'),
    ('not normalised', torch.tensor([[0.3, 0.3], [0.2, 0.8]]), GOOD_Y, 'sum to 1'),
    ('1-d probs', torch.tensor([0.7, 0.2]), GOOD_Y, '2-d'),
    ('3-d probs', torch.ones(2, 2, 1)/2, GOOD_Y, '2-d'),
    ('empty', torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 'no rows'),
    ('short targs', GOOD_P, torch.tensor([0]), '1 labels but `probs` has 2 rows'),
    ('long targs', GOOD_P, torch.tensor([0, 1, 1]), '3 labels'),
    ('label too big', GOOD_P, torch.tensor([0, 2]), r'\[0, 1\]'),
    ('negative label', GOOD_P, torch.tensor([0, -1]), r'\[0, 1\]'),
    ('fractional label', GOOD_P, torch.tensor([0., 0.5]), 'integer'),
    ('2-d targs', GOOD_P, torch.tensor([[0, 1], [1, 0]]), '1-d'),      # (n, 1), one target column, is accepted
    ('string probs', [['a', 'b'], ['c', 'd']], GOOD_Y, 'numbers'),
    ('ragged probs', [[0.5, 0.5], [1.]], GOOD_Y, 'array of numbers|rectangular'),
]


@pytest.mark.parametrize('f', [ece, mce, adaptive_ece, classwise_ece, nll, brier_score, top_k_error, fit_temperature])
@pytest.mark.parametrize('case', BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_value_error(f, case):
    _, probs, targs, msg = case
    with pytest.raises(ValueError, match=msg): f(probs, targs)


@pytest.mark.parametrize('f', [ece, mce, adaptive_ece, classwise_ece])
@pytest.mark.parametrize('n_bins', [0, -3, 2.5, True, '15', None])
def test_bad_n_bins(f, n_bins):
    with pytest.raises(ValueError, match='n_bins'): f(GOOD_P, GOOD_Y, n_bins=n_bins)


def test_bad_input_to_helpers():
    with pytest.raises(ValueError, match='`T`'): apply_temperature(GOOD_P, -1.)
    with pytest.raises(ValueError, match='`T`'): apply_temperature(GOOD_P, float('inf'))
    with pytest.raises(ValueError, match='sum to 1'): apply_temperature(GOOD_P/2, 2.)
    with pytest.raises(ValueError, match=r'\[0, 1\]'): bin_index([1.2])
    with pytest.raises(ValueError, match='n_bins'): ECE(n_bins=0)


# --- the fastai metrics ------------------------------------------------------------------------------------

def test_fastai_metrics_on_one_batch_are_the_softmax_metrics():
    "Against the reference loops on the softmax of the outputs, with their fastai names"
    g = torch.Generator().manual_seed(6)
    logits, t = torch.randn(64, 5, generator=g), torch.randint(0, 5, (64,), generator=g)
    p = logits.softmax(1)
    for m, ref, name in [(ECE(), lambda: ref_ece(p, t, 15), 'ece'), (MCE(n_bins=4), lambda: ref_mce(p, t, 4), 'mce'),
                         (ClasswiseECE(), lambda: np.mean(ref_classwise(p, t, 15)), 'classwise_ece'),
                         (AdaptiveECE(), lambda: ref_adaptive_ece(p, t, 15), 'adaptive_ece'),
                         (NLL(), lambda: ref_nll(p, t), 'nll'), (BrierScore(), lambda: ref_brier(p, t), 'brier_score')]:
        assert m(logits, t) == pytest.approx(ref(), abs=1e-6), name
        assert m.name == name
    assert ECE(softmax=False)(p, t) == pytest.approx(ref_ece(p, t, 15), abs=1e-6)
    assert math.isnan(NLL()(torch.full((4, 3), float('nan')), torch.zeros(4, dtype=torch.long)))


# --- temperature scaling ----------------------------------------------------------------------------------

def _grid_temperature(probs, targs):
    L = np.log(np.asarray(probs, dtype=np.float64)); y = np.asarray(targs)
    def f(T):
        z = L/T; z = z - z.max(1, keepdims=True)
        return -(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(1))).mean()
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 4001))
    vals = [f(T) for T in grid]
    return grid[int(np.argmin(vals))], f


@pytest.mark.parametrize('scale', [0.4, 1., 2.5])
def test_fit_temperature_is_the_nll_minimum(scale):
    g = torch.Generator().manual_seed(int(scale*10))
    z = torch.randn(3000, 6, generator=g, dtype=torch.float64)*2
    y = torch.multinomial(z.softmax(1), 1, generator=g)[:, 0]
    probs = (scale*z).softmax(1)
    T = fit_temperature(probs, y)
    T_grid, f = _grid_temperature(probs, y)
    assert T == pytest.approx(T_grid, rel=3e-3)
    assert f(T) <= f(T_grid) + 1e-10
    assert T == pytest.approx(scale, rel=0.15)                # the labels were drawn at temperature `scale`


def test_apply_temperature_divides_the_logits():
    z = torch.randn(50, 4, dtype=torch.float64)*3
    for T in [0.5, 1, 3.]:
        torch.testing.assert_close(apply_temperature(z.softmax(1), T), (z/T).softmax(1))
    assert apply_temperature(z.softmax(1).numpy(), 2).dtype == torch.float64


def test_temperature_on_separable_held_out_set_warns():
    with pytest.warns(UserWarning, match='no finite temperature'):
        T = fit_temperature(torch.tensor([[0.9, 0.1], [0.2, 0.8]]), [0, 1])
    assert 0 < T <= 1
