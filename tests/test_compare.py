"The `cskd-fastai compare` command and the `compare` runner, end to end on the bundled digits"
import json, os, shutil, subprocess, sys, tarfile
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
from cskd_fastai.compare import compare, main, image_folder, results_table

EXE = Path(sys.executable).parent/'cskd-fastai'


def _run(*args, env=None):
    env = {**os.environ, 'MPLBACKEND': 'Agg', **(env or {})}
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, env=env, timeout=600)


def test_help():
    r = _run('--help'); assert r.returncode == 0 and 'compare' in r.stdout
    r = _run('compare', '--help'); assert r.returncode == 0
    for opt in ['--data', '--arch', '--epochs', '--bs', '--size', '--lam', '--T', '--seeds', '--out', '--methods']:
        assert opt in r.stdout, opt


def test_default_one_epoch_writes_results(tmp_path):
    out = tmp_path/'res'
    r = _run('compare', '--epochs', '1', '--seeds', '0', '--out', str(out), '--quiet')
    assert r.returncode == 0, r.stderr
    assert 'cross-entropy' in r.stdout and 'CS-KD' in r.stdout and "'valid' split" in r.stdout
    assert '300 training' in r.stdout                      # the bundled default keeps 30 images a class
    for s in ['CS-KD vs cross-entropy, top-1 error:', 'CS-KD vs cross-entropy, NLL:', 'CS-KD vs cross-entropy, ECE:',
              'Regime: cross-entropy ends at', 'regime_study']: assert s in r.stdout, s
    names = {f.name for f in out.iterdir()}
    assert names == {'results.json', 'results.csv', 'predictions.npz', 'curves.csv', 'reliability.png', 'curves.png'}
    js = json.loads((out/'results.json').read_text())
    assert [s['method'] for s in js['summary']] == ['ce', 'cskd'] and len(js['runs']) == 2
    for s in js['summary']:
        assert 0 <= s['top1_err'] <= 1 and s['nll'] > 0 and 0 <= s['ece'] <= 1 and s['s_per_epoch'] > 0
    preds = np.load(out/'predictions.npz')
    p, t = preds['cskd/0/probs'], preds['cskd/0/targs']
    assert p.shape == (len(t), 10) and np.allclose(p.sum(1), 1, atol=1e-4)
    # the recorded error is the error of the saved predictions
    err = (p.argmax(1) != t).mean()
    assert abs(err - js['summary'][1]['top1_err']) < 1e-6


def test_seeds_give_mean_and_std_and_same_seed_reproduces():
    import statistics
    res = compare(methods=('ce',), epochs=1, seeds=(0, 1), n_per_class=30, verbose=False)
    assert res.loc['ce', 'n_seeds'] == 2
    # each seed's NLL and error from its saved predictions, computed here, then mean and sample std by hand
    preds = res.attrs['preds']
    nlls, errs = [], []
    for seed in (0, 1):
        p, t = preds[f'ce/{seed}/probs'].astype(np.float64), preds[f'ce/{seed}/targs']
        nlls.append(float(-np.log(np.maximum(p[np.arange(len(t)), t], 1e-12)).mean()))
        errs.append(float((p.argmax(1) != t).mean()))
    assert res.loc['ce', 'nll'] == pytest.approx(statistics.mean(nlls), rel=1e-4)
    assert res.loc['ce', 'nll_std'] == pytest.approx(statistics.stdev(nlls), rel=1e-3, abs=1e-6)
    assert res.loc['ce', 'top1_err'] == pytest.approx(statistics.mean(errs), abs=1e-6)
    again = compare(methods=('ce',), epochs=1, seeds=(1,), n_per_class=30, verbose=False)
    assert again.loc['ce', 'nll'] == pytest.approx(nlls[1], rel=1e-4)
    t = results_table(res)
    assert '±' in t.loc['cross-entropy', 'NLL']


def _tiny_archive(tmp_path, valid_name='test'):
    "A .tgz of a few digits per class in the layout of `untar_data(URLs.CIFAR)` (one folder above train/test)"
    src, _ = image_folder()
    root = tmp_path/'src'/'mini'
    for split, dst in [('train', 'train'), ('valid', valid_name)]:
        for c in (src/split).iterdir():
            (root/dst/c.name).mkdir(parents=True)
            for f in sorted(c.iterdir())[:6]: shutil.copy(f, root/dst/c.name/f.name)
    arc = tmp_path/'mini.tgz'
    with tarfile.open(arc, 'w:gz') as tf: tf.add(root, arcname='mini')
    return arc


