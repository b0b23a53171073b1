"`CSKD(partner='cache')`: partner targets from cached anchor logits, no partner loading, no second forward"
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastai.vision.all import *
from fastai.callback.training import GradientAccumulation
from torch.utils.data import TensorDataset
from cskd_fastai.all import *
from conftest import digits_block, CountForwards, cnn_learner, fit_ok as _fit_ok
from reference import tiny_cnn, CacheCheck


class KDPerBatch(Callback):
    "The KD term CSKD added in each training step (the loss it backpropagates minus cross-entropy on the anchors)"
    order, run_valid = CSKD.order + 1, False
    def before_fit(self): self.kd = []
    def after_loss(self):
        self.kd.append((self.loss_grad - F.cross_entropy(self.pred, self.yb[0])).item())


def test_one_forward_per_step_and_no_partner_loading(small_dls):
    cf = CountForwards()
    learn = cnn_learner(small_dls, cbs=[CSKD(partner='cache'), cf])
    learn.fit(1)
    n = len(small_dls.train)
    assert cf.calls['train'] == n == cf.batches['train']           # the paper's mode runs 2 forwards per step
    assert cf.rows['train'] == n*small_dls.train.bs                   # anchors only: no partner rows loaded


def test_kd_starts_at_zero_and_grows_as_the_cache_fills(small_dls):
    kd = KDPerBatch()
    learn = cnn_learner(small_dls, cbs=[CSKD(partner='cache'), kd])
    learn.fit(2)
    n = len(small_dls.train)
    assert kd.kd[0] == pytest.approx(0, abs=1e-6)                     # nothing cached before the first step
    assert all(k > 0 for k in kd.kd[n:])                              # second epoch: every partner drawn is cached
    cb = learn.cskd.source
    assert int(cb.seen.sum()) == len(set(range(len(small_dls.train_ds))))  # every item was an anchor at least once


@pytest.mark.parametrize('extra', ['mixup', 'cutmix', 'label_smoothing', 'grad_acc', 'fp16'])
def test_composes_with(small_dls, extra):
    cbs, kw = [CSKD(partner='cache')], {}
    if extra == 'mixup': cbs.append(MixUp())
    if extra == 'cutmix': cbs.append(CutMix())
    if extra == 'label_smoothing': kw['loss_func'] = LabelSmoothingCrossEntropyFlat()
    if extra == 'grad_acc': cbs.append(GradientAccumulation(n_acc=64))
    learn = cnn_learner(small_dls, cbs=cbs, **kw)
    if extra == 'fp16': learn = learn.to_fp16()
    _fit_ok(learn, 2)


def test_fine_tune_keeps_the_cache_between_fits(small_dls):
    learn = vision_learner(small_dls, 'resnet10t', pretrained=False, metrics=accuracy, cbs=CSKD(partner='cache'))
    kd = KDPerBatch()
    learn.fit(1)
    cache = learn.cskd.source.cache
    learn.add_cb(kd)
    learn.fit(1)
    assert learn.cskd.source.cache is cache                                  # same training set: the cache carries over
    assert kd.kd[0] > 0                                               # so the second fit's first step has KD targets


@pytest.mark.parametrize('how', ['new_model', 'new_learner'])
def test_another_model_starts_an_empty_cache(small_dls, how):
    "A table filled by one model is never another's targets: a new model, or the callback moved to a new learner, starts empty"
    cb = CSKD(partner='cache')
    learn = cnn_learner(small_dls, cbs=cb)
    learn.fit(2)
    assert bool(cb.source.seen.all())
    if how == 'new_model': learn.model = tiny_cnn()
    else:
        learn.remove_cb(cb)
        learn = cnn_learner(small_dls, cbs=cb)
    chk = CacheCheck()                                                # its own table starts empty: expects KD 0 at first
    learn.fit(1, cbs=chk)
    assert chk.steps == len(small_dls.train) and chk.cached_partners > 0
    assert int(cb.source.seen.sum()) == len(small_dls.train)*small_dls.train.bs


