"""`Learner.calibrate` and `TemperatureScaling` against computations of their own: the temperature found here by a
golden-section search over log T of the held-out NLL (`F.cross_entropy`), the probabilities as the softmax of the raw
logits divided by it. Image, text and tabular learners, the single-label losses fastai has, with and without CS-KD;
`predict`, `tta`, `export`/`load_learner`, `save`/`load`, training after calibrating, the refusals, and `compare`'s
'+ts' rows."""
import math, warnings
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from fastai.vision.all import *
from fastai.text.all import text_classifier_learner, AWD_LSTM
from fastai.tabular.all import tabular_learner, TabularDataLoaders, RegressionBlock
from cskd_fastai.all import *
from conftest import digits_block, cnn_learner, tiny_cnn
from compat_cases import Data, text_dls, tabular_dls, SMALL_AWD


def best_T(z, y):
    "The T in [0.01, 100] minimising the NLL of softmax(z/T), by golden-section search over log T (float64)"
    z, y = torch.Tensor.as_subclass(z, torch.Tensor).double(), torch.Tensor.as_subclass(y, torch.Tensor).flatten().long()
    f = lambda lt: F.cross_entropy(z/math.exp(lt), y).item()
    a, b, g = math.log(1e-2), math.log(1e2), (math.sqrt(5) - 1)/2
    for _ in range(100):
        c, d = b - g*(b - a), a + g*(b - a)
        if f(c) < f(d): b = d
        else: a = c
    return math.exp((a + b)/2)

def raw_logits(learn, dl=None):
    "Logits and labels of `dl` (default the validation set) with any temperature switched off"
    cb = getattr(learn, 'temperature_scaling', None)
    if cb is not None: cb_T, cb.T = cb.T, None
    try:
        with learn.no_bar(): z, y = learn.get_preds(dl=dl, act=noop)
    finally:
        if cb is not None: cb.T = cb_T
    z = torch.Tensor.as_subclass(z, torch.Tensor).float()
    return z, None if y is None else torch.Tensor.as_subclass(y, torch.Tensor).flatten().long()

def fitted(learn, n=1, lr=1e-2):
    with learn.no_bar(), learn.no_logging(): learn.fit(n, lr)
    return learn

def calibrated(learn, dl=None):
    with learn.no_bar(): return learn.calibrate(dl)

def preds(learn, dl=None):
    with learn.no_bar(): return torch.Tensor.as_subclass(learn.get_preds(dl=dl)[0], torch.Tensor).float()

def check_calibrated(learn, cal_dl=None, eval_dl=None):
    "Calibrate on `cal_dl`; T is the NLL minimum found here, and `get_preds` on `eval_dl` is softmax(raw/T)"
    z_cal, y_cal = raw_logits(learn, cal_dl)
    z, _ = raw_logits(learn, eval_dl)
    fit = calibrated(learn, cal_dl)
    T = best_T(z_cal, y_cal)
    assert fit.T == pytest.approx(T, rel=1e-4)
    assert fit.nll_before == pytest.approx(F.cross_entropy(z_cal.double(), y_cal).item(), rel=1e-6)
    assert fit.nll_after == pytest.approx(F.cross_entropy(z_cal.double()/fit.T, y_cal).item(), rel=1e-6)
    assert fit.nll_after <= fit.nll_before and fit.n == len(y_cal)
    torch.testing.assert_close(preds(learn, eval_dl), F.softmax(z/fit.T, 1), atol=2e-6, rtol=1e-4)
    return fit, z


@pytest.fixture(scope='module')
def data(tmp_path_factory): return Data(tmp_path_factory.mktemp('calibrate'))

@pytest.fixture
def image_learner(small_dls):
    set_seed(0, reproducible=True)
    return fitted(cnn_learner(small_dls))


# ------------------------------------------------------------------------------------------------
# what a calibrated learner predicts