def test_tgz_with_test_split_says_where_numbers_come_from(tmp_path, monkeypatch):
    monkeypatch.setenv('CSKD_FASTAI_CACHE', str(tmp_path/'cache'))
    arc = _tiny_archive(tmp_path)
    r = _run('compare', '--data', str(arc), '--epochs', '1', '--bs', '16', '--methods', 'cskd', '--quiet',
             env={'CSKD_FASTAI_CACHE': str(tmp_path/'cache')})
    assert r.returncode == 0, r.stderr
    assert "'test' split" in r.stdout and '60 training / 60' in r.stdout
    assert (tmp_path/'cache'/'mini'/'.complete').exists()


@pytest.mark.parametrize('make, msg', [
    (lambda d: d/'missing', 'does not exist'),
    (lambda d: (d/'x.txt').write_text('hi') and d/'x.txt', 'not a .tgz'),
    (lambda d: d, 'no `train` folder'),
])
def test_bad_data_is_a_clear_error(tmp_path, make, msg):
    r = _run('compare', '--data', str(make(tmp_path)), '--epochs', '1')
    assert r.returncode == 2 and msg in r.stderr and 'Traceback' not in r.stderr


def test_bad_hyperparameter_fails_before_training():
    r = _run('compare', '--lam', '-1')
    assert r.returncode == 2 and '`lam`' in r.stderr


def test_interrupt_writes_nothing(tmp_path, monkeypatch, capsys):
    from fastai.learner import Learner
    calls = []
    def boom(self, *a, **k):
        calls.append(1)
        if len(calls) == 2: raise KeyboardInterrupt        # the second training run is interrupted
        return orig(self, *a, **k)
    orig = Learner.fit_one_cycle
    monkeypatch.setattr(Learner, 'fit_one_cycle', boom)
    out = tmp_path/'res'
    assert main(['compare', '--epochs', '1', '--n-per-class', '20', '--out', str(out), '--quiet']) == 130
    assert not out.exists() and not [p for p in tmp_path.iterdir()]
    assert 'nothing was written' in capsys.readouterr().err


def test_cache_method_runs():
    "`--methods cskd-cache` is `CSKD(partner='cache')`: a row of the table, with a KD column in its curves"
    res = compare(methods=('cskd', 'cskd-cache'), epochs=2, n_per_class=30, seeds=(0,), verbose=False)
    assert list(res.index) == ['cskd', 'cskd-cache'] and res.loc['cskd-cache', 'name'] == 'CS-KD (cache)'
    assert np.isfinite(res.loc['cskd-cache', ['top1_err', 'nll', 'ece']].astype(float)).all()
    curves = res.attrs['curves']['cskd-cache'][0]
    assert 'kd_loss' in curves and curves['kd_loss'].iloc[-1] > 0


def test_train_error_and_confidence_gap_are_what_the_predictions_say():
    "The regime columns: training error (unaugmented, eval mode) and mean confidence minus accuracy on the held-out split"
    res = compare(methods=('ce',), epochs=2, n_per_class=20, seeds=(0,), verbose=False)
    p, t = res.attrs['preds']['ce/0/probs'].astype(np.float64), res.attrs['preds']['ce/0/targs']
    assert res.loc['ce', 'conf_gap'] == pytest.approx(p.max(1).mean() - (p.argmax(1) == t).mean(), abs=1e-5)
    # the training error, computed here without fastai's pipeline: each training PNG read and resized with PIL
    # (what Resize(32) does to these square images; no Normalize, the model is not pretrained), the model in eval mode
    import torch
    from PIL import Image
    learn = res.attrs['interps']['ce'].learn
    items, vocab = learn.dls.train_ds.items, list(learn.dls.vocab)
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert('RGB').resize((32, 32), Image.BILINEAR)).copy())
                     .permute(2, 0, 1).float()/255 for f in items])
    y = torch.tensor([vocab.index(f.parent.name) for f in items])
    learn.model.eval()
    with torch.no_grad(): q = learn.model(x)
    assert 0 <= res.loc['ce', 'train_err'] <= 1 and len(y) == 200
    assert res.loc['ce', 'train_err'] == pytest.approx(float((q.argmax(1) != y).float().mean()), abs=1e-6)
