"End-to-end behaviour of `CSKD` inside fastai: the loss, the pairing, what it leaves alone, and what it composes with"
import pickle, zipfile
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from fastai.vision.all import *
from fastai.tabular.all import *
from fastai.callback.training import GradientAccumulation
from torch.utils.data import TensorDataset
from cskd_fastai.all import *
from contextlib import nullcontext
from fastai.text.all import AWD_LSTM, SequentialRNN, TextLearner, get_text_classifier, awd_lstm_clas_config
import cskd_fastai.partners
from conftest import digits_block, CountForwards, cnn_learner, fit_ok as _fit_ok
from reference import tiny_cnn, FormulaCheck


class RecordPairs(Callback):
    "Before `CSKD` splits it: check each partner half carries its anchor's labels; record the anchors"
    order, run_valid = CSKD.order - 1, False
    def before_fit(self): self.anchor_ys, self.n_batches = [], 0
    def before_batch(self):
        y = self.yb[0]; n = len(y)//2
        assert len(y) % 2 == 0
        assert torch.equal(y[:n], y[n:]), "a partner is not of its anchor's class"
        self.anchor_ys.append(y[:n].clone()); self.n_batches += 1


# --- the loss and the pairing -------------------------------------------------------------------------

def test_loss_is_formula_and_partners_match(small_dls):
    learn = cnn_learner(small_dls, cbs=[CSKD(lam=0.5, T=2.), RecordPairs(), FormulaCheck()])
    learn.fit(1, 1e-3)
    n_batches = len(small_dls.train)
    assert learn.record_pairs.n_batches == n_batches
    assert learn.formula_check.checked == n_batches
    # anchors are the plain loader's items, each once
    assert sum(len(y) for y in learn.record_pairs.anchor_ys) == n_batches*small_dls.train.bs


def test_partners_come_from_whole_class(small_dls):
    pdl = PairedDL(small_dls.train)
    labels = pdl.index.labels
    seen = set()
    for _ in range(5):
        pdl.randomize()
        a, p = map(np.array, zip(*pdl.get_idxs()))
        np.testing.assert_array_equal(labels[a], labels[p])
        seen |= set(p.tolist())
    assert len(seen) > 0.9*len(labels)


def test_model_sees_anchors_only_and_validation_untouched(small_dls):
    counter = CountForwards()
    learn = cnn_learner(small_dls, cbs=[CSKD(), counter])
    learn.fit(1)
    nb, bs = len(small_dls.train), small_dls.train.bs
    assert counter.calls['train'] == 2*nb               # anchor forward + partner forward
    assert counter.rows['train'] == 2*nb*bs             # each of bs rows, not 2*bs
    assert counter.calls['valid'] == len(small_dls.valid)
    assert counter.rows['valid'] == len(small_dls.valid_ds)
    # after the fit: one forward per batch, every item once
    for ds_idx, n in [(0, len(small_dls.train_ds)), (1, len(small_dls.valid_ds))]:
        counter.before_fit()
        preds, targs = learn.get_preds(ds_idx=ds_idx)
        assert len(preds) == len(targs) == n
        assert counter.rows['valid'] == n
    counter.before_fit()
    res = learn.validate()
    assert len(res) == 2 and counter.rows['valid'] == len(small_dls.valid_ds)
    interp = ClassificationInterpretation.from_learner(learn)
    assert interp.confusion_matrix().sum() == len(small_dls.valid_ds)
    _, _, probs = learn.predict(small_dls.valid_ds.items[0])
    assert probs.shape == (10,)
    learn.show_results(max_n=4)


def test_lr_find_sees_the_cskd_objective(small_dls):
    "lr_find trains, so it runs CS-KD: the learning rate it suggests is for cross-entropy plus the KD term"
    counter = CountForwards()
    learn = cnn_learner(small_dls, cbs=[CSKD(), counter])
    learn.lr_find(num_it=8, show_plot=False)
    assert counter.calls['train'] == 16 and counter.rows['train'] == 16*small_dls.train.bs   # anchors + partners
    assert len(learn.metrics) == 1


def test_kd_loss_column(small_dls):
    learn = cnn_learner(small_dls, cbs=CSKD())
    learn.fit(2)
    names = learn.recorder.metric_names
    assert names == ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'kd_loss', 'time']
    kd = [v[3] for v in learn.recorder.values]
    assert all(np.isfinite(kd)) and all(k > 0 for k in kd)
    assert len(learn.metrics) == 1


def test_lam_zero_records_zero_and_skips_partner_forward(small_dls):
    counter = CountForwards()
    learn = cnn_learner(small_dls, cbs=[CSKD(lam=0), counter])
    learn.fit(1)
    assert counter.calls['train'] == len(small_dls.train)
    assert learn.recorder.values[-1][3] == 0


def test_eval_partner_mode_restores_modes_and_keeps_bn_stats(small_dls):
    learn = cnn_learner(small_dls, cbs=CSKD(partner=PartnerForward(train=False)))
    learn.model[0].eval()                         # a user-frozen BatchNorm block must stay in eval mode
    bn = learn.model[1][1]
    seen = []
    class Spy(Callback):
        order, run_valid = CSKD.order+1, False
        def after_loss(self): seen.append((self.model.training, self.model[0].training, bn.num_batches_tracked.item()))
    learn.add_cb(Spy())
    TrainEvalCallback_before_train = learn.train_eval.before_train
    def keep_frozen():
        TrainEvalCallback_before_train(); learn.model[0].eval()
    learn.train_eval.before_train = keep_frozen
    learn.fit(1)
    # the partner forward ran in eval mode: BatchNorm counted anchors only (one update per batch)
    assert [s[2] for s in seen] == list(range(1, len(seen)+1))
    assert all(s[0] and not s[1] for s in seen)


# --- bad input ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kw, name', [(dict(T=0), 'T'), (dict(T=-2), 'T'), (dict(T=float('nan')), 'T'),
                                      (dict(lam=-1), 'lam'), (dict(lam=float('inf')), 'lam'), (dict(lam=None), 'lam'),
                                      (dict(T=True), 'T'),
                                      (dict(lam=lambda p: 1/(p-0.5)**2), r'lam\(0\.5\)'), (dict(lam=lambda: 1), 'lam')])
