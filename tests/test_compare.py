"The `cskd-fastai compare` command and the `compare` runner, end to end on the bundled digits"
import json, os, re, shutil, subprocess, sys, tarfile
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
from cskd_fastai.compare import compare, image_folder, results_table
from cskd_fastai.cli import main

EXE = Path(sys.executable).parent/'cskd-fastai'


def _run(*args, env=None):
    env = {**os.environ, 'MPLBACKEND': 'Agg', **(env or {})}
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, env=env, timeout=600)


def test_help(capsys):
    with pytest.raises(SystemExit) as e: main(['--help'])
    assert e.value.code == 0 and 'compare' in capsys.readouterr().out
    r = _run('compare', '--help'); assert r.returncode == 0           # the installed command itself
    for opt in ['--data', '--arch', '--epochs', '--bs', '--size', '--lam', '--T', '--seeds', '--out', '--methods', '--calib-pct',
                '--quiet', 'CSV']:
        assert opt in r.stdout, opt
    assert 'Warning' not in r.stderr, r.stderr                # no third-party notice (e.g. torch.jit.script's)


def test_cli_defaults_are_compare_defaults():
    "The command line's defaults are read from `compare`'s signature, not repeated"
    import inspect
    from cskd_fastai.cli import _parser
    a = vars(_parser().parse_args(['compare'])); a.pop('command')
    sig = inspect.signature(compare).parameters
    assert set(a) == set(sig) - {'learner'}
    for k, v in a.items():
        d = sig[k].default
        assert v == (list(d) if isinstance(d, tuple) else d), k


@pytest.mark.slow
def test_default_one_epoch_writes_results(tmp_path):
    out = tmp_path/'res'
    r = _run('compare', '--epochs', '1', '--seeds', '0', '--out', str(out), '--quiet')
    assert r.returncode == 0, r.stderr
    text = ' '.join(r.stdout.split())
    assert 'cross-entropy' in text and 'CS-KD' in text and "'valid' split" in text
    assert '300 training items' in text                   # the bundled default keeps 30 images a class
    # the report: the table of methods, the paired differences (one seed: no interval), then the bottom line, last
    for s in ['top-1 error (%)', 'NLL', 'ECE (%)', 'CS-KD vs cross-entropy', 'The KD term: CS-KD vs partner pass',
              'The partner pass: partner pass', 'CS-KD vs cross-entropy + temperature',
              'CS-KD + temperature vs cross-entropy + temperature', 'one seed, so no interval', 'One seed']:
        assert s in text, s
    paras = r.stdout.strip().split('\n\n')
    assert paras[-1].startswith('Bottom line:') and 'report.html' in paras[0]
    assert max(map(len, r.stdout.splitlines())) <= 100
    assert not re.search(r'default\D{0,20}\d+ epochs|\d+ epochs\D{0,20}default', r.stdout)   # the output names no default run length
    assert not re.search(r'^  .*\b(better|worse|no clear difference)$', r.stdout, re.M)     # one seed: no verdict on a measure
    names = {f.name for f in out.iterdir()}
    assert names == {'config.json', 'runs', 'results.json', 'results.csv', 'predictions.npz', 'curves.csv', 'reliability.png', 'curves.png',
                     'report.html'}
    js = json.loads((out/'results.json').read_text())
    assert [s['method'] for s in js['summary']] == ['ce', 'pass', 'cskd', 'ce+ts', 'cskd+ts'] and len(js['runs']) == 5
    for s in js['summary']:
        assert 0 <= s['top1_err'] <= 1 and s['nll'] > 0 and 0 <= s['ece'] <= 1 and s['s_per_epoch'] > 0
    preds = np.load(out/'predictions.npz')
    for i, m in enumerate(['ce', 'pass', 'cskd', 'ce+ts', 'cskd+ts']):
        p, t = preds[f'{m}/0/probs'], preds[f'{m}/0/targs']
        assert p.shape == (len(t), 10) and np.allclose(p.sum(1), 1, atol=1e-4)
        # the recorded error and NLL are those of the saved predictions
        assert abs((p.argmax(1) != t).mean() - js['summary'][i]['top1_err']) < 1e-6
        assert js['summary'][i]['nll'] == pytest.approx(-np.log(p[np.arange(len(t)), t].astype(np.float64)).mean(), rel=1e-4)
    # a temperature changes no prediction
    assert (preds['ce+ts/0/probs'].argmax(1) == preds['ce/0/probs'].argmax(1)).all()