def test_get_preds_predict_and_items_match_own_search(image_learner, digits_path):
    learn = image_learner
    items = learn.dls.valid_ds.items[:120]                    # calibrate on labelled items; evaluate on the others
    cal_dl = learn.dls.test_dl(items, with_labels=True)
    z_cal, y_cal = raw_logits(learn, cal_dl)
    z, y = raw_logits(learn)
    fit = calibrated(learn, items)
    assert fit.T == pytest.approx(best_T(z_cal, y_cal), rel=1e-4)
    p = preds(learn)
    torch.testing.assert_close(p, F.softmax(z/fit.T, 1), atol=2e-6, rtol=1e-4)
    assert torch.equal(p.argmax(1), z.argmax(1))               # the classes do not change
    with learn.no_bar():
        for i in (0, 150, 300):
            _, cls, probs = learn.predict(learn.dls.valid_ds.items[i])
            torch.testing.assert_close(probs.float(), F.softmax(z[i]/fit.T, 0), atol=2e-6, rtol=1e-4)
            assert int(cls) == int(z[i].argmax())
        loss = learn.validate()[0]
    assert loss == pytest.approx(F.cross_entropy(z/fit.T, y).item(), rel=1e-5)   # the validation loss is the calibrated NLL
    interp = CalibrationInterpretation.from_learner(learn, name='cnn')
    assert interp.name == 'cnn + TS' and interp.temperature == fit.T
    torch.testing.assert_close(interp.probs, F.softmax(z.double()/fit.T, 1), atol=2e-6, rtol=1e-4)


def test_second_calibrate_refits_from_raw_logits(image_learner):
    learn = image_learner
    first = calibrated(learn)
    second = calibrated(learn)
    assert second.T == pytest.approx(first.T, rel=1e-9) and second.nll_before == pytest.approx(first.nll_before, rel=1e-9)
    assert len([c for c in learn.cbs if isinstance(c, TemperatureScaling)]) == 1
    assert learn.model.state_dict()._metadata[''].get('cskd_fastai.temperature') == first.T   # where `save` finds T
    learn.uncalibrate()
    assert not any(isinstance(c, TemperatureScaling) for c in learn.cbs)
    assert 'cskd_fastai.temperature' not in learn.model.state_dict()._metadata['']   # the model's hooks went with it
    z, _ = raw_logits(learn)
    torch.testing.assert_close(preds(learn), F.softmax(z, 1))
    assert calibrated(learn).T == pytest.approx(first.T, rel=1e-9)


class TemperedCE(CrossEntropyLossFlat):
    "Cross-entropy whose activation is softmax(x/T): what a calibrated learner's predictions are, without the callback"
    def __init__(self, T, **kwargs): super().__init__(**kwargs); self.T = T
    def activation(self, x): return F.softmax(x/self.T, dim=-1)


def test_tta_is_the_tempered_softmax_under_augmentation(digits_path):
    set_seed(0, reproducible=True)
    dls = digits_block(320, batch_tfms=[Flip(p=0.5), Rotate(max_deg=20, p=0.5)]).dataloaders(digits_path, bs=32, num_workers=0)
    learn = fitted(cnn_learner(dls))
    fit = calibrated(learn)
    dl = learn.dls.valid.new(shuffle=False, drop_last=False)
    set_seed(1)
    with learn.no_bar(): got, y = learn.tta(dl=dl, n=3)
    learn.uncalibrate()
    learn.loss_func = TemperedCE(fit.T)                      # the same augmentations, the temperature in the activation
    set_seed(1)
    with learn.no_bar(): want, y2 = learn.tta(dl=dl, n=3)
    assert torch.equal(y, y2)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-4)
    z, _ = raw_logits(learn, dl)
    assert not torch.allclose(want, F.softmax(z/fit.T, 1), atol=1e-3)   # the augmentations did change the predictions


# ------------------------------------------------------------------------------------------------
# losses, CS-KD, text, tabular

@pytest.mark.parametrize('loss_func', [CrossEntropyLossFlat(), LabelSmoothingCrossEntropyFlat(eps=0.1), FocalLossFlat(gamma=2.),
                                       nn.CrossEntropyLoss()], ids=['ce', 'label-smoothing', 'focal', 'torch-ce'])
def test_single_label_losses(small_dls, loss_func):
    set_seed(0, reproducible=True)
    learn = fitted(cnn_learner(small_dls, loss_func=loss_func))
    z, y = raw_logits(learn)
    fit = calibrated(learn)
    assert fit.T == pytest.approx(best_T(z, y), rel=1e-4)
    with learn.no_bar(): p, _ = learn.get_preds()
    p = torch.Tensor.as_subclass(p, torch.Tensor).float()
    want = z/fit.T if isinstance(loss_func, nn.CrossEntropyLoss) else F.softmax(z/fit.T, 1)   # a loss without activation: logits
    torch.testing.assert_close(p, want, atol=2e-6, rtol=1e-4)
    with learn.no_bar(): loss = learn.validate()[0]
    assert loss == pytest.approx(loss_func(TensorBase(z/fit.T), TensorCategory(y)).item(), rel=1e-5)


