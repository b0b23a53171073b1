"Calibration metrics against slow reference loops, hand-worked cases and torchmetrics; CalibrationInterpretation end to end"
import math, pickle, warnings
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset
from fastai.vision.all import *
from cskd_fastai.all import *
from conftest import tiny_cnn


# --- slow reference implementations: loops over samples, written from the definitions -------------------

def ref_bin(c, M):
    "Bin of `c` by the rule: edges e_m = m/M as floats, bin m is (e_m, e_{m+1}], 0 in the first"
    edges = [m/M for m in range(M+1)]
    if c == 0: return 0
    for m in range(M):
        if edges[m] < c <= edges[m+1]: return m
    raise AssertionError(c)


def ref_top(probs, targs):
    P = np.asarray(probs, dtype=np.float64); y = np.asarray(targs)
    out = []
    for row, t in zip(P, y):
        k = int(np.argmax(row))
        out.append((float(row[k]), 1.0 if k == t else 0.0))
    return out


def ref_binned_gaps(pairs, assign):
    "pairs: (confidence, hit); assign: bin of each pair -> dict bin -> (n, mean conf, mean hit)"
    bins = {}
    for (c, h), b in zip(pairs, assign): bins.setdefault(b, []).append((c, h))
    return {b: (len(v), sum(c for c, _ in v)/len(v), sum(h for _, h in v)/len(v)) for b, v in bins.items()}


def ref_ece(probs, targs, M):
    pairs = ref_top(probs, targs)
    stats = ref_binned_gaps(pairs, [ref_bin(c, M) for c, _ in pairs])
    return sum(n/len(pairs)*abs(a - c) for n, c, a in stats.values())


def ref_mce(probs, targs, M):
    pairs = ref_top(probs, targs)
    stats = ref_binned_gaps(pairs, [ref_bin(c, M) for c, _ in pairs])
    return max(abs(a - c) for n, c, a in stats.values())


def ref_adaptive_ece(probs, targs, M):
    "For distinct confidences: sort, cut into M runs of sizes differing by at most 1 (larger runs first)"
    pairs = sorted(ref_top(probs, targs))
    assert len({c for c, _ in pairs}) == len(pairs), "reference needs distinct confidences"
    n, total, start = len(pairs), 0., 0
    for m in range(M):
        size = n//M + (1 if m < n % M else 0)
        chunk = pairs[start:start+size]; start += size
        if chunk: total += len(chunk)/n*abs(sum(h for _, h in chunk)/len(chunk) - sum(c for c, _ in chunk)/len(chunk))
    return total


def ref_classwise(probs, targs, M):
    P = np.asarray(probs, dtype=np.float64); y = np.asarray(targs); N, K = P.shape
    per = []
    for k in range(K):
        pairs = [(float(P[i, k]), 1.0 if y[i] == k else 0.0) for i in range(N)]
        stats = ref_binned_gaps(pairs, [ref_bin(c, M) for c, _ in pairs])
        per.append(sum(n/N*abs(a - c) for n, c, a in stats.values()))
    return per


def ref_nll(probs, targs):
    P = np.asarray(probs, dtype=np.float64)
    return -sum(math.log(max(P[i, t], 1e-12)) for i, t in enumerate(targs))/len(P)


def ref_brier(probs, targs):
    P = np.asarray(probs, dtype=np.float64)
    return sum(sum((P[i, k] - (1. if k == t else 0.))**2 for k in range(P.shape[1])) for i, t in enumerate(targs))/len(P)


def random_preds(n, k, seed, scale=3., absent=()):
    g = torch.Generator().manual_seed(seed)
    probs = (torch.randn(n, k, generator=g, dtype=torch.float64)*scale).softmax(1)
    targs = torch.multinomial(probs, 1, generator=g)[:, 0]
    for a in absent:                      # relabel class `a` as another class
        targs[targs == a] = (a + 1) % k
    return probs, targs


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
    per = classwise_ece(probs, targs, M, per_class=True)
    np.testing.assert_allclose(per, ref_classwise(probs, targs, M), atol=1e-12)
    assert classwise_ece(probs, targs, M) == pytest.approx(np.mean(ref_classwise(probs, targs, M)), abs=1e-12)
    assert nll(probs, targs) == pytest.approx(ref_nll(probs, targs), rel=1e-12)
    assert brier_score(probs, targs) == pytest.approx(ref_brier(probs, targs), rel=1e-12)
    for a in absent:      # an absent class adds the probability mass the model gives it
        assert per[a] == pytest.approx(probs[:, a].mean().item())