def test_bad_hyperparameters(kw, name):
    with pytest.raises(ValueError, match=f'`{name}'): CSKD(**kw)


def _regression_dls(path):
    return DataBlock(blocks=(ImageBlock, RegressionBlock), get_items=get_image_files,
                     get_y=lambda o: float(o.parent.name), splitter=GrandparentSplitter(valid_name='valid'),
                     item_tfms=Resize(16)).dataloaders(path, bs=16, num_workers=0)

def _multilabel_dls(path):
    return DataBlock(blocks=(ImageBlock, MultiCategoryBlock), get_items=get_image_files,
                     get_y=lambda o: [o.parent.name, 'odd' if int(o.parent.name) % 2 else 'even'],
                     splitter=GrandparentSplitter(valid_name='valid'), item_tfms=Resize(16)).dataloaders(path, bs=16, num_workers=0)

def _unlabelled_dls(path):
    return DataBlock(blocks=(ImageBlock,), get_items=get_image_files, splitter=GrandparentSplitter(valid_name='valid'),
                     item_tfms=Resize(16)).dataloaders(path, bs=16, num_workers=0)

@pytest.mark.parametrize('make, n_out', [(_regression_dls, 1), (_multilabel_dls, 12), (_unlabelled_dls, 10)])
def test_unusable_targets_fail_at_fit_start(digits_path, make, n_out):
    dls = make(digits_path)
    learn = Learner(dls, tiny_cnn(n_out), loss_func=MSELossFlat(), cbs=CSKD())
    train_dl, metrics = learn.dls.train, list(learn.metrics)
    w = learn.model[-1].weight.detach().clone()
    with pytest.raises(ValueError, match='single-label class targets'): learn.fit(1)
    assert learn.dls.train is train_dl and list(learn.metrics) == metrics
    assert torch.equal(w, learn.model[-1].weight)
    assert '_do_epoch' not in learn.__dict__


def test_model_must_return_logits(small_dls):
    class TwoHeads(nn.Module):
        def __init__(self): super().__init__(); self.m = tiny_cnn()
        def forward(self, x): return self.m(x)[:, :, None]       # (n, K, 1): not (n, K)
    learn = Learner(small_dls, TwoHeads(), loss_func=lambda p, y: F.cross_entropy(p[..., 0], y), cbs=CSKD())
    with pytest.raises(ValueError, match=r'logits as a \(batch, classes\) tensor'): learn.fit(1)
    assert len(learn.metrics) == 0 and '_do_epoch' not in learn.__dict__


# --- interruption -----------------------------------------------------------------------------------------

class Interrupt(Callback):
    order, run_valid = CSKD.order + 1, False
    def __init__(self, exc, at=3, event='after_loss'): self.exc, self.at, self.event, self.i = exc, at, event, 0
    def after_loss(self):
        self.i += 1
        if self.i == self.at: raise self.exc


@pytest.mark.parametrize('exc', [KeyboardInterrupt(), RuntimeError('boom'), CancelFitException()])
def test_interrupted_fit_leaves_learner_as_it_was(small_dls, exc):
    learn = cnn_learner(small_dls, cbs=[CSKD(partner=PartnerForward(train=False)), Interrupt(exc)])
    train_dl, valid_dl, metrics, loss_func = learn.dls.train, learn.dls.valid, list(learn.metrics), learn.loss_func
    dl_state = dict(train_dl.__dict__)
    if isinstance(exc, CancelFitException): learn.fit(1)
    else:
        with pytest.raises(type(exc)): learn.fit(1)
    assert learn.dls.train is train_dl and learn.dls.valid is valid_dl
    assert {k: v for k, v in train_dl.__dict__.items() if k != 'rng'} == {k: v for k, v in dl_state.items() if k != 'rng'}
    assert list(learn.metrics) == metrics and learn.loss_func is loss_func
    assert '_do_epoch' not in learn.__dict__
    assert all(m.training == learn.model.training for m in learn.model.modules())
    # and the learner still works, with CS-KD
    learn.remove_cb(Interrupt)
    learn.add_cb(FormulaCheck())
    learn.fit(1)
    assert learn.recorder.metric_names.count('kd_loss') == 1 and len(learn.metrics) == 1
    assert learn.formula_check.checked == len(small_dls.train)


def test_exception_in_partner_forward_restores_module_modes(small_dls):
    class FailSecond(nn.Module):
        def __init__(self): super().__init__(); self.m, self.n = tiny_cnn(), 0
        def forward(self, x):
            self.n += 1
            if self.n == 2: raise KeyboardInterrupt
            return self.m(x)
    learn = Learner(small_dls, FailSecond(), cbs=CSKD(partner=PartnerForward(train=False)))
    with pytest.raises(KeyboardInterrupt): learn.fit(1)
    assert all(m.training for m in learn.model.modules())
    assert len(learn.metrics) == 0 and '_do_epoch' not in learn.__dict__


def test_validate_inside_fit(small_dls):
    class ValidateEachEpoch(Callback):
        order = Recorder.order + 5
        def before_fit(self):
            if not hasattr(self, 'res'): self.res = []
        def after_epoch(self):
            if self.learn.lock.locked(): return     # this is the inner validate's own `after_epoch`
            self.res.append(self.learn.validate())
    learn = cnn_learner(small_dls, cbs=[CSKD(), ValidateEachEpoch()])
    learn.fit(2)
    assert len(learn.validate_each_epoch.res) == 2
    assert len(learn.metrics) == 1 and '_do_epoch' not in learn.__dict__


# --- composition ------------------------------------------------------------------------------------------

def test_timm_backbone_by_name(small_dls):
    _fit_ok(vision_learner(small_dls, 'resnet10t', pretrained=False, metrics=accuracy, cbs=CSKD()))


