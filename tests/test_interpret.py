"`CalibrationInterpretation` (a fastai `Interpretation`) end to end: from a learner and from stored predictions, its metrics and summary against independent computations, plots, temperature scaling, comparisons"
import math, warnings
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import TensorDataset
from fastai.vision.all import *
from fastai.interpret import Interpretation
from cskd_fastai.metrics import *
from cskd_fastai.interpret import *
from cskd_fastai.callback import CSKD
from reference import (tiny_cnn, ref_ece, ref_mce, ref_adaptive_ece_ties, ref_classwise, ref_nll, ref_brier, ref_top_k_error,
                          random_preds)


# --- from a learner ------------------------------------------------------------------------------------------

def _tensor_dls(n=256, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g); y = torch.randint(0, k, (n,), generator=g)
    return DataLoaders.from_dsets(TensorDataset(x[:192], y[:192]), TensorDataset(x[192:], y[192:]), bs=32, device='cpu'), x, y


def test_is_a_fastai_interpretation():
    assert issubclass(CalibrationInterpretation, Interpretation)
    assert isinstance(CalibrationInterpretation(torch.eye(3), [0, 1, 2]), Interpretation)


@pytest.mark.parametrize('loss_func', [F.cross_entropy, nn.CrossEntropyLoss(), CrossEntropyLossFlat()])
def test_from_learner_gives_probabilities_and_per_item_losses(loss_func):
    "A loss without `activation` makes get_preds return logits; from_learner applies the softmax"
    dls, x, y = _tensor_dls()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    learn = Learner(dls, model, loss_func=loss_func)
    with learn.no_bar(): interp = CalibrationInterpretation.from_learner(learn, name='lin')
    with torch.no_grad(): logits = model(x[192:])
    torch.testing.assert_close(interp.probs, logits.softmax(1).double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(interp.probs.sum(1), torch.ones(64, dtype=torch.float64))
    assert interp.targs.tolist() == y[192:].tolist() and interp.name == 'lin'
    assert interp.learn is learn and interp.dl is not None
    # the losses are the per-item cross-entropy, and top_losses sorts them
    ce = F.cross_entropy(logits, y[192:], reduction='none')
    torch.testing.assert_close(interp.losses.float(), ce, rtol=1e-5, atol=1e-6)
    losses, idx = interp.top_losses(5)
    assert idx.tolist() == ce.argsort(descending=True)[:5].tolist()
    torch.testing.assert_close(losses.float(), ce.sort(descending=True).values[:5], rtol=1e-5, atol=1e-6)
    assert interp.top_losses(3, largest=False)[1].tolist() == ce.argsort()[:3].tolist()
    # the training set, in order, and an explicit dl
    with learn.no_bar():
        tr = CalibrationInterpretation.from_learner(learn, ds_idx=0)
        dl = CalibrationInterpretation.from_learner(learn, dl=dls.valid)
    assert len(tr) == 192 and tr.targs.tolist() == y[:192].tolist()
    torch.testing.assert_close(dl.probs, interp.probs)


def test_from_learner_runs_get_preds_once():
    dls, x, y = _tensor_dls()
    learn = Learner(dls, nn.Linear(6, 4), loss_func=F.cross_entropy)
    calls = []
    orig = learn.get_preds
    learn.get_preds = lambda *a, **k: calls.append(k) or orig(*a, **k)
    with learn.no_bar(): CalibrationInterpretation.from_learner(learn)
    assert len(calls) == 1 and calls[0]['with_loss']


def test_from_learner_act_override_and_a_loss_without_reduction():
    "A model that outputs probabilities, with a lambda loss: the losses fall back to the NLL of each sample"
    dls, x, y = _tensor_dls()
    model = nn.Sequential(nn.Linear(6, 4), nn.Softmax(dim=1))
    learn = Learner(dls, model, loss_func=lambda p, t: F.nll_loss(p.log(), t))
    with learn.no_bar(), pytest.warns(UserWarning, match='reduction'):
        interp = CalibrationInterpretation.from_learner(learn, act=noop)
    with torch.no_grad(): expected = model(x[192:])
    torch.testing.assert_close(interp.probs, expected.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(interp.losses, -expected[torch.arange(64), y[192:]].double().log(), rtol=1e-5, atol=1e-6)


def test_from_learner_needs_labels():
    dls, x, y = _tensor_dls()
    learn = Learner(dls, nn.Linear(6, 4), loss_func=F.cross_entropy)
    with learn.no_bar(), pytest.raises(ValueError, match='no labels'):
        CalibrationInterpretation.from_learner(learn, dl=DataLoader(TensorDataset(x[192:]), bs=32))


@pytest.fixture(scope='module')
def image_learner(tmp_path_factory):
    "A tiny image folder (2 classes x 12 noise images, 8 px) and an untrained CNN on it"
    path = tmp_path_factory.mktemp('imgs')
    rng = np.random.default_rng(0)
    for split in ['train', 'valid']:
        for c in ['cat', 'dog']:
            (path/split/c).mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path/split/c/f'{i}.png')
    dls = ImageDataLoaders.from_folder(path, valid='valid', bs=4, num_workers=0, device='cpu')
    set_seed(0)
    return Learner(dls, tiny_cnn(2))


def test_plot_top_losses_and_vocab_from_a_learner(image_learner):
    learn = image_learner
    with learn.no_bar():
        interp = CalibrationInterpretation.from_learner(learn)
        assert interp.vocab == ['cat', 'dog'] and len(interp) == 12
        _, idx, items = interp.top_losses(3, items=True)
        assert [str(o) for o in items] == [str(learn.dls.valid_ds.items[i]) for i in idx]
        interp.plot_top_losses(3)
    assert len(plt.gcf().axes) == 3
    plt.close('all')


def test_learner_only_methods_say_they_need_from_learner():
    probs, targs = random_preds(20, 3, seed=0)
    interp = CalibrationInterpretation.from_probs(probs, targs)
    assert interp.learn is None and interp.dl is None
    for f in [lambda: interp.plot_top_losses(3), lambda: interp.show_results([0]), lambda: interp[0],
              lambda: interp.top_losses(3, items=True)]:
        with pytest.raises(ValueError, match='from_learner'): f()
    # without a learner the losses are the NLL of each sample, and top_losses sorts them
    nll_each = -probs[torch.arange(20), targs].log()
    torch.testing.assert_close(interp.losses, nll_each)
    assert interp.top_losses(4)[1].tolist() == nll_each.argsort(descending=True)[:4].tolist()


def test_from_logits_is_softmax():
    z = torch.randn(30, 5, dtype=torch.float64)*4
    t = torch.randint(0, 5, (30,))
    a = CalibrationInterpretation.from_logits(z, t)
    torch.testing.assert_close(a.probs, z.softmax(1))
    torch.testing.assert_close(a.losses, F.cross_entropy(z, t, reduction='none'))


def test_bad_input_to_interpretation():
    P, Y = torch.tensor([[0.7, 0.3], [0.2, 0.8]]), torch.tensor([0, 1])
    with pytest.raises(ValueError, match='sum to 1'): CalibrationInterpretation.from_probs(P/2, Y)
    with pytest.raises(ValueError, match='vocab'): CalibrationInterpretation(P, Y, vocab=['a'])
    with pytest.raises(ValueError, match='losses'): CalibrationInterpretation(P, Y, losses=torch.zeros(3))
    with pytest.raises(ValueError, match='NaN'): CalibrationInterpretation.from_logits(torch.tensor([[0., float('nan')]]), [0])
    interp = CalibrationInterpretation(P, Y)
    with pytest.raises(ValueError, match='n_boot'): interp.summary(ci=True, n_boot=1)
    with pytest.raises(ValueError, match='level'): interp.summary(ci=True, level=95)
    with pytest.raises(ValueError, match='n_bins'): interp.ece(n_bins=0)
    with pytest.raises(ValueError, match='`k`'): interp.error(0)


# --- metrics and summary -----------------------------------------------------------------------------------

def test_ece_three_ways_by_hand():
    "interp.ece() == metrics.ece() == the binned sum worked out by hand"
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1], [0.2, 0.5, 0.3]], dtype=torch.float64)
    targs = torch.tensor([0, 1, 2, 1])
    # 5 bins: 0.5 (right), 0.6 (wrong, on the edge 3/5), 0.5 (right) in (0.4, 0.6]; 0.7 (wrong) in (0.6, 0.8]
    by_hand = 3/4*abs(2/3 - 1.6/3) + 1/4*abs(0 - 0.7)
    interp = CalibrationInterpretation(probs, targs)
    assert interp.ece(n_bins=5) == pytest.approx(by_hand, abs=1e-12)
    assert ece(probs, targs, n_bins=5) == pytest.approx(by_hand, abs=1e-12)
    assert interp.mce(n_bins=5) == pytest.approx(0.7)
    assert interp.error() == 0.5 and interp.error(2) == 0.25 and interp.error(3) == 0.