def test_relabelled_training_set_starts_a_new_cache(digits_path):
    fs = sorted(get_image_files(digits_path/'train'))[:320] + sorted(get_image_files(digits_path/'valid'))[:100]
    lab = {f: f.parent.name for f in fs}
    dls = DataBlock(blocks=(ImageBlock, CategoryBlock), get_y=lambda f: lab[f], splitter=GrandparentSplitter(valid_name='valid'),
                    item_tfms=Resize(16)).dataloaders(fs, bs=32, num_workers=0)
    learn = cnn_learner(dls, cbs=CSKD(partner='cache'))
    learn.fit(1)
    trn = [f for f in fs if f.parent.parent.name == 'train']
    lab.update(zip(trn, np.random.default_rng(0).permutation([lab[f] for f in trn])))
    chk = CacheCheck()                                                # reads the new labels item by item
    learn.fit(1, cbs=chk)                                             # same items, same model, other labels: a new table
    assert chk.steps == len(dls.train)


def test_new_training_set_starts_a_new_cache(small_dls, digits_path):
    learn = cnn_learner(small_dls, cbs=CSKD(partner='cache'))
    learn.fit(1)
    assert learn.cskd.source.cache.shape == (len(small_dls.train_ds), 10)
    learn.dls = digits_block(160).dataloaders(digits_path, bs=32, num_workers=0)
    learn.fit(1)
    assert learn.cskd.source.cache.shape == (len(learn.dls.train_ds), 10) and len(learn.dls.train_ds) != len(small_dls.train_ds)


def test_over_budget_is_refused_before_anything_changes(small_dls):
    cb = CSKD(partner='cache', cache_mb=1e-3)                         # 320 items × 10 classes × 2 bytes = 0.006 MiB
    learn = cnn_learner(small_dls, cbs=cb)
    with pytest.raises(ValueError, match=r"320 items × 10 classes × 2 bytes = 0.0061 MiB.*cache_mb=0\.001.*partner='forward'"):
        learn.fit(1)
    assert len(learn.metrics) == 1 and type(learn.dls.train) is TfmdDL and cb.source.cache is None
    cb.source.max_mb = 1.
    _fit_ok(learn, 1)                                                  # the same learner and callback fit afterwards


def test_lam_zero_adds_nothing(small_dls):
    learn = cnn_learner(small_dls, cbs=CSKD(lam=0, partner='cache'))
    learn.fit(1)
    assert learn.recorder.values[-1][-1] == 0


def test_plain_tensor_dataset():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 6, generator=g); y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    dls = DataLoaders.from_dsets(TensorDataset(x[:400], y[:400]), TensorDataset(x[400:], y[400:]), bs=32, device='cpu')
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))
    _fit_ok(Learner(dls, model, loss_func=nn.CrossEntropyLoss(), metrics=accuracy, cbs=CSKD(partner='cache')), 2, lr=1e-2)


def test_seeded_runs_reproduce(digits_path):
    def run():
        set_seed(3)
        dls = digits_block(320).dataloaders(digits_path, bs=32, num_workers=0)
        learn = cnn_learner(dls, cbs=CSKD(partner='cache'))
        learn.fit(2)
        return learn.recorder.values
    assert run() == run()


def test_export_leaves_the_cache_out(small_dls, tmp_path):
    learn = cnn_learner(small_dls, cbs=CSKD(partner='cache'))
    learn.path = tmp_path
    learn.fit(1)
    learn.export('m.pkl')
    learn2 = load_learner(tmp_path/'m.pkl')
    assert learn2.cskd.source.cache is None and isinstance(learn2.cskd.source, PartnerCache) and learn.cskd.source.cache is not None
    learn2.dls = small_dls
    _fit_ok(learn2, 1)                                                 # a loaded learner starts a new cache