def test_fine_tune_and_one_cycle(small_dls):
    learn = vision_learner(small_dls, 'resnet10t', pretrained=False, metrics=accuracy, cbs=CSKD())
    _fit_ok(learn, 1, 'fine_tune', freeze_epochs=1)
    _fit_ok(cnn_learner(small_dls, cbs=CSKD()), 1, 'fit_one_cycle')


@pytest.mark.parametrize('extra', ['mixup', 'cutmix', 'label_smoothing', 'grad_acc', 'channels_last', 'fp16'])
def test_composes_with(small_dls, extra):
    cbs, kw = [CSKD(), FormulaCheck()], {}
    if extra == 'mixup': cbs.append(MixUp())
    if extra == 'cutmix': cbs.append(CutMix())
    if extra == 'label_smoothing': kw['loss_func'] = LabelSmoothingCrossEntropyFlat()
    if extra == 'grad_acc': cbs.append(GradientAccumulation(n_acc=64))
    if extra == 'channels_last': cbs.append(ChannelsLast())
    if extra in ('mixup', 'cutmix', 'grad_acc'): cbs.remove(cbs[1])   # they change the loss after CSKD's check point
    learn = cnn_learner(small_dls, cbs=cbs, **kw)
    if extra == 'fp16': learn = learn.to_fp16()
    _fit_ok(learn)


def test_mixup_mixes_anchors_only(small_dls):
    "MixUp runs after the split: it mixes anchors with anchors, and the KD target is the un-mixed partner"
    seen = {}
    class Spy(Callback):
        order, run_valid = MixUp.order + 1, False
        def before_batch(self):
            seen['x'] = self.x.shape[0]; seen['partner'] = self.learn.cskd.source.logits.shape[0]   # partner logits, one per anchor
            seen['yb1'] = self.learn.mix_up.yb1[0].shape[0]
    learn = cnn_learner(small_dls, cbs=[CSKD(), MixUp(), Spy()])
    learn.fit(1)
    bs = small_dls.train.bs
    assert seen == {'x': bs, 'partner': bs, 'yb1': bs}


def test_gradient_accumulation_scales_kd_term(small_dls):
    grads = []
    class Grab(Callback):
        run_valid = False
        def before_backward(self): grads.append((self.loss_grad.item(), self.loss.item()))
    learn = cnn_learner(small_dls, cbs=[CSKD(lam=2.), GradientAccumulation(n_acc=64), Grab()])
    learn.fit(1)
    bs = small_dls.train.bs
    for g, l in grads: assert g == pytest.approx(l*bs/64, rel=1e-5)   # the whole loss, KD included, was rescaled


def test_tabular_learner(tmp_path):
    rng = np.random.default_rng(0)
    n = 600
    df = pd.DataFrame({'a': rng.normal(size=n), 'b': rng.normal(size=n), 'col': rng.choice(['x', 'y', 'z'], n)})
    df['y'] = np.where(df.a + (df.col == 'x') > 0.5, 'hi', np.where(df.b > 0, 'mid', 'lo'))
    dls = TabularDataLoaders.from_df(df, path=tmp_path, procs=[Categorify, Normalize], cat_names=['col'],
                                     cont_names=['a', 'b'], y_names='y', bs=64, valid_idx=list(range(500, 600)))
    learn = tabular_learner(dls, layers=[32], metrics=accuracy, cbs=[CSKD(), RecordPairs(), FormulaCheck()])
    _fit_ok(learn, 2)
    assert learn.record_pairs.n_batches == 2*len(dls.train)


def test_plain_learner_custom_model_tensor_dataset():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 6, generator=g); y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    dls = DataLoaders.from_dsets(TensorDataset(x[:400], y[:400]), TensorDataset(x[400:], y[400:]), bs=32, device='cpu')
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), metrics=accuracy, cbs=[CSKD(), RecordPairs(), FormulaCheck()])
    _fit_ok(learn, 2, lr=1e-2)


# --- state, export, reproducibility -------------------------------------------------------------------------

def test_export_load_learner_carries_no_pairing_state(small_dls, tmp_path):
    learn = cnn_learner(small_dls, cbs=CSKD(lam=0.3, T=2.))
    learn.path = tmp_path
    learn.fit(1)
    learn.export('cskd.pkl')
    with zipfile.ZipFile(tmp_path/'cskd.pkl') as z:
        data = b''.join(z.read(n) for n in z.namelist() if n.endswith('.pkl'))
    assert b'ClassIndex' not in data and b'PairedDL' not in data
    learn2 = load_learner(tmp_path/'cskd.pkl')
    cb = learn2.cskd
    assert (cb.lam, cb.T, cb.source.xb) == (0.3, 2., None)
    _, _, probs = learn2.predict(small_dls.valid_ds.items[0])
    assert probs.shape == (10,)


def test_export_with_paired_dataloaders(digits_path, tmp_path):
    dls = digits_block(320).paired_dataloaders(digits_path, bs=32, num_workers=0)
    learn = cnn_learner(dls, cbs=CSKD())
    learn.path = tmp_path
    learn.fit(1)
    assert learn.dls.train is dls.train                        # used as it is
    learn.export('p.pkl')
    with zipfile.ZipFile(tmp_path/'p.pkl') as z:
        data = b''.join(z.read(n) for n in z.namelist() if n.endswith('.pkl'))
    assert b'ClassIndex' not in data
    assert len(load_learner(tmp_path/'p.pkl').get_preds(dl=dls.valid)[0]) == len(dls.valid_ds)


def _seeded_run(path, seed):
    set_seed(seed, reproducible=True)
    dls = digits_block(320).dataloaders(path, bs=32, num_workers=0)
    learn = cnn_learner(dls, cbs=[CSKD(), RecordPairs()])
    learn.fit(1)
    return learn.recorder.losses, learn.record_pairs.anchor_ys, learn.recorder.values