def test_methods_and_summary_match_the_reference_loops():
    probs, targs = random_preds(400, 10, seed=5, absent=(2,))
    interp = CalibrationInterpretation.from_probs(probs, targs, name='m', vocab=list('abcdefghij'))
    s = interp.summary()
    assert s.index.tolist() == ['m'] and s.index.name == 'model'
    assert s.columns.tolist() == ['top1_error', 'top5_error', 'nll', 'brier_score', 'ece', 'adaptive_ece',
                                  'classwise_ece', 'mce']
    refs = dict(ece=ref_ece(probs, targs, 15), mce=ref_mce(probs, targs, 15), adaptive_ece=ref_adaptive_ece_ties(probs, targs, 15),
                classwise_ece=np.mean(ref_classwise(probs, targs, 15)), nll=ref_nll(probs, targs), brier_score=ref_brier(probs, targs))
    for k, v in refs.items():
        assert getattr(interp, k)() == pytest.approx(v, abs=1e-12), k
        assert s[k].item() == pytest.approx(v, abs=1e-12), k
    assert interp.ece(n_bins=7) == pytest.approx(ref_ece(probs, targs, 7), abs=1e-12)
    # top-k error by hand: the true class among the k largest probabilities
    top5 = probs.topk(5, dim=1).indices
    assert s.top5_error.item() == pytest.approx(1 - (top5 == targs[:, None]).any(1).double().mean().item())
    assert s.top1_error.item() == pytest.approx((probs.argmax(1) != targs).double().mean().item())
    per = interp.per_class_ece()
    assert per.index.tolist() == list('abcdefghij')
    np.testing.assert_allclose(per.values, ref_classwise(probs, targs, 15), atol=1e-12)
    assert per['c'] == pytest.approx(probs[:, 2].mean().item())      # an absent class: the mass given to it
    assert interp.probs.shape == (400, 10) and interp.targs.dtype == torch.int64 and len(interp) == 400
    assert s.attrs == {'n': 400, 'n_bins': 15}


