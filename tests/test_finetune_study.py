"""The fine-tuning study's runner (`tools/finetune_study.py`): its two-fit `fine_tune` is fastai's, CS-KD after
unfreeze adds the KD term in the unfrozen fit only, the control runs the partner pass with no KD term, and the
saved results agree with their saved logits (recomputed here with plain numpy)."""
import importlib.util, json, os, subprocess, sys
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch
from fastai.vision.all import *
from cskd_fastai.all import *
from conftest import digits_block, CountForwards
from reference import tiny_cnn, FormulaCheck, ref_ece, softmax

pytestmark = pytest.mark.slow    # the slow tier (the study's runner trains, and runs from the command line): `pytest --all` runs it

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT/'tools'/'finetune_study.py'
RESULTS = ROOT/'nbs'/'tutorials'/'finetune_study'

spec = importlib.util.spec_from_file_location('finetune_study', SCRIPT)
ft = importlib.util.module_from_spec(spec); spec.loader.exec_module(ft)


@pytest.fixture
def dls(digits_path): return digits_block(160).dataloaders(digits_path, bs=32, num_workers=0)

def split_learner(dls, model, **kwargs):
    "A body/head `Learner` that can be frozen like `vision_learner`'s (two parameter groups)"
    return Learner(dls, model, splitter=lambda m: [params(m[:2]), params(m[2:])], **kwargs)


def test_two_fits_are_fastais_fine_tune(digits_path):
    "Same seed, same start: the runner's written-out `fine_tune` ends with the weights of fastai's `Learner.fine_tune`"
    model = tiny_cnn(10)
    ends = []
    for how in ('fastai', 'runner'):
        set_seed(3, reproducible=True)             # before the loaders: they draw their shuffling seed when made
        learn = split_learner(digits_block(160).dataloaders(digits_path, bs=32, num_workers=0), deepcopy(model))
        with learn.no_bar(), learn.no_logging():
            if how == 'fastai': learn.fine_tune(2, 3e-3)
            else: ft.fine_tune(learn, 2, base_lr=3e-3)
        ends.append([p.detach().clone() for p in learn.model.parameters()])
        ends[-1] += [b.clone() for b in learn.model.buffers()]
    assert any(not torch.equal(a, b) for a, b in zip([p for p in model.parameters()], ends[0]))   # it trained
    for a, b in zip(*ends): torch.testing.assert_close(a, b, rtol=0, atol=0)


class PlainLoss(Callback):
    "Checks each training step's loss is the loss function of the batch as loaded (no partners, no KD term)"
    order, run_valid = -2, False
    def before_fit(self): self.checked = 0
    def before_backward(self):
        assert find_bs(self.learn.xb) == find_bs(self.learn.yb) == self.learn.dls.train.bs
        base = self.learn.loss_func(self.learn.pred.detach(), *self.learn.yb)
        torch.testing.assert_close(self.learn.loss_grad.detach().float(), base.float())
        self.checked += 1


def test_cskd_after_unfreeze(dls):
    "Frozen fit: plain cross-entropy, no partners, no `kd_loss` column; unfrozen fit: CE + λT²KL at every step, then gone"
    learn = split_learner(dls, tiny_cnn(10))
    plain, check = PlainLoss(), FormulaCheck()
    learn.add_cb(plain)
    names = []
    class Names(Callback):
        order = Recorder.order+2
        def before_fit(self): names.append(list(self.recorder.metric_names))
    learn.add_cb(Names())
    orig = learn.fit_one_cycle
    def fit_one_cycle(*args, cbs=None, **kwargs):
        if cbs: learn.remove_cb(plain); cbs = cbs + [check]
        return orig(*args, cbs=cbs, **kwargs)
    learn.fit_one_cycle = fit_one_cycle            # only to add the formula check to the second fit
    with learn.no_bar(), learn.no_logging(): ft.fine_tune(learn, 2, unfrozen_cbs=[CSKD()])
    n_batches = len(dls.train)
    assert plain.checked == n_batches                                      # the frozen epoch
    assert check.checked == 2*n_batches and check.lams == [1.]*(2*n_batches)   # every unfrozen step
    assert 'kd_loss' not in names[0] and 'kd_loss' in names[1]
    assert not any(isinstance(cb, CSKD) for cb in learn.cbs) and not hasattr(learn, 'cskd')