def test_seeds_give_mean_and_std_and_same_seed_reproduces():
    import statistics
    res = compare(methods=('ce',), epochs=1, seeds=(0, 1), n_per_class=30, calib_pct=0, verbose=False)
    assert res.table.loc['ce', 'n_seeds'] == 2
    # each seed's NLL and error from its saved predictions, computed here, then mean and sample std by hand
    preds = res.preds
    nlls, errs = [], []
    for seed in (0, 1):
        p, t = preds[f'ce/{seed}/probs'].astype(np.float64), preds[f'ce/{seed}/targs']
        nlls.append(float(-np.log(np.maximum(p[np.arange(len(t)), t], 1e-12)).mean()))
        errs.append(float((p.argmax(1) != t).mean()))
    assert res.table.loc['ce', 'nll'] == pytest.approx(statistics.mean(nlls), rel=1e-4)
    assert res.table.loc['ce', 'nll_std'] == pytest.approx(statistics.stdev(nlls), rel=1e-3, abs=1e-6)
    assert res.table.loc['ce', 'top1_err'] == pytest.approx(statistics.mean(errs), abs=1e-6)
    again = compare(methods=('ce',), epochs=1, seeds=(1,), n_per_class=30, calib_pct=0, verbose=False)
    assert again.table.loc['ce', 'nll'] == pytest.approx(nlls[1], rel=1e-4)
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


@pytest.mark.slow
def test_tgz_with_test_split_says_where_numbers_come_from(tmp_path, monkeypatch):
    monkeypatch.setenv('CSKD_FASTAI_CACHE', str(tmp_path/'cache'))
    arc = _tiny_archive(tmp_path)
    r = _run('compare', '--data', str(arc), '--epochs', '1', '--bs', '16', '--methods', 'cskd', '--quiet',
             env={'CSKD_FASTAI_CACHE': str(tmp_path/'cache')})
    assert r.returncode == 0, r.stderr
    # 6 training images a class: one of each class (20%, rounded) is set aside to fit temperatures
    text = ' '.join(r.stdout.split())
    assert "'test' split" in text and '50 training items, 10 calibration items' in text and '60 held-out items' in text
    assert (tmp_path/'cache'/'mini'/'.complete').exists()


@pytest.mark.parametrize('make, msg', [
    (lambda d: d/'missing', 'does not exist'),
    (lambda d: (d/'x.txt').write_text('hi') and d/'x.txt', 'not a .tgz'),
    (lambda d: d, 'no `train` folder'),
])
def test_bad_data_is_a_clear_error(tmp_path, make, msg, monkeypatch, capsys, no_fit):
    monkeypatch.chdir(tmp_path)
    assert main(['compare', '--data', str(make(tmp_path)), '--epochs', '1', '--quiet']) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1, err


def test_bad_hyperparameter_fails_before_training(tmp_path, monkeypatch, capsys, no_fit):
    monkeypatch.chdir(tmp_path)
    assert main(['compare', '--lam', '-1', '--quiet']) == 2
    assert '`--lam`' in capsys.readouterr().err


BAD = [(['--bs', '0'], '--bs'), (['--bs', '1', '--methods', 'cskd'], '--bs'), (['--size', '0'], '--size'),
       (['--n-heldout-per-class', '0'], '--n-heldout-per-class'), (['--workers', '-1'], '--workers'),
       (['--n-bins', '0'], '--n-bins'), (['--n-per-class', '0'], '--n-per-class'), (['--lr', '-1'], '--lr'),
       (['--lr', '0'], '--lr'), (['--lr', 'nan'], '--lr'), (['--lr', 'inf'], '--lr'), (['--epochs', '0'], '--epochs'),
       (['--n-per-class', '5'], '--n-per-class'),            # 50 training items, batch 64: no step would be taken
       (['--n-per-class', '5', '--bs', '51'], '--bs'), (['--calib-pct', '1'], '--calib-pct'), (['--valid-pct', '0'], '--valid-pct'),
       (['--T', '0'], '--T'), (['--arch', 'nonet'], '--arch'), (['--seeds', '0', '0'], 'Seeds must differ')]