def test_top5_error_with_fewer_than_five_classes_is_zero():
    probs, targs = random_preds(50, 2, seed=1)
    s = CalibrationInterpretation(probs, targs).summary()
    assert s.top5_error.item() == 0. and s.index.tolist() == ['model']


def test_bootstrap_intervals_are_percentiles_of_resampled_metrics():
    probs, targs = random_preds(120, 4, seed=11)
    interp = CalibrationInterpretation(probs, targs, name='x')
    sc = interp.summary(ci=True, n_boot=40, seed=3, level=0.9)
    # redo the bootstrap by hand: same generator protocol, each metric by its reference loop on each resample
    refs = dict(top1_error=lambda p, t: ref_top_k_error(p, t, 1), top5_error=lambda p, t: ref_top_k_error(p, t, 5),
                nll=ref_nll, brier_score=ref_brier, ece=lambda p, t: ref_ece(p, t, 15),
                adaptive_ece=lambda p, t: ref_adaptive_ece_ties(p, t, 15),
                classwise_ece=lambda p, t: np.mean(ref_classwise(p, t, 15)), mce=lambda p, t: ref_mce(p, t, 15))
    rng = np.random.default_rng(3)
    reps = {k: [] for k in refs}
    for _ in range(40):
        idx = torch.from_numpy(rng.integers(0, 120, 120))
        for k, f in refs.items(): reps[k].append(f(probs[idx], targs[idx]))
    for k, v in reps.items():
        lo, hi = np.quantile(v, [0.05, 0.95])
        assert sc[f'{k}_lo'].item() == pytest.approx(lo, abs=1e-12), k
        assert sc[f'{k}_hi'].item() == pytest.approx(hi, abs=1e-12), k
    pd.testing.assert_frame_equal(sc, interp.summary(ci=True, n_boot=40, seed=3, level=0.9))
    assert not sc.equals(interp.summary(ci=True, n_boot=40, seed=4, level=0.9))
    assert sc.attrs['n_boot'] == 40 and sc.attrs['seed'] == 3