def test_bad_options():
    with pytest.raises(ValueError, match='`partner`'): CSKD(partner='Cache')
    with pytest.raises(ValueError, match='cache_mb'): CSKD(partner='cache', cache_mb=-1)


def _tensor_dls(n=100, bs=32, drop_last=False, seed=0):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n + 40, 6, generator=g); y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    set_seed(seed)
    dls = DataLoaders.from_dsets(TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:]), bs=bs, device='cpu')
    dls.train.drop_last = drop_last
    return dls


def test_every_drawn_partner_checked_against_an_independent_table():
    dls = _tensor_dls(100, 32, drop_last=False)                        # batches of 32, 32, 32 and 4: uneven last batch
    chk = CacheCheck(tol=1e-4)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), cbs=[CSKD(lam=0.8, T=2., partner='cache'), chk])
    learn.fit(3, 1e-2)
    assert chk.steps == 3*4 and chk.cached_partners > 0
    src = learn.cskd.source
    assert bool(src.seen.all()) and bool(chk.seen.all()) and len(chk.table) == 100   # the short last batch was stored too
    torch.testing.assert_close(src.cache.float(), chk.table)


def test_partners_differ_with_the_seed_and_repeat_with_it():
    def partners(seed):
        dls = _tensor_dls(100, 32, seed=seed)
        drawn = []
        class Grab(Callback):
            order, run_valid = CSKD.order + 1, False
            def after_loss(self): drawn.append(self.learn.cskd.source.partner_idx.clone())
        learn = Learner(dls, nn.Sequential(nn.Linear(6, 3)), loss_func=nn.CrossEntropyLoss(), cbs=[CSKD(partner='cache'), Grab()])
        set_seed(seed)
        learn.fit(1)
        return torch.cat(drawn)
    a, b, c = partners(0), partners(0), partners(1)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_loading_other_weights_empties_the_cache(small_dls, tmp_path):
    "`learn.load` (no callback event): the next fit finds other weights than its last fit ended with, and starts an empty table"
    learn = cnn_learner(small_dls, cbs=CSKD(partner='cache'), path=tmp_path)
    learn.fit(1)
    learn.save('first')
    learn.fit(1)
    kd = KDPerBatch()
    learn.fit(1, cbs=kd)                                              # the weights the last fit ended with: the table is kept
    assert kd.kd[0] > 0
    learn.load('first')
    chk = CacheCheck()                                                # its own table starts empty: so must the cache's
    learn.fit(1, cbs=chk)
    assert chk.kd[0] == 0 and chk.steps == len(small_dls.train)       # checked at every step against it
    assert int(learn.cskd.source.seen.sum()) == len(small_dls.train)*small_dls.train.bs


def test_mixup_with_the_cache_stores_the_logits_of_mixed_anchors(small_dls):
    "What the callback page documents: with MixUp the cache's rows are the model's logits on the mixed anchors"
    model = nn.Sequential(nn.Flatten(), nn.Linear(3*16*16, 10))         # deterministic: logits = W x + b
    class Spy(Callback):
        order, run_valid = CSKD.order + 0.5, False                    # after CSKD's split, before MixUp mixes
        def before_fit(self): self.steps, self.mixed = 0, 0
        def before_batch(self): self.anchors = self.xb[0].clone()
        def after_loss(self):                                         # after CSKD stored this step's logits
            src, x = self.learn.cskd.source, self.xb[0]
            with torch.no_grad(): on_mixed, on_anchors = model(x), model(self.anchors)
            torch.testing.assert_close(src.cache[src.pos].float(), on_mixed.half().float())
            self.mixed += not torch.allclose(on_mixed, on_anchors, atol=1e-3)
            self.steps += 1
    learn = Learner(small_dls, model, metrics=accuracy, cbs=[CSKD(partner='cache'), MixUp(), Spy()])
    learn.fit(1)
    assert learn.spy.steps == len(small_dls.train) and learn.spy.mixed == learn.spy.steps