def test_seeded_runs_reproduce(digits_path):
    l1, y1, v1 = _seeded_run(digits_path, 7)
    l2, y2, v2 = _seeded_run(digits_path, 7)
    l3, _, _ = _seeded_run(digits_path, 8)
    assert [float(o) for o in l1] == [float(o) for o in l2]
    assert all(torch.equal(a, b) for a, b in zip(y1, y2)) and v1 == v2
    assert [float(o) for o in l1] != [float(o) for o in l3]


def test_same_anchor_order_as_plain_fit(digits_path):
    "With the same seed, CS-KD sees the anchors in the same order as a plain fit"
    orders = []
    for cbs in ([], [CSKD()]):
        set_seed(3)
        dls = digits_block(320).dataloaders(digits_path, bs=32, num_workers=0)
        ys = []
        class Grab(Callback):
            order, run_valid = CSKD.order + 1, False
            def before_batch(self): ys.append(self.yb[0].clone())
        cnn_learner(dls, cbs=cbs + [Grab()]).fit(1)
        orders.append(torch.cat(ys))
    assert torch.equal(*orders)


def test_single_item_class_and_absent_class(digits_path):
    "A class with one training item pairs with itself; a class with none is fine"
    def get_items(p):
        fs = get_image_files(p)
        trn = [f for f in fs if f.parent.parent.name == 'train' and f.parent.name not in ('8', '9')][:300]
        one_eight = [f for f in fs if f.parent.parent.name == 'train' and f.parent.name == '8'][:1]
        return L(trn + one_eight) + L(f for f in fs if f.parent.parent.name == 'valid')
    dls = DataBlock(blocks=(ImageBlock, CategoryBlock(vocab=[str(i) for i in range(10)])), get_items=get_items,
                    get_y=parent_label, splitter=GrandparentSplitter(valid_name='valid'),
                    item_tfms=Resize(16)).dataloaders(digits_path, bs=32, num_workers=0)
    pdl = PairedDL(dls.train)
    assert len(pdl.index.members(9)) == 0 and len(pdl.index.members(8)) == 1
    eight = pdl.index.members(8)[0]
    assert (pdl.index.sample([eight]*20) == eight).all()
    _fit_ok(cnn_learner(dls, cbs=[CSKD(), RecordPairs()]))


def test_paired_partners_differ_with_the_seed_and_repeat_with_it(digits_path):
    def pairs(seed):
        set_seed(seed)
        dls = digits_block(320).dataloaders(digits_path, bs=32, num_workers=0)
        pdl = PairedDL(dls.train)
        return [pdl.get_idxs() for _ in range(2)]                   # two epochs
    a, b, c = pairs(5), pairs(5), pairs(6)
    assert a == b and a != c
    assert a[0] != a[1]                                             # a new draw each epoch


def test_partner_forward_runs_before_the_anchor_forward(small_dls):
    "The no-grad partner forward comes first in each step, so its activations never sit on top of the anchors' graph"
    calls = []
    learn = cnn_learner(small_dls, cbs=CSKD())
    h = learn.model.register_forward_pre_hook(lambda m, inp: calls.append((torch.is_grad_enabled(), learn.training)) if learn.training else None)
    try: learn.fit(1)
    finally: h.remove()
    train_calls = [g for g, t in calls if t]
    assert len(train_calls) == 2*len(small_dls.train)
    assert train_calls == [False, True]*len(small_dls.train)      # partners (no grad), then anchors (grad)


# --- models whose output is not a bare tensor -------------------------------------------------------------

class TupleNet(nn.Module):
    "tiny_cnn returning `(logits, features)`, or `(features, logits)` with `logits_last`"
    def __init__(self, n_out=10, logits_last=False):
        super().__init__()
        self.body, self.head, self.logits_last = nn.Sequential(*list(tiny_cnn(n_out).children())[:-1]), nn.Linear(16, n_out), logits_last
    def forward(self, x):
        h = self.body(x)
        return (h, self.head(h)) if self.logits_last else (self.head(h), h)

class KeepLogits(Callback):
    "The loss and metrics see the logits (at index `i` of the model's output)"
    def __init__(self, i=0): self.i = i
    def after_pred(self): self.learn.pred = self.pred[self.i]


def test_tuple_output_first_element_is_the_logits(small_dls):
    "fastai's convention: the first element of a tuple output is the logits; the loss is the formula at every step"
    learn = Learner(small_dls, TupleNet(), metrics=accuracy, cbs=[CSKD(lam=0.7, T=2.), KeepLogits(), FormulaCheck()])
    _fit_ok(learn)
    assert learn.formula_check.checked == len(small_dls.train)


def test_tuple_output_without_after_pred(small_dls):
    "No `after_pred` callback: the loss function takes the tuple, and CS-KD takes its first element on both sides"
    learn = Learner(small_dls, TupleNet(), loss_func=lambda out, y: F.cross_entropy(out[0], y), cbs=[CSKD(), FormulaCheck()])
    learn.fit(1)
    assert learn.formula_check.checked == len(small_dls.train) and learn.recorder.values[-1][-1] > 0


def test_get_logits_for_logits_elsewhere(small_dls):
    "`PartnerForward(get_logits=...)`: a `(features, logits)` model trains with the logits on both sides"
    get = lambda out: out[1]
    learn = Learner(small_dls, TupleNet(logits_last=True), metrics=accuracy,
                    cbs=[CSKD(partner=PartnerForward(get_logits=get)), KeepLogits(1), FormulaCheck(get_logits=get)])
    _fit_ok(learn)
    assert learn.formula_check.checked == len(small_dls.train)


def test_logits_elsewhere_without_get_logits_is_a_clear_error(small_dls):
    learn = Learner(small_dls, TupleNet(logits_last=True), cbs=[CSKD(), KeepLogits(1)])
    with pytest.raises(ValueError, match=r'partners. logits have shape \(32, 16\), the anchors. \(32, 10\).*get_logits'): learn.fit(1)
    class DictNet(TupleNet):
        def forward(self, x): return dict(zip(('logits', 'features'), super().forward(x)))
    learn = Learner(small_dls, DictNet(), cbs=[CSKD(), KeepLogits('logits')])
    with pytest.raises(ValueError, match='must be a tensor, got dict.*get_logits'): learn.fit(1)
    assert type(learn.dls.train) is TfmdDL and len(learn.metrics) == 0