@pytest.mark.parametrize('args, name', BAD, ids=[' '.join(a) for a, _ in BAD])
def test_bad_input_is_one_line_before_training(args, name, capsys, no_fit):
    "Each bad option: exit status 2 and one line naming it, and no learner is fitted (a fit would fail the test)"
    assert main(['compare', *args, '--quiet']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith('cskd-fastai: error:'), err
    assert (f'`{name}`' if name.startswith('--') else name) in err, err


def test_out_naming_a_file_is_refused(tmp_path, capsys, no_fit):
    f = tmp_path/'results.txt'; f.write_text('mine')
    assert main(['compare', '--out', str(f), '--quiet']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and '`--out`' in err and f.read_text() == 'mine'


def test_interrupt_before_any_run_finished(tmp_path, monkeypatch, capsys):
    from fastai.learner import Learner
    def boom(self, *a, **k): raise KeyboardInterrupt
    monkeypatch.setattr(Learner, 'fit_one_cycle', boom)
    out = tmp_path/'res'
    assert main(['compare', '--epochs', '1', '--n-per-class', '20', '--out', str(out), '--quiet']) == 130
    assert 'no run had finished' in capsys.readouterr().err
    assert not (out/'runs').exists() and not (out/'results.json').exists()


@pytest.mark.slow
def test_cache_method_runs():
    "`--methods cskd-cache` is `CSKD(partner='cache')`: a row of the table, with a KD column in its curves"
    res = compare(methods=('cskd', 'cskd-cache'), epochs=2, n_per_class=30, seeds=(0,), verbose=False)
    assert res.methods == ['cskd', 'cskd-cache'] and res.table.loc['cskd-cache', 'name'] == 'CS-KD (cache)'
    assert np.isfinite(res.table.loc['cskd-cache', ['top1_err', 'nll', 'ece']].astype(float)).all()
    curves = res.curves['cskd-cache'][0]
    assert 'kd_loss' in curves and curves['kd_loss'].iloc[-1] > 0


def test_train_error_and_confidence_gap_are_what_the_predictions_say():
    "The regime columns: training error (unaugmented, eval mode) and mean confidence minus accuracy on the held-out split"
    res = compare(methods=('ce',), epochs=2, n_per_class=20, seeds=(0,), verbose=False)
    p, t = res.preds['ce/0/probs'].astype(np.float64), res.preds['ce/0/targs']
    assert res.table.loc['ce', 'conf_gap'] == pytest.approx(p.max(1).mean() - (p.argmax(1) == t).mean(), abs=1e-5)
    # the training error, computed here without fastai's pipeline: each training PNG read and resized with PIL
    # (what Resize(32) does to these square images; no Normalize, the model is not pretrained), the model in eval mode
    import torch
    from PIL import Image
    learn = res.learners['ce']
    items, vocab = learn.dls.train_ds.items, list(learn.dls.vocab)
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert('RGB').resize((32, 32), Image.BILINEAR)).copy())
                     .permute(2, 0, 1).float()/255 for f in items])
    y = torch.tensor([vocab.index(f.parent.name) for f in items])
    learn.model.eval()
    with torch.no_grad(): q = learn.model(x)
    assert 0 <= res.table.loc['ce', 'train_err'] <= 1 and len(y) == 200
    assert res.table.loc['ce', 'train_err'] == pytest.approx(float((q.argmax(1) != y).float().mean()), abs=1e-6)