def test_with_cskd(small_dls):
    set_seed(0, reproducible=True)
    learn = fitted(cnn_learner(small_dls, cbs=CSKD()))
    assert learn.recorder.values[-1][-1] > 0                   # the KD term was there
    check_calibrated(learn)
    with pytest.warns(UserWarning, match='Training changes the weights'): fitted(learn)
    assert learn.temperature_scaling.T is None and learn.recorder.values[-1][-1] > 0


def test_text_classifier(data):
    set_seed(0, reproducible=True)
    learn = fitted(text_classifier_learner(text_dls(data, 'from_df'), AWD_LSTM, pretrained=False, config=SMALL_AWD), 2)
    assert any(type(c).__name__ == 'RNNCallback' for c in learn.cbs)   # the model's outputs are a tuple
    fit, z = check_calibrated(learn)
    with learn.no_bar(): _, _, probs = learn.predict(data.text_df.text[13])
    z1, _ = raw_logits(learn, learn.dls.test_dl([data.text_df.text[13]]))
    torch.testing.assert_close(probs.float(), F.softmax(z1[0]/fit.T, 0), atol=2e-6, rtol=1e-4)


def test_tabular_with_dataframe_items(data):
    set_seed(0, reproducible=True)
    dls = tabular_dls(data)
    learn = fitted(tabular_learner(dls, layers=[16]), 2)
    df = data.wine
    held_out = df.iloc[1::4]                                   # not in the validation rows (0, 4, 8...) and labelled
    fit, z = check_calibrated(learn, dls.test_dl(held_out), None)
    again = calibrated(learn, held_out)                        # the rows themselves, as `test_dl` takes them
    assert again.T == pytest.approx(fit.T, rel=1e-9)
    with learn.no_bar(): _, _, probs = learn.predict(df.iloc[0])
    torch.testing.assert_close(probs.float(), F.softmax(z[0]/fit.T, 0), atol=2e-6, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# training, saving, exporting

def _weights(learn): return {k: v.clone() for k, v in learn.model.state_dict().items()}

def test_training_after_calibrate_is_training_without_it(digits_path):
    def run(calibrate):
        set_seed(0, reproducible=True)
        learn = cnn_learner(digits_block(320).dataloaders(digits_path, bs=32, num_workers=0))
        fitted(learn)
        if calibrate: calibrated(learn)
        else: raw_logits(learn)                                # the same pass over the validation set, no temperature
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter('always')
            fitted(learn)
        return learn, [str(o.message) for o in w if 'temperature' in str(o.message)]
    a, wa = run(True)
    b, wb = run(False)
    assert len(wa) == 1 and 'dropped' in wa[0] and not wb
    assert a.temperature_scaling.T is None
    wa_, wb_ = _weights(a), _weights(b)
    assert all(torch.equal(wa_[k], wb_[k]) for k in wa_), 'the weights differ'
    assert a.recorder.values[-1] == b.recorder.values[-1]      # the fit's validation is the uncalibrated model's
    torch.testing.assert_close(preds(a), preds(b))


def test_lr_find_keeps_the_temperature(image_learner):
    learn = image_learner
    fit = calibrated(learn)
    before = _weights(learn)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        with learn.no_bar(), learn.no_logging(): learn.lr_find(num_it=8, show_plot=False)
    assert not [o for o in w if 'temperature' in str(o.message)]
    assert learn.temperature_scaling.T == fit.T
    assert all(torch.equal(v, before[k]) for k, v in _weights(learn).items())


def test_export_and_load_learner(image_learner, tmp_path):
    learn = image_learner
    learn.path = tmp_path
    fit = calibrated(learn)
    p = preds(learn)
    learn.export('cal.pkl')
    assert learn.temperature_scaling.T == fit.T                # export leaves the learner as it was
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        back = load_learner(tmp_path/'cal.pkl')
    assert back.temperature_scaling.T == fit.T
    items = learn.dls.valid_ds.items
    torch.testing.assert_close(preds(back, back.dls.test_dl(items, with_labels=True)), p)
    with back.no_bar(): _, _, probs = back.predict(items[7])
    torch.testing.assert_close(probs.float(), p[7], atol=1e-6, rtol=1e-5)
    back.save('again')                                         # the loaded learner's hooks still carry T
    fresh = Learner(learn.dls, tiny_cnn(), path=tmp_path, cbs=TemperatureScaling()).load('again')
    assert fresh.temperature_scaling.T == fit.T


def test_save_and_load(image_learner, tmp_path):
    learn = image_learner
    learn.path = tmp_path
    z, _ = raw_logits(learn)
    fit = calibrated(learn)
    learn.save('cal')
    state = torch.load(tmp_path/'models'/'cal.pth', weights_only=False)
    assert set(state['model']) == set(learn.model.state_dict())  # T is no key: no unexpected key for a plain model
    fresh = Learner(learn.dls, tiny_cnn(), path=tmp_path, cbs=TemperatureScaling()).load('cal')
    assert fresh.temperature_scaling.T == fit.T
    torch.testing.assert_close(preds(fresh), F.softmax(z/fit.T, 1), atol=2e-6, rtol=1e-4)
    plain = Learner(learn.dls, tiny_cnn(), path=tmp_path).load('cal')        # strict loading, weights only
    assert not any(isinstance(c, TemperatureScaling) for c in plain.cbs)
    torch.testing.assert_close(raw_logits(plain)[0], z)
    learn.load('cal')                                          # the same learner: T stays
    assert learn.temperature_scaling.T == fit.T
    plain.save('raw')
    with pytest.warns(UserWarning, match='carry no temperature'): learn.load('raw')
    assert learn.temperature_scaling.T is None
    torch.testing.assert_close(preds(learn), F.softmax(z, 1))


def test_calibrated_model_pickles_and_copies_without_its_learner(digits_path, tmp_path):
    "The model's hooks hold the callback weakly: a calibrated model pickles and copies on its own (data with a lambda)"
    import copy, pickle, gc, weakref
    dls = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, get_y=lambda f: f.parent.name,
                    splitter=GrandparentSplitter(valid_name='valid'), item_tfms=Resize(16)).dataloaders(digits_path, bs=64, num_workers=0)
    learn = fitted(cnn_learner(dls, path=tmp_path))
    plain_size = len(pickle.dumps(learn.model))
    fit = calibrated(learn)
    assert len(pickle.dumps(learn.model)) < plain_size + 2_000          # not the learner, not its data
    twin = copy.deepcopy(learn.model)
    assert not any(isinstance(o, (Learner, TemperatureScaling)) for o in gc.get_referents(*gc.get_referents(twin)))
    twin.state_dict(); twin.load_state_dict(learn.model.state_dict())    # its hooks are inert
    assert learn.temperature_scaling.T == fit.T
    cb = weakref.ref(learn.temperature_scaling)
    m = learn.model; learn.uncalibrate(); del learn; gc.collect()
    assert cb() is None                                                  # the model kept no callback alive
    m.state_dict()