def _token_dls(n=192, sl=12, vocab=20, bs=16, seed=0):
    "Token sequences (ids 2.. `vocab`-1, no padding) labelled by which third of the vocabulary their last token is in"
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, vocab, (n + 48, sl), generator=g)
    y = (x[:, -1] - 2)*3//(vocab - 2)
    return DataLoaders.from_dsets(TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:]), bs=bs, device='cpu')


def test_text_classifier_awd_lstm_loss_is_formula():
    "fastai's AWD-LSTM text classifier (output `(logits, raw_outputs, outputs)`, RNN regularizers) with the default partner"
    dls = _token_dls()
    config = dict(awd_lstm_clas_config, emb_sz=16, n_hid=32, n_layers=2)
    model = get_text_classifier(AWD_LSTM, 20, 3, seq_len=6, config=config)
    learn = TextLearner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=[CSKD(lam=0.5, T=2.), FormulaCheck()])
    _fit_ok(learn, 2)
    assert learn.formula_check.checked == 2*len(dls.train)


class LastStep(nn.Module):
    "Classify from the last time step of an RNN's output"
    def __init__(self, n_in, n_out): super().__init__(); self.lin = nn.Linear(n_in, n_out)
    def forward(self, out): return self.lin(out[:, -1])

class AnchorsAsWithoutPartners(Callback):
    """The anchors' output must be what the model gives them from the recurrent state the previous step left, as if no
    partner pass had run: after the anchors' forward, their output is recomputed from that state (kept before `CSKD`'s
    partner pass) with the random state the anchors' forward had (same dropout draws)"""
    order, run_valid = CSKD.order - 1, False
    def __init__(self): self.checked, self.moved = 0, 0
    def before_fit(self):
        self.rnn = self.learn.model[0]
        self.hook = self.learn.model.register_forward_pre_hook(self._pre)
    def after_fit(self): self.hook.remove()
    def _pre(self, m, inp):
        if self.training and torch.is_grad_enabled(): self.rng = torch.get_rng_state()    # the anchors' forward
    def before_batch(self):
        self.hidden, self.bs = [tuple(h.clone() for h in hc) for hc in self.rnn.hidden], self.rnn.bs
    def after_pred(self):
        live, live_bs, rng = self.rnn.hidden, self.rnn.bs, torch.get_rng_state()
        try:
            self.rnn.hidden, self.rnn.bs = self.hidden, self.bs
            torch.set_rng_state(self.rng)
            with torch.no_grad(): expected = self.learn.model(*self.xb)
            new_state = self.rnn.hidden
        finally: self.rnn.hidden, self.rnn.bs = live, live_bs; torch.set_rng_state(rng)
        torch.testing.assert_close(self.pred.detach(), expected, rtol=1e-5, atol=1e-5)
        self.moved += not all(torch.equal(a, b) for x, y in zip(self.hidden, new_state) for a, b in zip(x, y))
        self.checked += 1


def _stateful_rnn_learner(cbs):
    "An AWD-LSTM that keeps its hidden state from batch to batch (as a language model does), with dropout, and a linear head"
    rnn = AWD_LSTM(20, 16, 32, 2, hidden_p=0.2, input_p=0.2, embed_p=0.1, weight_p=0.2)
    return Learner(_token_dls(), SequentialRNN(rnn, LastStep(16, 3)), loss_func=CrossEntropyLossFlat(), cbs=cbs)


def test_no_recurrent_state_from_the_partner_pass():
    learn = _stateful_rnn_learner([CSKD(), AnchorsAsWithoutPartners(), FormulaCheck()])
    learn.fit(1)
    chk = learn.anchors_as_without_partners
    assert chk.checked == len(learn.dls.train) and chk.moved == chk.checked    # the state does move from step to step
    assert learn.formula_check.checked == chk.checked


def test_the_recurrent_state_check_catches_a_leak(monkeypatch):
    "Without putting the state back, the partner batch's final state reaches the anchors, and the check fails"
    monkeypatch.setattr(cskd_fastai.partners, 'kept_module_state', lambda model: nullcontext())
    learn = _stateful_rnn_learner([CSKD(), AnchorsAsWithoutPartners()])
    with pytest.raises(AssertionError, match='not close'): learn.fit(1)


# --- one CSKD, one learner; what a fit leaves ----------------------------------------------------------------

def test_second_cskd_is_refused_naming_the_first(small_dls):
    learn = cnn_learner(small_dls, cbs=CSKD(lam=0.5))
    train_dl = learn.dls.train
    with pytest.raises(ValueError, match=r'already has CSKD\(lam=0.5, T=4.*second one, CSKD\(lam=1, T=2'):
        learn.fit(1, cbs=CSKD(T=2.))
    assert learn.cskd.lam == 0.5 and sum(isinstance(c, CSKD) for c in learn.cbs) == 1 and learn.dls.train is train_dl
    with pytest.raises(ValueError, match=r'already has PartnerPassOnly\(partner='): Learner(small_dls, tiny_cnn(), cbs=[PartnerPassOnly(), CSKD()])
    with pytest.raises(ValueError, match=r'already has CSKD\(lam=1, T=4'): Learner(small_dls, tiny_cnn(), cbs=[CSKD(), CSKD(T=3.)])
    learn.add_cb(FormulaCheck())
    _fit_ok(learn)                                                  # the learner trains on with its own CSKD
    assert learn.formula_check.checked == len(small_dls.train)
    # the documented exception: fastai adds a fit's callbacks before its try, so one listed before the refused CSKD stays
    class Marker(Callback): pass
    with pytest.raises(ValueError, match='already has'): learn.fit(1, cbs=[Marker(), CSKD()])
    assert isinstance(learn.marker, Marker) and sum(isinstance(c, CSKD) for c in learn.cbs) == 1
    learn.remove_cb(Marker)
    with pytest.raises(ValueError, match='already has'): learn.fit(1, cbs=[CSKD(), Marker()])   # listed first: nothing is added
    assert not [c for c in learn.cbs if isinstance(c, Marker)]