def test_predictions_keep_probabilities_below_float32s_range():
    "A logit 150 below the top one: its probability (e^-150) is kept, so the '+ts' temperature sees the model's real log-odds"
    import torch
    from torch import nn
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.torch_core import TensorBase
    from cskd_fastai.compare_runner import _preds
    x = torch.tensor([[150., 0., 10.], [0., 30., 0.]])
    y = torch.tensor([1, 1])
    dl = DataLoaders.from_dsets(list(zip(x, y)), list(zip(x, y)), bs=2, device='cpu').valid
    model = nn.Linear(3, 3)
    with torch.no_grad(): model.weight.copy_(torch.eye(3)); model.bias.zero_()      # the logits are the inputs
    learn = Learner(DataLoaders(dl, dl), model, loss_func=nn.CrossEntropyLoss())
    with learn.no_bar(): P, t = _preds(learn, dl)
    assert (t == [1, 1]).all()
    x64 = x.double().numpy()
    expected = x64 - (x64.max(1, keepdims=True) + np.log(np.exp(x64 - x64.max(1, keepdims=True)).sum(1, keepdims=True)))
    np.testing.assert_allclose(np.log(P), expected, rtol=1e-6, atol=1e-9)     # log p = -150 for the first item's class 1


def test_held_out_images_in_memory_change_nothing(monkeypatch, tmp_path):
    "Image folders: the held-out items kept in memory give the batches, and the results, of fastai's own loader"
    import torch
    import cskd_fastai.compare_data as C
    kw = dict(methods=('ce', 'ce+ts'), epochs=1, seeds=(0,), n_per_class=10, verbose=False)
    args = (None, 0.2, None, None, 64, 32, None, 0.2, None)
    kept = C.ComparisonData(*args).dls(0)
    assert isinstance(kept.valid.dataset, C._Items)
    a = compare(**kw)
    import matplotlib; matplotlib.use('Agg')
    learn = a.learners['ce']
    assert not isinstance(learn.dls.valid.dataset, C._Items)      # the learner handed back reads files again
    f = Path(learn.dls.valid.dataset.items[0])
    with learn.no_bar():
        learn.show_results(max_n=2)
        assert learn.predict(f)[0] in learn.dls.vocab
    learn.export(tmp_path/'learner.pkl')
    assert C.ComparisonData(*args).fingerprint == C.ComparisonData(*args).fingerprint
    monkeypatch.setattr(C, '_HELD_OUT_BYTES', 0)                  # too big to keep: fastai's loader as it is
    plain = C.ComparisonData(*args).dls(0)
    assert not isinstance(plain.valid.dataset, C._Items) and len(plain.valid.dataset) == len(kept.valid.dataset)
    for x, y in zip(kept.valid.new(shuffle=False), plain.valid.new(shuffle=False)):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    b = compare(**kw)
    for k, v in a.preds.items(): np.testing.assert_allclose(v, b.preds[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert a.table.loc['ce+ts', 'temperature'] == pytest.approx(b.table.loc['ce+ts', 'temperature'], rel=1e-4)


def test_calibration_items_get_the_learners_batch_transforms(monkeypatch):
    """A learner that adds a batch transform (as a pretrained `vision_learner` adds `Normalize`): the '+ts' temperature and the
    training error see the items through it, checked with PIL, the statistics and the model"""
    import torch
    from PIL import Image
    from fastai.vision.all import vision_learner, Normalize, imagenet_stats
    import cskd_fastai.compare_runner as C
    seen, orig = [], C.fit_temperature
    monkeypatch.setattr(C, 'fit_temperature', lambda P, y, *a, **k: seen.append(np.array(P)) or orig(P, y, *a, **k))
    def learner(dls, **kw):
        dls.add_tfms([Normalize.from_stats(*imagenet_stats)], 'after_batch')
        return vision_learner(dls, 'resnet10t', pretrained=False, **kw)
    res = compare(methods=('ce', 'ce+ts'), epochs=1, seeds=(0,), n_per_class=10, learner=learner, verbose=False)
    calib = [Path(f) for f in res.items['calib']]
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in imagenet_stats)
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert('RGB').resize((32, 32), Image.BILINEAR)).copy())
                     .permute(2, 0, 1).float()/255 for f in calib])
    learn = res.learners['ce']
    learn.model.eval()
    with torch.no_grad(): q = torch.softmax(learn.model((x - mean)/std), 1).numpy()
    assert len(seen) == 1
    np.testing.assert_allclose(seen[0], q, atol=1e-4)
