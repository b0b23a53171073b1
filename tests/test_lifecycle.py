"""What `CSKD` leaves behind, however a fit ends, and the λ schedule.

Every exit (Ctrl-C in `lr_find`, an exception in another callback's `before_fit` or `before_train`, one in the
middle of an epoch, `CancelFitException`) must leave the learner's metrics, loaders and methods exactly as they
were, and the next fit must train with CS-KD: the loss is the formula (checked independently by `FormulaCheck`)
and `kd_loss` is in the table."""
import pytest
import torch
from fastai.vision.all import *
from fastai.callback.schedule import SchedLin, SchedCos, combine_scheds
from cskd_fastai.all import *
from conftest import cnn_learner
from reference import FormulaCheck


def _state(learn):
    "What must be the same before and after any fit: metrics, loaders, and which learner attributes are callables"
    return dict(metrics=list(learn.metrics), dls=learn.dls, loaders=list(learn.dls.loaders),
                train=learn.dls.train, valid=learn.dls.valid, train_state=dict(vars(learn.dls.train)),
                methods={k for k, v in vars(learn).items() if callable(v)} - {'logger'},   # fastai's own ProgressCallback swaps the logger
                cbs=[type(c).__name__ for c in learn.cbs])


def _same(a, b):
    assert a['metrics'] == b['metrics'] and a['dls'] is b['dls'] and a['train'] is b['train'] and a['valid'] is b['valid']
    assert all(x is y for x, y in zip(a['loaders'], b['loaders'])) and len(a['loaders']) == len(b['loaders'])
    assert {k: v for k, v in a['train_state'].items() if k != 'rng'} == {k: v for k, v in b['train_state'].items() if k != 'rng'}
    assert a['methods'] == b['methods'] and a['cbs'] == b['cbs']


class Raise(Callback):
    "Raise `exc` at `event` (the `at`-th time it fires in a training phase, for batch events)"
    def __init__(self, exc, event, at=1): self.exc, self.event, self.at, self.n = exc, event, at, 0
    def __call__(self, event_name):
        if event_name == self.event and (event_name not in ('after_batch', 'after_loss') or self.training):
            self.n += 1
            if self.n == self.at: raise self.exc
        return super().__call__(event_name)


def _train_with_cskd_after(learn, n_batches):
    "The next fit: CS-KD active, loss = formula at every step, `kd_loss` in the table and positive"
    learn.add_cb(FormulaCheck())
    learn.fit(1)
    assert learn.formula_check.checked == n_batches
    assert learn.recorder.metric_names[-2] == 'kd_loss' and learn.recorder.values[-1][-1] > 0
    learn.remove_cb(FormulaCheck)


@pytest.mark.parametrize('exc, event', [
    (RuntimeError('boom'), 'before_fit'),          # another callback's before_fit, after CSKD's
    (RuntimeError('boom'), 'before_train'),
    (KeyboardInterrupt(), 'after_loss'),           # mid-epoch
    (RuntimeError('boom'), 'after_batch'),
    (CancelFitException(), 'after_batch'),
])
def test_any_exit_leaves_the_learner_as_it_was(small_dls, exc, event):
    learn = cnn_learner(small_dls, cbs=CSKD())
    before = _state(learn)
    bad = Raise(exc, event, at=3 if event in ('after_loss', 'after_batch') else 1)
    bad.order = CSKD.order + 1
    learn.add_cb(bad)
    if isinstance(exc, CancelFitException):
        learn.fit(1)
        assert not isinstance(learn.dl, (PairedDL, IndexedDL))   # put back (and fastai clears learn.dl at the end of a fit)
    else:
        with pytest.raises(type(exc)): learn.fit(1)
    learn.remove_cb(bad)
    _same(_state(learn), before)
    _train_with_cskd_after(learn, len(small_dls.train))
    _same(_state(learn), before)


def test_interrupted_lr_find(small_dls):
    "Ctrl-C in the middle of lr_find (a callback raises KeyboardInterrupt), then fit: CS-KD is on"
    learn = cnn_learner(small_dls, cbs=CSKD())
    before = _state(learn)
    bad = Raise(KeyboardInterrupt(), 'after_batch', at=3)
    learn.add_cb(bad)
    with pytest.raises(KeyboardInterrupt): learn.lr_find(num_it=20, show_plot=False)
    learn.remove_cb(bad)
    _same(_state(learn), before)
    _train_with_cskd_after(learn, len(small_dls.train))