def test_a_cskd_serves_one_learner(small_dls):
    cb = CSKD()
    l1 = cnn_learner(small_dls, cbs=cb)
    with pytest.raises(ValueError, match='already a callback of another Learner'): cnn_learner(small_dls, cbs=cb)
    assert cb.learn is l1
    l1.remove_cb(cb)
    assert not [c for c in l1.cbs if 'cskd' in type(c).__name__.lower()]
    l2 = cnn_learner(small_dls, cbs=cb)                             # once taken off, it can go to another learner
    _fit_ok(l2)
    l1.fit(1, cbs=CSKD())
    assert l1.recorder.metric_names.count('kd_loss') == 1 and l2.recorder.metric_names.count('kd_loss') == 1


def test_learner_without_recorder(small_dls):
    learn = cnn_learner(small_dls, cbs=[CSKD(), FormulaCheck()])
    learn.remove_cbs([learn.recorder, learn.progress])              # fastai's progress bar needs the recorder
    learn.fit(1)
    assert learn.formula_check.checked == len(small_dls.train) and learn.cskd.kd_value > 0


@pytest.mark.parametrize('tracker', [SaveModelCallback, EarlyStoppingCallback, ReduceLROnPlateau])
def test_monitoring_kd_loss_warns(small_dls, tmp_path, tracker):
    learn = cnn_learner(small_dls, cbs=CSKD(lam=SchedLin(0, 1)), path=tmp_path)
    with pytest.warns(UserWarning, match=f'`{tracker.__name__}` monitors `kd_loss`, CS-KD.s training term'):
        with learn.no_bar(): learn.fit(1, cbs=tracker(monitor='kd_loss'))
    import warnings
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        with learn.no_bar(): learn.fit(1, cbs=tracker(monitor='valid_loss'))
    assert not [w for w in ws if 'kd_loss' in str(w.message)]


class CountIndexBuilds(Callback):
    "How many `ClassIndex` objects pair the training batches of each fit"
    order, run_valid = CSKD.order + 1, False
    def before_fit(self): self.seen = []
    def before_batch(self):
        ix = self.learn.dl.index
        if not any(ix is o for o in self.seen): self.seen.append(ix)


def test_class_index_once_per_fit_and_relabelled_data_followed(digits_path):
    "One class index per fit (not per epoch), read again in the next fit: partners follow labels changed between fits"
    fs = sorted(get_image_files(digits_path/'train'))[:320] + sorted(get_image_files(digits_path/'valid'))[:100]
    lab = {f: f.parent.name for f in fs}
    dls = DataBlock(blocks=(ImageBlock, CategoryBlock), get_y=lambda f: lab[f], splitter=GrandparentSplitter(valid_name='valid'),
                    item_tfms=Resize(16)).dataloaders(fs, bs=32, num_workers=0)
    count = CountIndexBuilds()
    learn = cnn_learner(dls, cbs=[CSKD(), RecordPairs(), count])
    learn.fit(2)
    assert len(count.seen) == 1 and learn.cskd._index is None      # built once for both epochs, gone after the fit
    trn = [f for f in fs if f.parent.parent.name == 'train']
    new = np.random.default_rng(0).permutation([lab[f] for f in trn])
    lab.update(zip(trn, new))                                       # the same items, other labels, same vocabulary
    learn.fit(1)                                                    # RecordPairs checks each partner against the new labels
    assert len(count.seen) == 1 and learn.record_pairs.n_batches == len(dls.train)


def test_partners_in_half_precision_under_non_native_fp16():
    """`to_non_native_fp16()` casts the anchors to half precision after `CSKD` split off the partners; the partner forward
    casts its inputs too (a fit with it needs a GPU: tests/test_gpu.py)"""
    from fastai.callback.fp16 import NonNativeMixedPrecision
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=g); y = (x[:, 0] > 0).long()
    dls = DataLoaders.from_dsets(TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:]), bs=16, device='cpu')
    for fp16 in (False, True):
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
        learn = Learner(dls, model.half() if fp16 else model, loss_func=nn.CrossEntropyLoss(), cbs=CSKD())
        if fp16: learn.add_cb(NonNativeMixedPrecision())
        pdl = PairedDL(dls.train)
        xb, yb = pdl.one_batch()
        learn.xb, learn.yb, learn.dl = (xb,), (yb,), pdl
        src, seen = learn.cskd.source, []
        h = model.register_forward_pre_hook(lambda m, i: seen.append(i[0].dtype))
        try: src.split(learn); src.prepare(learn)
        finally: h.remove()
        dtype = torch.float16 if fp16 else torch.float32
        assert seen == [dtype] and src.logits.dtype == dtype
        with torch.no_grad(): torch.testing.assert_close(src.logits, model(xb[16:].to(dtype)))


# --- what a user meets: plain PyTorch loaders, NumPy numbers, CSKD added or removed during a fit, summed losses, export

def _blob_dsets(n=128, n_valid=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n + n_valid, 6, generator=g); y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    return TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:])

def _mlp(): return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def test_pytorch_dataloader_gets_a_message_that_says_what_to_do():
    "fastai trains on PyTorch's DataLoader; CS-KD needs fastai's, and says how to build it: what it says works"
    trn, val = _blob_dsets()
    tdl = torch.utils.data.DataLoader
    learn = Learner(DataLoaders(tdl(trn, batch_size=16, shuffle=True), tdl(val, batch_size=16)), _mlp(),
                    loss_func=CrossEntropyLossFlat(), cbs=CSKD())
    with pytest.raises(ValueError, match=r"PyTorch's `torch.utils.data.DataLoader`.*DataLoaders.from_dsets\(train_ds, valid_ds, bs=64\)"):
        with learn.no_bar(): learn.fit(1)
    assert isinstance(learn.dls.train, tdl)                                   # nothing changed
    for dls in (DataLoaders.from_dsets(trn, val, bs=16, device='cpu'),        # the two ways the message gives
                DataLoaders(DataLoader(trn, bs=16, shuffle=True, drop_last=True), tdl(val, batch_size=16))):
        learn = Learner(dls, _mlp(), loss_func=CrossEntropyLossFlat(), cbs=[CSKD(), FormulaCheck()])
        with learn.no_bar(): learn.fit(1)
        assert learn.formula_check.checked == len(dls.train) and learn.recorder.values[-1][-1] > 0


