"""Each assumption `cskd_fastai._internals` makes about undocumented parts of fastai and PyTorch, checked against the
installed versions: a test here fails the day one stops holding. Also the public ways the library took instead of
private ones (the autocast settings, the normalisation layers' running statistics)."""
import random
from contextlib import nullcontext
from copy import deepcopy
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import TensorDataset
from fastai.vision.all import *
from fastai.text.all import AWD_LSTM, SequentialRNN
from fastai.callback.fp16 import MixedPrecision, AMPMode
from cskd_fastai.all import *
from cskd_fastai._internals import *
from cskd_fastai.partners import _kept_running_stats, _running_stats


def _tensor_dls(n=48, bs=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n + 16, 3, generator=g); y = (x[:, 0] > 0).long()
    return DataLoaders.from_dsets(TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:]), bs=bs, device='cpu')


# ---------------------------------------------------------------------------------------------------- loaders
def test_worker_settings_are_kept_on_fake_l():
    "`DataLoader` keeps `num_workers` (and the rest) on `fake_l`; a wrapped loader is built with the same settings"
    dl = DataLoader(list(range(20)), bs=4, num_workers=2, persistent_workers=True, pin_memory_device='cuda:0')
    assert loader_settings(dl) == dict(num_workers=2, persistent_workers=True, pin_memory_device='cuda:0')
    assert dl.num_workers != 2                                          # the attribute is a worker's share, not the setting
    assert loader_settings(dl.new())['num_workers'] == 2               # fastai's own copy reads the same place
    dls = _tensor_dls()
    dls.train.fake_l.num_workers, dls.train.fake_l.persistent_workers = 3, True   # as `num_workers=3, persistent_workers=True` set them
    for w in (PairedDL(dls.train), IndexedDL(dls.train)): assert loader_settings(w) == loader_settings(dls.train)


def test_dataloader_init_draws_from_pythons_random_only():
    "`DataLoader.__init__` seeds its loader from `random` (and touches no other stream); wrapping a loader moves none"
    dls = _tensor_dls()
    def states(): return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    r, n, t = states()
    DataLoader(list(range(10)), bs=4)
    r2, n2, t2 = states()
    assert r2 != r and np.array_equal(n, n2) and torch.equal(t, t2)
    r, n, t = states()
    PairedDL(dls.train); IndexedDL(dls.train)
    r2, n2, t2 = states()
    assert r2 == r and np.array_equal(n, n2) and torch.equal(t, t2)


def test_distributed_dl_unpads_by_its_row_count():
    """`DistributedDL` adds each batch's rows to `i` and drops from a gathered batch the rows past its `n` items by that
    count: with partner rows uncounted, a paired loader's predictions keep all anchors; counted, some are dropped"""
    from fastai.distributed import DistributedDL
    dls = _tensor_dls(n=40, bs=16)                                      # batches of 16, 16 and 8 anchors
    dls.train.drop_last = False
    for uncount in (True, False):
        ddl = DistributedDL(PairedDL(dls.train), rank=0, world_size=1)
        ddl._broadcast = lambda t, rank: t                              # one process: nothing to broadcast
        assert is_distributed_dl(ddl) and not is_distributed_dl(dls.train)
        kept, rows = 0, 0
        for b in ddl:
            n = len(b[1])//2
            rows += 2*n
            assert ddl.i == rows                                        # every row of the batch counted
            if uncount: uncount_rows(ddl, n); rows -= n
            kept += len(ddl.to_detach(b[1][:n]))                        # the anchors' predictions, gathered and unpadded
        assert (kept == 40) == uncount
    uncount_rows(dls.train, 8)
    assert not hasattr(dls.train, 'i')                                  # not a DistributedDL: left alone


def test_set_split_sets_the_item_transforms_split():
    "Iterating a `TfmdDL` sets its item and batch transforms to its dataset's split (`before_iter`); `set_split` does that"
    class TrainOnly(Transform):
        split_idx = 0
        def encodes(self, x:int): return x + 100
    dsets = Datasets(list(range(8)), tfms=[[noop], [noop]], splits=[list(range(4)), list(range(4, 8))])
    dls = dsets.dataloaders(bs=2, after_item=[TrainOnly()], num_workers=0)
    valid = dls.valid
    valid.after_item.split_idx = 0                                      # as a training loader left it
    assert valid.do_item(0)[0] == 104
    set_split(valid)
    assert valid.after_item.split_idx == 1 and valid.do_item(0)[0] == 4
    assert dls.train.after_item.split_idx in (None, 0)