def test_a_replaced_model_is_hooked_by_calibrate(image_learner, tmp_path):
    learn = image_learner
    learn.path = tmp_path
    calibrated(learn)
    new = tiny_cnn(); new.load_state_dict(learn.model.state_dict())
    learn.model = new                                                    # replaced outside any fit (get_preds's before_fit hooks it)
    fit = calibrated(learn)
    learn.save('new')
    fresh = Learner(learn.dls, tiny_cnn(), path=tmp_path, cbs=TemperatureScaling()).load('new')
    assert fresh.temperature_scaling.T == fit.T


def test_numbers_numpy_and_bad_values(image_learner):
    learn = image_learner
    assert TemperatureScaling(T=np.float32(2.)).T == 2. and TemperatureScaling(T=torch.tensor(1.5)).T == 1.5
    for bad in (0, -1., float('nan'), 'x', True):
        with pytest.raises(ValueError, match='`T`'): TemperatureScaling(T=bad)
    fit = calibrated(learn, np.int64(1))
    assert fit.T == calibrated(learn, 1).T
    with pytest.raises(ValueError, match='`T`'): learn.temperature_scaling.T = -2.
    assert learn.temperature_scaling.T == fit.T
    with pytest.raises(ValueError, match='index into `dls`'): learn.calibrate(5)
    with pytest.raises(ValueError, match='`max_iter`'): learn.calibrate(max_iter=0)