@pytest.mark.parametrize('num', [np.float16, np.float32, np.float64, np.int8, np.int64, np.uint8])
def test_numpy_numbers_are_numbers(num):
    cb = CSKD(lam=num(1), T=num(2), partner='cache', cache_mb=num(5))
    assert (cb.lam, cb.T, cb.source.max_mb) == (1., 2., 5.) and all(type(v) is float for v in (cb.lam, cb.T, cb.source.max_mb))
    assert repr(cb).startswith('CSKD(lam=1, T=2,')
    with pytest.raises(ValueError, match='`lam` must be >= 0'): CSKD(lam=np.float32(-0.5))
    with pytest.raises(ValueError, match='`lam` must be a number'): CSKD(lam=np.bool_(True))


class Switch(Callback):
    "After the first epoch, add a `CSKD` to the learner (`add=True`) or take it off"
    def __init__(self, add): self.add = add
    def after_epoch(self):
        if self.epoch != 0: return
        if self.add: self.learn.add_cb(CSKD())
        else: self.learn.remove_cb(CSKD)


def _rows(learn, tmp_path):
    "The fit table as `CSVLogger` wrote it, and as `learn.recorder` holds it"
    return pd.read_csv(tmp_path/'history.csv'), learn.recorder.metric_names, learn.recorder.values


def test_cskd_removed_during_a_fit_leaves_its_column_empty(small_dls, tmp_path):
    learn = cnn_learner(small_dls, cbs=CSKD(), path=tmp_path)
    learn.fit(3, cbs=[Switch(add=False), CSVLogger()])
    csv, names, values = _rows(learn, tmp_path)
    assert list(csv.columns) == names == ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'kd_loss', 'time']
    assert all(len(v) == len(names) - 2 for v in values)                      # every row has every column, in place
    assert values[0][-1] > 0 and values[1][-1] is None and values[2][-1] is None
    assert csv['kd_loss'].iloc[0] > 0 and csv['kd_loss'].iloc[1:].isna().all()
    assert all(0 <= v[2] <= 1 for v in values) and (csv['accuracy'] <= 1).all()  # accuracy stays in its column
    assert not [c for c in learn.cbs if 'cskd' in type(c).__name__.lower()]   # the companion left with the fit
    learn.fit(1)
    assert 'kd_loss' not in learn.recorder.metric_names


def test_cskd_added_during_a_fit_gets_its_column_from_the_next_fit(small_dls, tmp_path):
    learn = cnn_learner(small_dls, path=tmp_path)
    learn.fit(3, cbs=[Switch(add=True), CSVLogger()])
    csv, names, values = _rows(learn, tmp_path)
    assert list(csv.columns) == names == ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'time']
    assert all(len(v) == len(names) - 2 for v in values)
    assert learn.cskd.kd_value > 0                                            # it trained from the second epoch
    learn.add_cb(FormulaCheck())
    _fit_ok(learn)                                                            # and has its column from the next fit
    assert learn.recorder.metric_names.count('kd_loss') == 1 and learn.formula_check.checked == len(small_dls.train)


def test_summed_loss_warns_and_the_kd_term_stays_a_mean():
    "With `reduction='sum'` the KD term is still λT² times the mean KL over anchors (checked at every step): a warning says so"
    trn, val = _blob_dsets()
    dls = DataLoaders.from_dsets(trn, val, bs=16, device='cpu')
    for loss_func in (CrossEntropyLossFlat(reduction='sum'), nn.CrossEntropyLoss(reduction='sum')):
        learn = Learner(dls, _mlp(), loss_func=loss_func, cbs=[CSKD(), FormulaCheck()])
        with pytest.warns(UserWarning, match=r"sums over the batch \(`reduction='sum'`\).*λ/batch size"):
            with learn.no_bar(): learn.fit(1)
        assert learn.formula_check.checked == len(dls.train)
    import warnings
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        learn = Learner(dls, _mlp(), loss_func=CrossEntropyLossFlat(), cbs=CSKD())
        with learn.no_bar(): learn.fit(1)
    assert not [w for w in ws if 'reduction' in str(w.message)]


_LOAD = """import sys
sys.modules['cskd_fastai'] = None           # as on a machine without cskd_fastai
from fastai.vision.all import load_learner
try: load_learner(sys.argv[1]); print('with CSKD: loaded')
except Exception as e: print('with CSKD:', type(e).__name__)
learn = load_learner(sys.argv[2])
print(learn.predict(sys.argv[3])[0], [type(c).__name__ for c in learn.cbs])"""

def test_export_with_cskd_needs_the_library_and_remove_cb_drops_it(small_dls, tmp_path):
    """An exported learner with CSKD loads only where cskd_fastai is installed (fastai fails with UnboundLocalError);
    `learn.remove_cb(CSKD)` before `export` gives a file that loads without it, CSKD and its column companion gone"""
    import subprocess, sys
    learn = cnn_learner(small_dls, cbs=CSKD(partner='cache'), path=tmp_path)
    learn.fit(1)
    learn.export('with_cskd.pkl')
    learn.remove_cb(CSKD)
    assert not [c for c in learn.cbs if 'cskd' in type(c).__name__.lower()]
    learn.export('plain.pkl')
    img = str(small_dls.valid_ds.items[0])
    r = subprocess.run([sys.executable, '-c', _LOAD, str(tmp_path/'with_cskd.pkl'), str(tmp_path/'plain.pkl'), img],
                       capture_output=True, text=True, timeout=300)                # one process loads both files
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout.splitlines()                                                 # (predict draws a progress bar too)
    assert [l for l in out if l.startswith('with CSKD:')] == ['with CSKD: UnboundLocalError']
    assert 'CSKD' not in out[-1] and "'Recorder'" in out[-1]
    learn.add_cb(CSKD())                                                      # and it can go back on
    _fit_ok(learn)