def test_nll_agrees_with_sklearn_and_torch():
    from sklearn.metrics import log_loss
    probs, targs = random_preds(500, 7, seed=3)
    assert nll(probs, targs) == pytest.approx(log_loss(targs.numpy(), probs.numpy(), labels=list(range(7))), rel=1e-9)
    logits = torch.randn(100, 4, dtype=torch.float64)
    t = torch.randint(0, 4, (100,))
    assert nll(logits.softmax(1), t) == pytest.approx(F.cross_entropy(logits, t).item(), rel=1e-9)


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
    ('2-d targs', GOOD_P, torch.tensor([[0], [1]]), '1-d'),
    ('string probs', [['a', 'b'], ['c', 'd']], GOOD_Y, 'numbers'),
    ('ragged probs', [[0.5, 0.5], [1.]], GOOD_Y, 'array of numbers|rectangular'),
]


@pytest.mark.parametrize('f', [ece, mce, adaptive_ece, classwise_ece, nll, brier_score])
@pytest.mark.parametrize('case', BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_value_error(f, case):
    _, probs, targs, msg = case
    with pytest.raises(ValueError, match=msg): f(probs, targs)


@pytest.mark.parametrize('f', [ece, mce, adaptive_ece, classwise_ece])
@pytest.mark.parametrize('n_bins', [0, -3, 2.5, True, '15', None])
def test_bad_n_bins(f, n_bins):
    with pytest.raises(ValueError, match='n_bins'): f(GOOD_P, GOOD_Y, n_bins=n_bins)


def test_bad_input_to_interpretation_and_helpers():
    with pytest.raises(ValueError, match='sum to 1'): CalibrationInterpretation.from_probs(GOOD_P/2, GOOD_Y)
    with pytest.raises(ValueError, match='vocab'): CalibrationInterpretation(GOOD_P, GOOD_Y, vocab=['a'])
    with pytest.raises(ValueError, match='NaN'): CalibrationInterpretation.from_logits(torch.tensor([[0., float('nan')]]), [0])
    with pytest.raises(ValueError, match='`T`'): apply_temperature(GOOD_P, -1.)
    with pytest.raises(ValueError, match=r'\[0, 1\]'): bin_index([1.2])
    interp = CalibrationInterpretation(GOOD_P, GOOD_Y)
    with pytest.raises(ValueError, match='n_boot'): interp.summary(ci=True, n_boot=1)
    with pytest.raises(ValueError, match='level'): interp.summary(ci=True, level=95)
    with pytest.raises(ValueError, match='n_bins'): interp.ece(n_bins=0)


# --- CalibrationInterpretation ------------------------------------------------------------------------------

def test_methods_and_summary_match_functions():
    probs, targs = random_preds(400, 10, seed=5, absent=(2,))
    interp = CalibrationInterpretation.from_probs(probs, targs, name='m')
    s = interp.summary()
    assert s.index.tolist() == ['m'] and s.shape == (1, 8)
    assert s.columns.tolist() == ['top1_error', 'top5_error', 'nll', 'brier_score', 'ece', 'adaptive_ece',
                                  'classwise_ece', 'mce']
    for f in [ece, mce, adaptive_ece, classwise_ece]:
        assert getattr(interp, f.__name__)() == pytest.approx(f(probs, targs), abs=1e-15)
        assert s[f.__name__].item() == pytest.approx(f(probs, targs), abs=1e-15)
        assert getattr(interp, f.__name__)(n_bins=7) == pytest.approx(f(probs, targs, n_bins=7), abs=1e-15)
    assert s.nll.item() == pytest.approx(nll(probs, targs)) and s.brier_score.item() == pytest.approx(brier_score(probs, targs))
    # top-k error by hand: the true class among the k largest probabilities
    top5 = probs.topk(5, dim=1).indices
    assert s.top5_error.item() == pytest.approx(1 - (top5 == targs[:, None]).any(1).double().mean().item())
    assert s.top1_error.item() == pytest.approx((probs.argmax(1) != targs).double().mean().item())
    assert interp.per_class_ece()[2] == pytest.approx(probs[:, 2].mean().item())
    assert interp.probs.shape == (400, 10) and interp.targs.dtype == torch.int64 and len(interp) == 400


def test_top5_error_with_fewer_than_five_classes_is_zero():
    probs, targs = random_preds(50, 2, seed=1)
    s = CalibrationInterpretation(probs, targs).summary()
    assert s.top5_error.item() == 0. and s.index.tolist() == ['model']


def test_bootstrap_intervals_are_percentiles_of_resampled_metrics():
    probs, targs = random_preds(120, 4, seed=11)
    interp = CalibrationInterpretation(probs, targs, name='x')
    sc = interp.summary(ci=True, n_boot=40, seed=3, level=0.9)
    # redo the bootstrap by hand: same generator protocol, metrics recomputed on each resample
    rng = np.random.default_rng(3)
    reps = {k: [] for k in ['top1_error', 'nll', 'brier_score', 'ece', 'adaptive_ece', 'classwise_ece', 'mce']}
    for _ in range(40):
        idx = torch.from_numpy(rng.integers(0, 120, 120))
        p, t = probs[idx], targs[idx]
        reps['top1_error'].append((p.argmax(1) != t).double().mean().item())
        for f in [nll, brier_score, ece, adaptive_ece, classwise_ece, mce]: reps[f.__name__].append(f(p, t))
    for k, v in reps.items():
        lo, hi = np.quantile(v, [0.05, 0.95])
        assert sc[f'{k}_lo'].item() == pytest.approx(lo, abs=1e-12), k
        assert sc[f'{k}_hi'].item() == pytest.approx(hi, abs=1e-12), k
    pd.testing.assert_frame_equal(sc, interp.summary(ci=True, n_boot=40, seed=3, level=0.9))
    assert not sc.equals(interp.summary(ci=True, n_boot=40, seed=4, level=0.9))
    assert sc.attrs['n_boot'] == 40 and sc.attrs['seed'] == 3


def test_from_logits_is_softmax():
    z = torch.randn(30, 5, dtype=torch.float64)*4
    t = torch.randint(0, 5, (30,))
    a, b = CalibrationInterpretation.from_logits(z, t), CalibrationInterpretation.from_probs(z.softmax(1), t)
    torch.testing.assert_close(a.probs, b.probs)


# --- from_learner ---------------------------------------------------------------------------------------

def _tensor_dls(n=256, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g); y = torch.randint(0, k, (n,), generator=g)
    return DataLoaders.from_dsets(TensorDataset(x[:192], y[:192]), TensorDataset(x[192:], y[192:]), bs=32, device='cpu'), x, y


@pytest.mark.parametrize('loss_func', [F.cross_entropy, nn.CrossEntropyLoss(), CrossEntropyLossFlat()])
def test_from_learner_always_gives_probabilities(loss_func):
    "A loss without `activation` makes get_preds return logits; from_learner applies the softmax"
    dls, x, y = _tensor_dls()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    learn = Learner(dls, model, loss_func=loss_func)
    with learn.no_bar(): interp = CalibrationInterpretation.from_learner(learn, name='lin')
    with torch.no_grad(): expected = model(x[192:]).softmax(1)
    torch.testing.assert_close(interp.probs, expected.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(interp.probs.sum(1), torch.ones(64, dtype=torch.float64))
    assert interp.targs.tolist() == y[192:].tolist() and interp.name == 'lin'
    # the training set, in order, and an explicit dl
    with learn.no_bar():
        tr = CalibrationInterpretation.from_learner(learn, ds_idx=0)
        dl = CalibrationInterpretation.from_learner(learn, dl=dls.valid)
    assert len(tr) == 192 and tr.targs.tolist() == y[:192].tolist()
    torch.testing.assert_close(dl.probs, interp.probs)


def test_from_learner_act_override_for_a_model_that_outputs_probabilities():
    dls, x, y = _tensor_dls()
    model = nn.Sequential(nn.Linear(6, 4), nn.Softmax(dim=1))
    learn = Learner(dls, model, loss_func=lambda p, t: F.nll_loss(p.log(), t))
    with learn.no_bar(): interp = CalibrationInterpretation.from_learner(learn, act=lambda o: o)
    with torch.no_grad(): expected = model(x[192:])
    torch.testing.assert_close(interp.probs, expected.double(), rtol=1e-6, atol=1e-7)


def test_from_learner_keeps_vocab_and_ds_idx(small_dls):
    learn = Learner(small_dls, tiny_cnn())
    with learn.no_bar(): interp = CalibrationInterpretation.from_learner(learn)
    assert interp.vocab == [str(i) for i in range(10)] and len(interp) == len(small_dls.valid_ds)
    fig = interp.plot_class_reliability(['3', 7])
    assert [a.get_title().split(':')[0] for a in fig.axes] == ['class 3', 'class 7']
    plt.close('all')


def test_fastai_metrics_during_training_and_export(small_dls, tmp_path):
    learn = Learner(small_dls, tiny_cnn(), metrics=[accuracy, ECE(), NLL(), BrierScore(), MCE(n_bins=10)],
                    cbs=CSKD(), path=tmp_path)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    last = dict(zip(learn.recorder.metric_names[1:], learn.recorder.values[-1]))
    assert {'ece', 'nll', 'brier_score', 'mce', 'kd_loss'} <= set(last)
    with learn.no_bar(): interp = CalibrationInterpretation.from_learner(learn)
    assert last['ece'] == pytest.approx(interp.ece(), abs=1e-5)
    assert last['mce'] == pytest.approx(interp.mce(n_bins=10), abs=1e-5)
    assert last['nll'] == pytest.approx(interp.nll(), abs=1e-5)
    assert last['nll'] == pytest.approx(last['valid_loss'], abs=1e-5)
    assert last['brier_score'] == pytest.approx(interp.brier_score(), abs=1e-5)
    learn.export('m.pkl')                               # the metrics pickle
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')                  # load_learner's warning about pickle
        assert load_learner(tmp_path/'m.pkl').metrics[1].name == 'ece'


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


def test_temperature_scale_changes_calibration_not_accuracy():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2000, 5, generator=g, dtype=torch.float64)*2
    y = torch.multinomial(z.softmax(1), 1, generator=g)[:, 0]
    over = (3*z).softmax(1)
    held = CalibrationInterpretation(over[:1000], y[:1000])
    test = CalibrationInterpretation(over[1000:], y[1000:], name='over', vocab=list('abcde'))
    T, scaled = test.temperature_scale(held)
    assert T == pytest.approx(fit_temperature(over[:1000], y[:1000]))
    assert scaled.name == 'over + TS' and scaled.temperature == T and scaled.vocab == list('abcde')
    assert torch.equal(scaled.probs.argmax(1), test.probs.argmax(1)) and scaled.error() == test.error()
    assert scaled.ece() < test.ece() and scaled.nll() < test.nll()
    torch.testing.assert_close(scaled.probs, (z[1000:]*3/T).softmax(1))
    T2, _ = test.temperature_scale((over[:1000], y[:1000]))
    assert T2 == T
    with pytest.raises(ValueError, match='classes'): test.temperature_scale(CalibrationInterpretation(torch.eye(3), [0, 1, 2]))
    with pytest.raises(ValueError, match='held_out'): test.temperature_scale(over)


def test_temperature_on_separable_held_out_set_warns():
    with pytest.warns(UserWarning, match='no finite temperature'):
        T = fit_temperature(torch.tensor([[0.9, 0.1], [0.2, 0.8]]), [0, 1])
    assert 0 < T <= 1


# --- plots and comparison ----------------------------------------------------------------------------------

@pytest.fixture
def two_models():
    p1, y = random_preds(300, 5, seed=2)
    p2 = (p1.log()*2).softmax(1)
    return CalibrationInterpretation(p1, y, name='calibrated'), CalibrationInterpretation(p2, y, name='overconfident')


def test_plots_return_figures_state_the_rule_and_draw_on_given_axes(two_models):
    a, b = two_models
    rule = '((m-1)/M, m/M]'
    fig = a.plot_reliability()
    assert isinstance(fig, plt.Figure) and rule in fig.axes[0].get_title() and f"ECE {a.ece():.2%}" in fig.axes[0].get_title()
    heights = [p.get_height() for p in fig.axes[1].patches]       # histogram underneath: fractions of samples
    assert sum(heights) == pytest.approx(1.)
    fig = a.plot_confidence_hist()
    assert rule in fig.axes[0].get_title()
    fig2, ax = plt.subplots()
    assert a.plot_reliability(ax=ax, hist=False) is fig2 and len(fig2.axes) == 1
    assert b.plot_misclassified_logprob(ax=ax) is fig2
    f3 = a.plot_class_reliability()
    assert sum(x.get_visible() for x in f3.axes) == 4 and rule in f3._suptitle.get_text()
    fig4, axs = plt.subplots(1, 2)
    assert a.plot_class_reliability([0, 1], ax=axs) is fig4
    with pytest.raises(ValueError, match='Axes'): a.plot_class_reliability([0, 1, 2], ax=axs)
    plt.close('all')


def test_misclassified_logprob_histogram_counts(two_models):
    a, _ = two_models
    fig = a.plot_misclassified_logprob(bins=10)
    wrong = (a.probs.argmax(1) != a.targs)
    assert sum(p.get_height() for p in fig.axes[0].patches) == wrong.sum().item()
    lp = a.probs.max(1).values[wrong].log().numpy()
    counts, _ = np.histogram(lp, bins=10, range=(-math.log(5), 0))
    np.testing.assert_array_equal([p.get_height() for p in fig.axes[0].patches], counts)
    perfect = CalibrationInterpretation(torch.eye(3), [0, 1, 2])
    assert isinstance(perfect.plot_misclassified_logprob(), plt.Figure)
    plt.close('all')


def test_compare_reliability_and_table(two_models):
    a, b = two_models
    fig = compare_reliability([a, b])
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(t.startswith(f"calibrated: ECE {a.ece():.2%}") for t in texts)
    assert any(t.startswith(f"overconfident: ECE {b.ece():.2%}, NLL {b.nll():.3f}") for t in texts)
    assert '((m-1)/M, m/M]' in fig.axes[0].get_title()
    fig2, ax = plt.subplots()
    assert compare_reliability({'x': a}, ax=ax, hist=False) is fig2
    tbl = compare_table([a, b])
    assert tbl.index.tolist() == ['calibrated', 'overconfident'] and tbl.index.name == 'model'
    assert tbl.loc['overconfident', 'ece'] == pytest.approx(b.ece())
    assert tbl.loc['calibrated', 'nll'] == pytest.approx(a.nll())
    # unnamed, duplicated, dict keys, other class counts
    c = CalibrationInterpretation(torch.eye(3), [0, 1, 2])
    assert compare_table([a, a, c]).index.tolist() == ['calibrated', 'calibrated (2)', 'model 2']
    assert compare_table({'first': a, 2: c}).index.tolist() == ['first', '2']
    assert compare_table(a).index.tolist() == ['calibrated']
    tci = compare_table([a, b], ci=True, n_boot=30)
    assert {'ece_lo', 'ece_hi', 'nll_lo'} <= set(tci.columns)
    with pytest.raises(ValueError, match='empty'): compare_table([])
    with pytest.raises(ValueError, match='not a CalibrationInterpretation'): compare_reliability([a, 'b'])
    plt.close('all')


def test_all_exports():
    ns = {}
    exec('from cskd_fastai.all import *', ns)
    for name in ['ece', 'mce', 'adaptive_ece', 'classwise_ece', 'nll', 'brier_score', 'ECE', 'NLL', 'MCE', 'BrierScore',
                 'CalibrationInterpretation', 'compare_reliability', 'compare_table', 'fit_temperature',
                 'apply_temperature', 'bin_index']:
        assert name in ns, name