def test_tfmd_subset_is_what_fastais_private_new_makes():
    dsets = Datasets(['a', 'bb', 'ccc', 'dddd'], tfms=[[len], [lambda o: o[0], Categorize()]])
    for tl in dsets.tls:
        for split in (0, 1):
            ours, theirs = tfmd_subset(tl, ['bb', 'dddd'], split), tl._new(['bb', 'dddd'], split_idx=split)
            assert list(ours) == list(theirs) and ours.split_idx == theirs.split_idx == split
            assert ours.tfms.fs is tl.tfms.fs and ours.types == theirs.types
    class Counted(Transform):
        "Counts its setups"
        n = 0
        def setups(self, items): Counted.n += 1
    tl = TfmdLists(['a', 'bb', 'ccc'], [Counted(), len])
    assert Counted.n == 1 and list(tfmd_subset(tl, ['ccc'], 0)) == [3] and Counted.n == 1   # set up once, not again


# ---------------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize('amp', ['fp16', 'bf16'])
def test_autocast_like_is_mixed_precisions_region(amp):
    "Inside `autocast_like` autocast is on or off, and in which dtype, as inside `MixedPrecision`'s region for a batch"
    seen = {}
    class Spy(Callback):
        def __init__(self, key, ours): self.key, self.ours = key, ours
        def before_batch(self):
            if self.key in seen: return
            with (autocast_like(self.learn) if self.ours else nullcontext()):
                on = torch.is_autocast_enabled('cuda')
                seen[self.key] = on, torch.get_autocast_dtype('cuda') if on else None
    mine, fastais = Spy('ours', True), Spy('fastai', False)
    mine.order, fastais.order = MixedPrecision.order - 1, MixedPrecision.order + 1   # outside and inside fastai's region
    learn = Learner(_tensor_dls(), nn.Linear(3, 2), loss_func=nn.CrossEntropyLoss(), cbs=[mine, fastais])
    learn = learn.to_fp16() if amp == 'fp16' else learn.to_bf16()
    import warnings
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter('ignore'); learn.fit(1)
    assert seen['ours'] == seen['fastai']
    assert seen['ours'][0] == torch.cuda.is_available()
    if torch.cuda.is_available(): assert seen['ours'][1] == (torch.float16 if amp == 'fp16' else torch.bfloat16)
    assert isinstance(autocast_like(Learner(_tensor_dls(), nn.Linear(3, 2), loss_func=nn.CrossEntropyLoss())), nullcontext)   # no MixedPrecision


def test_stateful_modules_have_reset_and_public_state():
    """fastai's recurrent modules have `reset` (what `ModelResetter` calls) and keep their state in public attributes:
    under `kept_module_state` a forward (another batch size) leaves the next output as if it had not run"""
    for m in (AWD_LSTM(20, 8, 16, 2), SequentialRNN(AWD_LSTM(20, 8, 16, 1))): assert callable(getattr(m, 'reset', None))
    lstm = AWD_LSTM(20, 8, 16, 2, hidden_p=0, input_p=0, embed_p=0, weight_p=0).eval()
    x1, x2, x3 = [torch.randint(0, 20, (bs, 5), generator=torch.Generator().manual_seed(bs)) for bs in (2, 3, 4)]
    with torch.no_grad():
        lstm.reset(); lstm(x1); ref = lstm(x2)[0]                       # x2 right after x1
        lstm.reset(); lstm(x1)
    before = {k: v for k, v in vars(lstm).items()}
    with torch.no_grad(), kept_module_state(lstm):
        lstm(x3)                                                        # a forward in between
        changed = [k for k, v in vars(lstm).items() if before.get(k) is not v]
    assert changed and all(not k.startswith('_') for k in changed), changed     # what a forward reassigns is public
    with torch.no_grad(): torch.testing.assert_close(lstm(x2)[0], ref, rtol=0, atol=0)