def test_exception_in_before_fit_of_an_earlier_callback(small_dls):
    "A callback ordered before CSKD fails in before_fit: CSKD never started, nothing to undo"
    learn = cnn_learner(small_dls, cbs=CSKD())
    before = _state(learn)
    bad = Raise(RuntimeError('early'), 'before_fit'); bad.order = CSKD.order - 5
    learn.add_cb(bad)
    with pytest.raises(RuntimeError): learn.fit(1)
    learn.remove_cb(bad)
    _same(_state(learn), before)
    _train_with_cskd_after(learn, len(small_dls.train))


def test_removing_cskd_removes_its_column(small_dls):
    learn = cnn_learner(small_dls, cbs=CSKD())
    learn.remove_cb(CSKD)
    learn.fit(1)
    assert 'kd_loss' not in learn.recorder.metric_names and len(learn.recorder.values[-1]) == 3
    assert not [c for c in learn.cbs if 'cskd' in type(c).__name__.lower()]
    learn.fit(1, cbs=CSKD())                                   # a callback for one fit only
    assert learn.recorder.metric_names[-2] == 'kd_loss'
    assert not [c for c in learn.cbs if 'cskd' in type(c).__name__.lower()]


def test_train_loader_put_back_after_each_phase(small_dls):
    seen = []
    class Look(Callback):
        order = CSKD.order + 20
        def after_train(self): seen.append(self.learn.dl)
    learn = cnn_learner(small_dls, cbs=[CSKD(), Look()])
    learn.fit(2)
    assert all(dl is small_dls.train for dl in seen) and len(seen) == 2


def test_validate_and_get_preds_show_no_kd(small_dls):
    learn = cnn_learner(small_dls, cbs=CSKD())
    learn.fit(1)
    assert len(learn.validate()) == 2                          # valid loss, accuracy
    learn.get_preds()
    assert len(learn.metrics) == 1


# --- λ schedules ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('sched', [SchedLin(0., 1.), SchedCos(2., 0.5), lambda p: 0.5 + p,
                                   combine_scheds([0.5, 0.5], [SchedLin(0., 1.), SchedNo(1., 1.)])])
def test_lam_schedule_is_applied_at_each_step(small_dls, sched):
    "The loss equals the formula with λ = sched(pct_train), step by step (FormulaCheck recomputes it independently)"
    pcts = []
    class Pct(Callback):
        order, run_valid = -3, False
        def before_batch(self): pcts.append(self.pct_train)
    learn = cnn_learner(small_dls, cbs=[CSKD(lam=sched), FormulaCheck(), Pct()])
    learn.fit(2)
    n = 2*len(small_dls.train)
    assert learn.formula_check.checked == n
    # the λ of each step, against the schedule evaluated at that step's fraction of training, computed here
    expected = [float(sched(i/n)) for i in range(n)]
    assert pcts == pytest.approx([i/n for i in range(n)])
    assert learn.formula_check.lams == pytest.approx(expected)


def test_lam_schedule_with_fine_tune(small_dls):
    "`fine_tune` runs two fits; the schedule restarts with each (pct_train restarts), and each step's loss is the formula"
    learn = vision_learner(small_dls, 'resnet10t', pretrained=False, metrics=accuracy,
                           cbs=[CSKD(lam=SchedLin(0., 1.)), FormulaCheck()])
    learn.fine_tune(1, freeze_epochs=1)
    n = len(small_dls.train)
    lams = learn.formula_check.lams
    assert len(lams) == 2*n and learn.formula_check.checked == 2*n
    assert lams[:n] == pytest.approx([i/n for i in range(n)]) and lams[n:] == pytest.approx([i/n for i in range(n)])
    assert learn.recorder.metric_names[-2] == 'kd_loss'


def test_constant_lam_unchanged():
    assert CSKD().lam == 1. and CSKD().T == 4. and CSKD(lam=0.3).lam_now == 0.3