def test_fastai_metrics_during_training_and_export(small_dls, tmp_path):
    learn = Learner(small_dls, tiny_cnn(), metrics=[accuracy, ECE(), NLL(), BrierScore(), MCE(n_bins=10)],
                    cbs=CSKD(), path=tmp_path)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    last = dict(zip(learn.recorder.metric_names[1:], learn.recorder.values[-1]))
    assert {'ece', 'nll', 'brier_score', 'mce', 'kd_loss'} <= set(last)
    with learn.no_bar(): interp = CalibrationInterpretation.from_learner(learn)
    assert interp.vocab == [str(i) for i in range(10)] and len(interp) == len(small_dls.valid_ds)
    p, t = interp.probs, interp.targs
    assert last['ece'] == pytest.approx(ref_ece(p, t, 15), abs=1e-5)
    assert last['mce'] == pytest.approx(ref_mce(p, t, 10), abs=1e-5)
    assert last['nll'] == pytest.approx(ref_nll(p, t), abs=1e-5)
    assert last['nll'] == pytest.approx(last['valid_loss'], abs=1e-5)
    assert last['brier_score'] == pytest.approx(ref_brier(p, t), abs=1e-5)
    assert interp.losses.mean().item() == pytest.approx(last['valid_loss'], abs=1e-5)
    fig = interp.plot_class_reliability(['3', 7])
    assert [a.get_title().split(':')[0] for a in fig.axes] == ['class 3', 'class 7']
    plt.close('all')
    learn.export('m.pkl')                               # the metrics pickle
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')                  # load_learner's warning about pickle
        assert load_learner(tmp_path/'m.pkl').metrics[1].name == 'ece'


# --- temperature scaling -------------------------------------------------------------------------------------