def test_control_runs_the_partner_pass_without_a_kd_term(dls):
    "The control: twice the rows through the model in training (anchors + partners), the loss that of the anchors alone"
    learn = split_learner(dls, tiny_cnn(10), cbs=[ft.PartnerPassOnly()])
    check, count = PlainLoss(), CountForwards()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=[check, count])
    assert check.checked == len(dls.train)
    assert count.calls['train'] == 2*count.batches['train'] and count.rows['train'] == 2*len(dls.train)*dls.train.bs


def test_warmup_schedule():
    s = ft.lam_warmup()
    for pct, v in [(0., 0.), (0.15, 0.5), (0.3, 1.), (0.65, 1.), (1., 1.)]: assert abs(float(s(pct)) - v) < 1e-6, pct


def test_run_list_and_cli(tmp_path):
    runs = ft.run_list()
    assert len(runs) == len(set(runs))
    assert runs[:6] == [(m, n, 8, 0) for n in (50, 200) for m in ('ce', 'cskd', 'partner-only')]   # the question first
    for m, n, e, s in runs: assert m in ft.METHODS and n in ft.SIZES and e in ft.SCHEDULES and s in (0, 1, 2)
    env = {k: v for k, v in os.environ.items() if k != 'CSKD_CIFAR10'}
    r = subprocess.run([sys.executable, str(SCRIPT), '--list', '--out', str(tmp_path)], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and f"0 of {len(runs)} done" in r.stdout and 'ce_n050_e8_s0 -' in r.stdout
    r = subprocess.run([sys.executable, str(SCRIPT), '--out', str(tmp_path)], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and '--data' in r.stderr


# ------------------------------------------------------------------------------------------- saved results
def nll_np(z, y):
    z = z - z.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]))

def check_run(js):
    r = json.loads(js.read_text())
    z = np.load(js.with_suffix('.npz'))
    t, h = z['test'].astype(np.float64), z['held'].astype(np.float64)
    y, yh = np.repeat(np.arange(5), r['n_test']//5), np.repeat(np.arange(5), r['n_held']//5)   # stored class by class
    assert t.shape == (r['n_test'], 5) and h.shape == (r['n_held'], 5)
    assert abs(np.mean(t.argmax(1) != y) - r['test_err']) <= 5/r['n_test']            # float16 rounding flips a few
    assert abs(nll_np(t, y) - r['test_nll']) < 5e-3 and abs(ref_ece(softmax(t), y, 15) - r['test_ece']) < 5e-3
    assert abs(nll_np(h/r['temperature'], yh) - min(nll_np(h/T, yh) for T in np.linspace(.5, 5, 451))) < 2e-3
    assert abs(nll_np(t/r['temperature'], y) - r['ts_nll']) < 5e-3
    return r


@pytest.mark.skipif(not RESULTS.exists() or not any(RESULTS.glob('*_s0.json')), reason="fine-tuning study results not present")
def test_saved_results_match_their_logits():
    "Error, NLL, ECE and the temperature's fit, recomputed from every run's saved float16 logits"
    rs = [check_run(f) for f in sorted(RESULTS.glob('*_s[0-9].json'))]
    assert {r['n_test'] for r in rs} == {5000} and {r['n_held'] for r in rs} == {500}


@pytest.mark.skipif(not os.environ.get('CSKD_CIFAR10'), reason="set CSKD_CIFAR10 to CIFAR-10 in URLs.CIFAR's layout")
def test_smoke():
    "The whole pipeline on a few images: pretraining, the runs, files written atomically"
    r = subprocess.run([sys.executable, str(SCRIPT), '--smoke'], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = Path(r.stdout.strip().splitlines()[-1].split(' in ')[-1])
    for f in out.glob('*_s0.json'):
        res = json.loads(f.read_text()); z = np.load(f.with_suffix('.npz'))
        assert z['test'].shape == (res['n_test'], 5) and 0 <= res['test_err'] <= 1
    assert len(list(out.glob('*_s0.json'))) == 4 and not list(out.glob('.*tmp*'))