def test_warns_once_when_fine_tuning_a_frozen_body(digits_path):
    "`fine_tune` with CSKD: one warning, in the frozen fit, pointing to the fine-tuning study and `calibrate`; none for a plain fit"
    import warnings
    dls = digits_block(80).dataloaders(digits_path, bs=16, num_workers=0)
    model = tiny_cnn(10)
    learn = Learner(dls, model, splitter=lambda m: [params(m[:2]), params(m[2:])], cbs=CSKD())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        with learn.no_bar(), learn.no_logging(): learn.fine_tune(1, 1e-3)
    said = [str(x.message) for x in w if 'frozen body' in str(x.message)]
    assert len(said) == 1 and 'finetune_study' in said[0] and 'learn.calibrate' in said[0]
    assert all(p.requires_grad for p in learn.model.parameters())          # the unfrozen fit said nothing
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert not [x for x in w if 'frozen body' in str(x.message)]


def _partner_targets(src, learn, xb, yb, pdl):
    "The partner logits `src` gives for the paired batch (`xb`, `yb`) of loader `pdl`, as a training step computes them"
    learn.xb, learn.yb, learn.dl = (xb,), (yb,), pdl
    src.split(learn); src.prepare(learn)
    return src.targets(learn)[0]


def test_awd_lstm_partner_pass_without_dropout_is_the_model_with_every_dropout_at_zero():
    "An AWD-LSTM classifier (embedding, weight, hidden, input and output dropout): the pass without dropout gives the logits of a copy whose every dropout probability is 0, in training mode, twice alike"
    from fastai.text.models.awdlstm import RNNDropout, WeightDropout, EmbeddingDropout
    dls = _token_dls()
    config = dict(awd_lstm_clas_config, emb_sz=16, n_hid=32, n_layers=2)
    model = get_text_classifier(AWD_LSTM, 20, 3, seq_len=6, config=config)
    learn = TextLearner(dls, model, loss_func=CrossEntropyLossFlat())
    src = PartnerForward(dropout=False)
    pdl = src.loader(dls.train, class_index(dls.train))
    xb, yb = pdl.one_batch()
    model.train(); model.reset()
    ref = get_text_classifier(AWD_LSTM, 20, 3, seq_len=6, config=config)    # the same weights (AWD-LSTM's modules cannot be deep-copied)
    ref.load_state_dict(model.state_dict()); ref.train(); ref.reset()
    for m in ref.modules():
        for a in ('p', 'embed_p', 'weight_p'):
            if isinstance(m, (nn.Dropout, RNNDropout, EmbeddingDropout, WeightDropout)) and hasattr(m, a): setattr(m, a, 0.)
    a, b = _partner_targets(src, learn, xb, yb, pdl), _partner_targets(src, learn, xb, yb, pdl)
    assert torch.equal(a, b)
    with torch.no_grad(): r = ref(xb[len(xb)//2:])[0]
    torch.testing.assert_close(a, r)
    assert all(m.training for m in model.modules())
    with torch.no_grad():                                          # the default pass draws: its targets differ between passes
        src2 = PartnerForward()
        assert not torch.equal(_partner_targets(src2, learn, xb, yb, pdl), _partner_targets(src2, learn, xb, yb, pdl))


class _ManyDrops(nn.Module):
    "A model with the other ways models drop: torchvision's StochasticDepth and DropBlock2d, timm's DropPath, attention dropout"
    def __init__(self):
        super().__init__()
        from torchvision.ops import StochasticDepth, DropBlock2d
        from timm.layers import DropPath
        self.conv, self.bn = nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.BatchNorm2d(8)
        self.sd, self.db, self.dp = StochasticDepth(0.5, 'row'), DropBlock2d(0.5, 3), DropPath(0.5)
        self.attn, self.head = nn.MultiheadAttention(8, 2, dropout=0.5, batch_first=True), nn.Linear(8, 10)
    def forward(self, x):
        h = self.db(F.relu(self.bn(self.conv(x))))
        h = h + self.sd(h)
        t = h.flatten(2).transpose(1, 2)
        t = t + self.dp(self.attn(t, t, t, need_weights=False)[0])
        return self.head(t.mean(1))


def test_partner_pass_without_dropout_turns_off_every_kind_of_dropout(small_dls):
    "torchvision's StochasticDepth and DropBlock2d, timm's DropPath and MultiheadAttention's dropout: off in the pass without dropout (two passes alike, the logits of a copy with every probability at 0), on in the default's"
    import copy
    set_seed(0)
    model = _ManyDrops()
    learn = Learner(small_dls, model)
    ref = copy.deepcopy(model)
    ref.sd.p = ref.db.p = ref.dp.drop_prob = ref.attn.dropout = 0.
    pdl = PartnerForward().loader(small_dls.train, class_index(small_dls.train))
    xb, yb = pdl.one_batch()
    partner_logits = lambda src: _partner_targets(src, learn, xb, yb, pdl)
    a, b = partner_logits(PartnerForward(dropout=False)), partner_logits(PartnerForward(dropout=False))
    assert torch.equal(a, b) and all(m.training for m in model.modules())
    ref.train()
    with torch.no_grad(): torch.testing.assert_close(a, ref(xb[len(xb)//2:]), atol=1e-5, rtol=1e-4)
    assert not torch.equal(partner_logits(PartnerForward()), partner_logits(PartnerForward()))   # the default pass draws


@pytest.mark.parametrize('kw', [dict(dropout='no'), dict(train=1), dict(bn_stats=None), dict(get_logits='logits')])
def test_partner_forward_refuses_what_is_not_a_switch(kw):
    with pytest.raises(ValueError, match=f"`{next(iter(kw))}`"): PartnerForward(**kw)
    assert PartnerForward(dropout=np.bool_(False)).dropout is False