def test_temperature_scale_changes_calibration_not_accuracy():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2000, 5, generator=g, dtype=torch.float64)*2
    y = torch.multinomial(z.softmax(1), 1, generator=g)[:, 0]
    over = (3*z).softmax(1)
    held = CalibrationInterpretation(over[:1000], y[:1000])
    test = CalibrationInterpretation(over[1000:], y[1000:], name='over', vocab=list('abcde'))
    T, scaled = test.temperature_scale(held)
    # T minimises the held-out NLL of softmax(3z/T): no smaller NLL on a fine grid around it
    held_nll = lambda T: F.cross_entropy(3*z[:1000]/T, y[:1000]).item()
    assert held_nll(T) <= min(held_nll(t) for t in np.linspace(T*0.9, T*1.1, 201)) + 1e-10
    assert T == pytest.approx(3., rel=0.15)
    assert scaled.name == 'over + TS' and scaled.temperature == T and scaled.vocab == list('abcde')
    assert scaled.learn is None
    assert torch.equal(scaled.probs.argmax(1), test.probs.argmax(1)) and scaled.error() == test.error()
    assert scaled.ece() < test.ece() and scaled.nll() < test.nll()
    torch.testing.assert_close(scaled.probs, (z[1000:]*3/T).softmax(1))
    T2, _ = test.temperature_scale((over[:1000], y[:1000]))
    assert T2 == T
    with pytest.raises(ValueError, match='classes'): test.temperature_scale(CalibrationInterpretation(torch.eye(3), [0, 1, 2]))
    with pytest.raises(ValueError, match='held_out'): test.temperature_scale(over)


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
    counts, _ = np.histogram(a.probs.max(1).values.numpy(), bins=np.arange(16)/15)
    np.testing.assert_allclose(heights, counts/300)
    fig = a.plot_confidence_hist(dpi=50)
    assert rule in fig.axes[0].get_title() and fig.dpi == 50
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
    assert any(t.startswith(f"calibrated: ECE {ref_ece(a.probs, a.targs, 15):.2%}") for t in texts)
    assert any(t.startswith(f"overconfident: ECE {b.ece():.2%}, NLL {ref_nll(b.probs, b.targs):.3f}") for t in texts)
    assert '((m-1)/M, m/M]' in fig.axes[0].get_title()
    fig2, ax = plt.subplots()
    assert compare_reliability({'x': a}, ax=ax, hist=False) is fig2
    tbl = compare_table([a, b])
    assert tbl.index.tolist() == ['calibrated', 'overconfident'] and tbl.index.name == 'model'
    assert tbl.loc['overconfident', 'ece'] == pytest.approx(ref_ece(b.probs, b.targs, 15))
    assert tbl.loc['calibrated', 'nll'] == pytest.approx(ref_nll(a.probs, a.targs))
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


# --- where the names live, and the old module ---------------------------------------------------------------

OLD_NAMES = ['bin_index', 'ece', 'mce', 'adaptive_ece', 'classwise_ece', 'nll', 'brier_score', 'ECE', 'MCE', 'AdaptiveECE',
             'ClasswiseECE', 'NLL', 'BrierScore', 'fit_temperature', 'apply_temperature', 'CalibrationInterpretation',
             'compare_reliability', 'compare_table']


def test_every_old_name_lives_in_metrics_or_interpret():
    import cskd_fastai.metrics as m, cskd_fastai.interpret as i
    for nm in OLD_NAMES: assert (nm in m.__all__) != (nm in i.__all__), nm
    assert 'top_k_error' in m.__all__
    ns = {}
    exec('from cskd_fastai.all import *', ns)
    for nm in OLD_NAMES: assert nm in ns, nm
    assert ns['BrierScore'] is m.BrierScore          # the multi-class one, not fastai's binary `BrierScore`



# --- a tabular learner (targets of shape (n, 1)) ----------------------------------------------------------------

def test_from_learner_on_a_tabular_learner():
    "`get_preds` of a tabular learner gives one target column; the summary matches metrics computed from scratch"
    import pandas as pd
    from sklearn.datasets import load_wine
    from fastai.tabular.all import TabularDataLoaders, tabular_learner, Normalize
    d = load_wine(as_frame=True).frame
    d['target'] = d['target'].map({0: 'a', 1: 'b', 2: 'c'})
    set_seed(0)
    dls = TabularDataLoaders.from_df(d, y_names='target', cont_names=list(d.columns[:-1]), procs=[Normalize],
                                     valid_idx=list(range(0, len(d), 4)), bs=32, num_workers=0)
    learn = tabular_learner(dls, layers=[16])
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-2)
    interp = CalibrationInterpretation.from_learner(learn)
    s = interp.summary(n_bins=15).iloc[0]
    # independently: the model on the validation rows, softmax, labels straight from the DataFrame through the vocab
    learn.model.eval()
    with torch.no_grad(): p = torch.cat([F.softmax(learn.model(*b[:2]), 1) for b in dls.valid])
    vocab = list(dls.vocab)
    y = np.array([vocab.index(v) for v in d['target'].iloc[list(range(0, len(d), 4))]])
    assert s['top1_error'] == pytest.approx(float((p.argmax(1).numpy() != y).mean()))
    assert s['nll'] == pytest.approx(float(-np.log(p.numpy()[np.arange(len(y)), y]).mean()), rel=1e-4)
