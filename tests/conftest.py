"Shared fixtures: small data that ships with the dependencies, and small models, so every test runs on a CPU"
import os
os.environ.setdefault('MPLBACKEND', 'Agg')
import warnings
from copy import deepcopy
import pytest
import torch
from fastai.vision.all import *
from cskd_fastai.all import *
from reference import tiny_cnn, FormulaCheck, CacheCheck, first_logits, rnn_regularizers   # the tests' reference computations

warnings.filterwarnings('ignore', message='.*CUDA is not available.*')
# 1 leaves a core to a background job; under pytest-xdist (`-n`) each worker takes one core
torch.set_num_threads(int(os.environ.get("CSKD_TEST_THREADS", 1 if os.environ.get('PYTEST_XDIST_WORKER') else 2)))


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


@pytest.fixture
def no_fit(monkeypatch):
    "Any fit fails the test: for refusals that must come before training"
    from fastai.learner import Learner
    def fit(self, *a, **k): raise AssertionError("a run trained")
    monkeypatch.setattr(Learner, 'fit', fit)


def cnn_learner(dls, cbs=None, **kwargs):
    "A `Learner` of `tiny_cnn` with accuracy"
    return Learner(dls, tiny_cnn(), metrics=accuracy, cbs=cbs, **kwargs)


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


def pytest_addoption(parser):
    parser.addoption('--all', action='store_true', help='run every tier: the tests marked `slow` too (pyproject.toml '
                     "deselects them by default); the same as -m 'slow or not slow'")


def pytest_configure(config):
    "The markers are in pyproject.toml. `--all` drops the default `-m 'not slow'`; pytest-xdist's workers get the digits written once"
    if config.getoption('all'): config.option.markexpr = ''
    if getattr(config.option, 'numprocesses', None) and not hasattr(config, 'workerinput'):
        digits_folder()     # the default folder the CLI and `compare` use, written once rather than by every worker


def pytest_terminal_summary(terminalreporter, config):
    if config.option.markexpr == 'not slow' and terminalreporter.stats.get('deselected'):
        terminalreporter.write_line("The slow tier was left out (-m 'not slow'): `pytest --all` runs every test.")


def pytest_collection_modifyitems(items):
    "Star imports bring fastcore's `test_eq`, `test_fail`...: collect only the tests defined in each file; skip GPU tests without a GPU"
    items[:] = [it for it in items if not hasattr(it, 'module') or it.function.__module__ == it.module.__name__]
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason='needs a CUDA GPU')
        for it in items:
            if 'gpu' in it.keywords: it.add_marker(skip)