# ------------------------------------------------------------------------------------------------
# refusals and edge cases

def _image_learner_of(digits_path, blocks, get_y, **kw):
    dls = DataBlock(blocks=(ImageBlock, blocks), get_items=get_image_files, get_y=get_y,
                    splitter=GrandparentSplitter(valid_name='valid'), item_tfms=Resize(16)).dataloaders(digits_path, bs=32, num_workers=0)
    n_out = len(dls.vocab) if blocks is not RegressionBlock else 1
    return Learner(dls, tiny_cnn(n_out), **kw)

def _label_list(f): return [parent_label(f)]
def _label_float(f): return float(parent_label(f))

@pytest.mark.parametrize('what, blocks, get_y, msg', [
    ('multi-label', MultiCategoryBlock, _label_list, 'multi-label'),
    ('regression', RegressionBlock, _label_float, 'regression loss')])
def test_refused_before_any_pass(digits_path, what, blocks, get_y, msg):
    learn = _image_learner_of(digits_path, blocks, get_y)
    assert isinstance(learn.loss_func.func, nn.BCEWithLogitsLoss if what == 'multi-label' else nn.MSELoss)   # the block's loss
    model_calls = []
    learn.model.register_forward_pre_hook(lambda m, i: model_calls.append(1))
    with pytest.raises(ValueError, match=msg): learn.calibrate()
    assert not model_calls and not any(isinstance(c, TemperatureScaling) for c in learn.cbs)


def test_refused_tabular_regression(data):
    df = data.wine
    dls = TabularDataLoaders.from_df(df, y_names='target', y_block=RegressionBlock(), cont_names=[c for c in df.columns if c != 'target'],
                                     valid_idx=list(range(0, len(df), 4)), bs=32, num_workers=0)
    with pytest.raises(ValueError, match='regression'): tabular_learner(dls, layers=[8]).calibrate()


def test_refusal_keeps_the_temperature(image_learner):
    learn = image_learner
    fit = calibrated(learn)
    unlabelled = learn.dls.test_dl(learn.dls.valid_ds.items[:10])
    with pytest.raises(ValueError, match='no labels'): calibrated(learn, unlabelled)
    assert learn.temperature_scaling.T == fit.T


def test_callback_runs_after_the_callbacks_that_set_pred():
    from fastai.callback.rnn import RNNCallback
    from fastai.callback.fp16 import MixedPrecision, NonNativeMixedPrecision
    assert TemperatureScaling.order > max(RNNCallback.order, MixedPrecision.order, NonNativeMixedPrecision.order)
    assert TemperatureScaling.run_train is False


# ------------------------------------------------------------------------------------------------
# compare's '+ts' rows and a calibrated learner: one temperature

def _part(res, k): return res.attrs[k] if isinstance(res, pd.DataFrame) else getattr(res, k)

def test_compare_ts_rows_are_a_calibrated_learners_predictions():
    from cskd_fastai.compare import compare
    res = compare(methods=('ce', 'ce+ts'), epochs=1, seeds=(0,), n_per_class=10, verbose=False)
    learn, calib = _part(res, 'learners')['ce'], _part(res, 'items')['calib']
    fit = calibrated(learn, [Path(f) for f in calib])
    table = res if isinstance(res, pd.DataFrame) else res.table
    assert fit.T == pytest.approx(table.loc['ce+ts', 'temperature'], rel=1e-5)
    pr = _part(res, 'preds')
    np.testing.assert_allclose(preds(learn).numpy(), pr['ce+ts/0/probs'], atol=1e-5)
    assert np.array_equal(raw_logits(learn)[1].numpy(), pr['ce+ts/0/targs'])


# ------------------------------------------------------------------------------------------------
# on a GPU (skipped without CUDA): `MixedPrecision` casts the half-precision logits to float32 in
# `after_pred`, before the temperature divides them

@pytest.mark.gpu
@pytest.mark.parametrize('mode', ['fp16', 'bf16'])
def test_under_mixed_precision(small_dls, mode):
    small_dls.to(torch.device('cuda'))
    set_seed(0, reproducible=True)
    learn = fitted(cnn_learner(small_dls).to_fp16(amp_mode=mode))
    fit, z = check_calibrated(learn)
    with learn.no_bar(): p, _ = learn.get_preds()
    assert p.dtype == torch.float32 and learn.temperature_scaling.T == fit.T