def test_normalisation_layers_update_their_running_statistics_in_place():
    """The partner pass with `bn_stats=False` saves and restores the running statistics: torch updates them in place (the
    same tensors), so the restore is exact, and the pass is the one `track_running_stats=False` gives, bit for bit"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.InstanceNorm2d(4, track_running_stats=True),
                          nn.Flatten(), nn.LazyLinear(5), nn.BatchNorm1d(5, momentum=None))
    x = torch.randn(6, 3, 8, 8)
    model(x)                                                            # sets up the lazy layer, moves the statistics
    norms = [m for m in model.modules() if _running_stats(m)]
    assert len(norms) == 3
    ids, vals = [[id(b) for b in _running_stats(m)] for m in norms], [[b.clone() for b in _running_stats(m)] for m in norms]
    with torch.no_grad(): model(x + 1)
    assert [[id(b) for b in _running_stats(m)] for m in norms] == ids             # in place
    assert not all(torch.equal(a, b) for m, v in zip(norms, vals) for a, b in zip(_running_stats(m), v))
    saved = [[b.clone() for b in _running_stats(m)] for m in norms]
    with torch.no_grad(), _kept_running_stats(model): out = model(x + 2)
    assert all(torch.equal(a, b) for m, v in zip(norms, saved) for a, b in zip(_running_stats(m), v))   # bit for bit
    old = deepcopy(model)
    for m in old.modules():
        if _running_stats(m): m.track_running_stats = False            # the way the library used to do it
    with torch.no_grad(): assert torch.equal(out, old(x + 2))


def test_every_torch_batchnorm_is_found_by_its_attributes():
    "The library finds normalisation layers by `track_running_stats` and their statistics' names, not by torch's private `_BatchNorm`"
    from torch.nn.modules.batchnorm import _BatchNorm
    def subclasses(c): return [c] + [s for d in c.__subclasses__() for s in subclasses(d)]
    torch_bns = [c for c in subclasses(_BatchNorm) if c.__module__.startswith('torch.nn') and not c.__name__.startswith('_')]
    assert {'BatchNorm1d', 'BatchNorm2d', 'BatchNorm3d', 'SyncBatchNorm'} <= {c.__name__ for c in torch_bns}
    for c in torch_bns:
        m = c(4) if 'Lazy' not in c.__name__ else c()
        assert m.track_running_stats and len(_running_stats(m)) == 3, c


def test_bn_stats_false_leaves_a_lazy_layer_at_its_initial_statistics():
    model = nn.Sequential(nn.Linear(3, 4), nn.LazyBatchNorm1d())
    with torch.no_grad(), _kept_running_stats(model): model(torch.randn(8, 3) + 5)
    bn = model[1]
    assert torch.equal(bn.running_mean, torch.zeros(4)) and torch.equal(bn.running_var, torch.ones(4)) and bn.num_batches_tracked == 0


# ---------------------------------------------------------------------------------------------------- the learner
class Column(Callback):
    order = Recorder.order + 1
    def before_fit(self): add_column(self.learn, 'extra')
    def after_validate(self): log_value(self.learn, 7.)


@pytest.mark.parametrize('recorder', [dict(), dict(add_time=False), dict(train_metrics=True)])
def test_a_column_added_after_recorder_names_its_columns(tmp_path, recorder):
    "A name added after `Recorder.before_fit` and a value logged after its `after_validate` are one column, in every table"
    learn = Learner(_tensor_dls(), nn.Linear(3, 2), loss_func=nn.CrossEntropyLoss(), metrics=accuracy, path=tmp_path,
                    cbs=[Column(), CSVLogger()])
    for k, v in recorder.items(): setattr(learn.recorder, k, v)
    with learn.no_bar(): learn.fit(2)
    names, values = learn.recorder.metric_names, learn.recorder.values
    assert names[-2 if learn.recorder.add_time else -1] == 'extra' and names.count('extra') == 1
    assert all(len(v) == len(names) - 1 - learn.recorder.add_time and v[-1] == 7. for v in values)
    csv = pd.read_csv(tmp_path/'history.csv')
    assert list(csv.columns) == names and (csv['extra'] == 7.).all()
    assert not add_column(Learner(_tensor_dls(), nn.Linear(3, 2), loss_func=nn.CrossEntropyLoss()).remove_cb(Recorder), 'x')   # no recorder


def test_fit_running_from_before_fit_to_after_fit_and_not_after_any_end():
    seen = []
    class Watch(Callback):
        def before_fit(self): seen.append(fit_running(self.learn))
        def after_batch(self): seen.append(fit_running(self.learn))
        def after_fit(self): seen.append(fit_running(self.learn))
    class Stop(Callback):
        def __init__(self, exc): self.exc = exc
        def after_batch(self): raise self.exc
    learn = Learner(_tensor_dls(), nn.Linear(3, 2), loss_func=nn.CrossEntropyLoss(), cbs=Watch())
    other = Learner(_tensor_dls(), nn.Linear(3, 2), loss_func=nn.CrossEntropyLoss())
    assert not fit_running(learn)                                       # before any fit
    for exc in (None, CancelFitException(), RuntimeError('boom'), KeyboardInterrupt()):
        seen.clear()
        with learn.no_bar(), learn.no_logging():
            if exc is None: learn.fit(1)
            elif isinstance(exc, CancelFitException): learn.fit(1, cbs=Stop(exc))
            else:
                with pytest.raises(type(exc)): learn.fit(1, cbs=Stop(exc))
        assert len(seen) > 1 and all(seen), exc
        assert not fit_running(learn) and not fit_running(other), exc
    class Inner(Callback):
        def after_epoch(self): seen.append((fit_running(self.learn), fit_running(other)))
    seen.clear()
    with learn.no_bar(), learn.no_logging(): learn.validate(cbs=Inner())
    assert [o for o in seen if isinstance(o, tuple)] == [(False, False)] and not any(o for o in seen if o is True)   # validate is not a fit
