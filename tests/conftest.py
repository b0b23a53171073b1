"Shared fixtures: small data that ships with the dependencies, and small models, so every test runs on a CPU"
import os
os.environ.setdefault('MPLBACKEND', 'Agg')
import warnings
from copy import deepcopy
import pytest
import torch
from fastai.vision.all import *
from cskd_fastai.all import *
from compat_cases import rnn_regularizers    # fastai's AR and TAR terms, recomputed (also the docs' matrix uses it)

warnings.filterwarnings('ignore', message='.*CUDA is not available.*')
torch.set_num_threads(int(os.environ.get("CSKD_TEST_THREADS", 2)))   # 1 leaves a core to a background job


@pytest.fixture(scope='session')
def digits_path(tmp_path_factory):
    return digits_folder(tmp_path_factory.mktemp('digits'))


def digits_block(n_train=None, **kwargs):
    "DataBlock over the digits folder; `n_train` keeps that many training images (every class kept)"
    def get_items(p):
        fs = get_image_files(p)
        if n_train is None: return fs
        trn = sorted(f for f in fs if f.parent.parent.name == 'train')
        per_class = groupby(trn, lambda f: f.parent.name)
        trn = [f for c in sorted(per_class) for f in per_class[c][:n_train//len(per_class)]]
        return L(trn) + L(sorted(f for f in fs if f.parent.parent.name == 'valid'))
    return DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_items, get_y=parent_label,
                     splitter=GrandparentSplitter(valid_name='valid'), item_tfms=Resize(16), **kwargs)


@pytest.fixture
def small_dls(digits_path):
    "320 training images, 16px, batches of 32, no workers"
    return digits_block(320).dataloaders(digits_path, bs=32, num_workers=0)


def tiny_cnn(n_out=10):
    "A small BatchNorm + dropout CNN: cheap, and exercises both train-mode behaviours"
    return nn.Sequential(ConvLayer(3, 8, stride=2), ConvLayer(8, 16, stride=2), nn.AdaptiveAvgPool2d(1),
                         Flatten(), nn.Dropout(0.2), nn.Linear(16, n_out))


def cnn_learner(dls, cbs=None, **kwargs):
    "A `Learner` of `tiny_cnn` with accuracy"
    return Learner(dls, tiny_cnn(), metrics=accuracy, cbs=cbs, **kwargs)


def _plain(t): return torch.Tensor.as_subclass(t, torch.Tensor) if isinstance(t, torch.Tensor) else t
def first_logits(out): return out[0] if isinstance(out, (tuple, list)) else out


class FormulaCheck(Callback):
    """Each step's loss recomputed without `CSKD`'s own values: before `CSKD` splits the batch, the paired batch, the
    random state, the model's buffers and the attributes of its stateful modules (those with `reset`, e.g. an RNN's
    hidden state) are kept; before the backward pass the partner half is run through the model as it was then (same
    mode, same dropout draws, on stand-in buffers and state, all put back after), and the loss to backpropagate must be
    `loss_func(anchors) + λ T² KL` (+ fastai's RNN regularizers) written out here. `get_logits` picks the logits from the
    model's output (default: the output, or its first element)"""
    order, run_valid = -2, False                       # before CSKD (order -1): sees the whole paired batch
    def __init__(self, tol=1e-4, get_logits=first_logits): self.tol, self.get_logits, self.checked, self.lams = tol, get_logits, 0, []
    def _model(self): return getattr(self.learn.model, 'module', self.learn.model)
    def before_batch(self):
        self.xall = [_plain(x).clone() for x in self.learn.xb]
        self.yall = [_plain(y).clone() for y in self.learn.yb]
        m = self._model()                              # CSKD's partner forward comes next, before the anchors'
        self.bufs = [(mm, k, b.clone()) for mm in m.modules() for k, b in mm._buffers.items() if b is not None]
        self.state = [(mm, {k: v for k, v in vars(mm).items() if not k.startswith('_') and k != 'training'})
                      for mm in m.modules() if callable(getattr(mm, 'reset', None))]
        self.rng = torch.get_rng_state()
    def _partner_logits(self, train, n):
        m = self._model()
        bufs, state = [(mm, k, mm._buffers[k]) for mm, k, _ in self.bufs], [(mm, dict(vars(mm))) for mm, _ in self.state]
        rng, modes = torch.get_rng_state(), [(mm, mm.training) for mm in m.modules()]
        try:
            for mm, k, b in self.bufs: mm._buffers[k] = b.clone()
            for mm, d in self.state: mm.__dict__.update(d)
            if not train: m.eval()
            torch.set_rng_state(self.rng)
            with torch.no_grad(): return _plain(self.get_logits(m(*[x[n:] for x in self.xall]))).float()
        finally:
            for mm, k, b in bufs: mm._buffers[k] = b
            for mm, d in state: mm.__dict__.update(d)
            for mm, t in modes: mm.training = t
            torch.set_rng_state(rng)
    def before_backward(self):
        cb = self.learn.cskd
        lam = float(cb.lam(self.learn.pct_train)) if callable(cb.lam) else cb.lam
        n = len(self.yall[0])//2
        target = self._partner_logits(getattr(cb.source, 'train', True), n)
        pred = self.learn.pred if isinstance(self.learn.pred, torch.Tensor) else self.get_logits(self.learn.pred)
        a, T = _plain(pred.detach()).float(), cb.T
        q, logp = torch.softmax(target/T, 1), torch.log_softmax(a/T, 1)
        kl = (q*(q.clamp_min(1e-30).log() - logp)).sum(1).mean()
        base = self.learn.loss_func(self.learn.pred.detach() if isinstance(self.learn.pred, torch.Tensor) else self.learn.pred,
                                    *[y[:n] for y in self.yall]) + rnn_regularizers(self.learn)
        torch.testing.assert_close(_plain(self.learn.loss_grad.detach()).float(), _plain(base + lam*T**2*kl).float(),
                                   rtol=self.tol, atol=self.tol)
        self.checked += 1; self.lams.append(lam)


def fit_ok(learn, n=1, method='fit', **kwargs):
    "Fit, then check the loss is finite, the `kd_loss` column is there and positive, and the metrics are put back"
    getattr(learn, method)(n, **kwargs)
    vals = learn.recorder.values[-1]
    assert np.isfinite(vals[0]) and learn.recorder.metric_names[-2] == 'kd_loss' and vals[-1] > 0
    assert len(learn.metrics) == 1
    return learn


class CountForwards(Callback):
    "Count model calls and the rows they see, per phase"
    order = -20
    def before_fit(self):
        self.calls = {'train': 0, 'valid': 0}; self.rows = {'train': 0, 'valid': 0}; self.batches = {'train': 0, 'valid': 0}
        if not hasattr(self, 'hook'): self.hook = self.learn.model.register_forward_pre_hook(self._pre)
    def _pre(self, m, inp):
        ph = 'train' if self.learn.training else 'valid'
        self.calls[ph] += 1; self.rows[ph] += inp[0].shape[0]
    def after_batch(self): self.batches['train' if self.training else 'valid'] += 1


def pytest_configure(config):
    config.addinivalue_line('markers', 'gpu: needs a CUDA GPU (skipped without one)')


def pytest_collection_modifyitems(items):
    "Star imports bring fastcore's `test_eq`, `test_fail`...: collect only the tests defined in each file; skip GPU tests without a GPU"
    items[:] = [it for it in items if not hasattr(it, 'module') or it.function.__module__ == it.module.__name__]
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason='needs a CUDA GPU')
        for it in items:
            if 'gpu' in it.keywords: it.add_marker(skip)
