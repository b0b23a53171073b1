"`compare --out`: runs saved as they end, resumed after an interruption, a changed configuration refused; where the temperature is fitted"
import json
from pathlib import Path
import numpy as np
import pytest
from cskd_fastai.compare import compare
from cskd_fastai.cli import main
from cskd_fastai.compare_runner import RunFailed
from cskd_fastai.compare_store import _atomic_write
from cskd_fastai.datasets import image_folder



def _args(methods=('ce', 'pass', 'ce+ts'), epochs=1, seeds=(0,)):
    return ['compare', '--methods', *methods, '--epochs', str(epochs), '--seeds', *map(str, seeds), '--n-per-class', '10', '--quiet']


def _interrupt_at(monkeypatch, n):
    "Interrupt the `n`-th training run from now"
    from fastai.learner import Learner
    orig, calls = Learner.fit_one_cycle, []
    def fit(self, *a, **k):
        calls.append(1)
        if len(calls) == n: raise KeyboardInterrupt
        return orig(self, *a, **k)
    monkeypatch.setattr(Learner, 'fit_one_cycle', fit)
    return calls


@pytest.mark.slow
def test_resumed_results_equal_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    full, part = tmp_path/'full', tmp_path/'part'
    assert main(_args() + ['--out', str(full)]) == 0
    capsys.readouterr()
    _interrupt_at(monkeypatch, 2)                                    # cross-entropy finishes, the control is interrupted
    assert main(_args() + ['--out', str(part)]) == 130
    assert '1 finished run(s) saved' in capsys.readouterr().err
    # nothing half-written: the finished run's two files and the configuration, no temporary file, no summary
    assert sorted(f.name for f in part.iterdir()) == ['config.json', 'runs']
    assert sorted(f.name for f in (part/'runs').iterdir()) == ['ce-seed0.json', 'ce-seed0.npz']
    monkeypatch.undo()
    calls = _interrupt_at(monkeypatch, 99)                           # count the trainings of the rerun
    assert main(_args() + ['--out', str(part)]) == 0
    out = capsys.readouterr().out
    assert 'cross-entropy, seed 0: finished earlier' in out and len(calls) == 1      # only the control was trained
    a, b = [json.loads((d/'results.json').read_text()) for d in (full, part)]
    assert a['config'] == b['config'] and [r['method'] for r in a['runs']] == [r['method'] for r in b['runs']]
    for ra, rb in zip(a['runs'], b['runs']):
        assert ra.keys() == rb.keys() and (ra['method'], ra['seed']) == (rb['method'], rb['seed'])
        for k in set(ra) - {'method', 'seed', 's_per_epoch'}:
            assert (ra[k] is None and rb[k] is None) or ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), (ra['method'], k)
    pa, pb = np.load(full/'predictions.npz'), np.load(part/'predictions.npz')
    assert sorted(pa.files) == sorted(pb.files)
    for k in pa.files: np.testing.assert_allclose(pa[k], pb[k], rtol=1e-4, atol=1e-5, err_msg=k)
    assert 'cross-entropy + temperature' in out


def test_changed_configuration_is_refused(tmp_path, capsys):
    out = ['--out', str(tmp_path/'res')]
    assert main(_args(methods=('ce',)) + out) == 0
    assert main(_args(methods=('ce',), epochs=2) + out) == 2
    err = capsys.readouterr().err
    assert 'another configuration' in err and 'epochs: 1 there, 2 now' in err
    # more methods and seeds are not a change of configuration: the finished runs are reused
    assert main(_args(methods=('ce', 'ce+ts'), seeds=(0, 1)) + out) == 0
    assert 'cross-entropy, seed 0: finished earlier' in capsys.readouterr().out


def test_atomic_write_leaves_nothing_when_interrupted(tmp_path):
    f = tmp_path/'x.json'
    def half(h): h.write(b'{"half'); raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt): _atomic_write(f, half)
    assert list(tmp_path.iterdir()) == []
    _atomic_write(f, lambda h: h.write(b'{}'))
    assert f.read_text() == '{}'
    with pytest.raises(KeyboardInterrupt): _atomic_write(f, half)
    assert f.read_text() == '{}' and [p.name for p in tmp_path.iterdir()] == ['x.json']     # the old file stays whole


def test_temperature_is_fitted_on_calibration_items_only(monkeypatch):
    "The '+ts' temperature sees the set-aside training images, checked here from the folder and the model, never held-out ones"
    import torch
    from PIL import Image
    import cskd_fastai.compare_runner as C
    seen, orig = [], C.fit_temperature
    monkeypatch.setattr(C, 'fit_temperature', lambda P, y, *a, **k: seen.append((np.array(P), np.array(y))) or orig(P, y, *a, **k))
    res = compare(methods=('ce', 'ce+ts'), epochs=2, seeds=(0,), n_per_class=20, verbose=False)
    root, _ = image_folder()
    train_files, valid_files = set((root/'train').rglob('*.png')), set((root/'valid').rglob('*.png'))
    calib, used = [Path(f) for f in res.items['calib']], [Path(f) for f in res.items['train']]
    assert set(calib) <= train_files and not set(calib) & valid_files and not set(calib) & set(used)
    for c in range(10):                                   # 20% of each class's training images, rounded
        assert sum(f.parent.name == str(c) for f in calib) == round(0.2*len(list((root/'train'/str(c)).glob('*.png'))))
    assert len(seen) == 1
    P, y = seen[0]
    learn = res.learners['ce']
    vocab = list(learn.dls.vocab)
    assert (y == np.array([vocab.index(f.parent.name) for f in calib])).all()
    # the probabilities it was given are the model's on those files, computed here with PIL and the model in eval mode
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert('RGB').resize((32, 32), Image.BILINEAR)).copy())
                     .permute(2, 0, 1).float()/255 for f in calib])
    learn.model.eval()
    with torch.no_grad(): q = torch.softmax(learn.model(x), 1).numpy()
    np.testing.assert_allclose(P, q, atol=1e-4)
    # the recorded temperature minimises the NLL of those probabilities: a bounded 1-d search written here
    from scipy.optimize import minimize_scalar
    L = np.log(np.maximum(P.astype(np.float64), 1e-300))
    def nll(log_t):
        z = L/np.exp(log_t); z = z - z.max(1, keepdims=True)
        return float(-(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(1))).mean())
    best = minimize_scalar(nll, bounds=(np.log(0.01), np.log(100)), method='bounded', options=dict(xatol=1e-10))
    T = res.table.loc['ce+ts', 'temperature']
    assert nll(np.log(T)) <= best.fun + 1e-7 and T == pytest.approx(float(np.exp(best.x)), rel=5e-2)
    assert T != pytest.approx(1., abs=0.05)                       # a fitted temperature, not the identity


def test_a_changed_split_under_the_same_name_is_refused(tmp_path, capsys):
    "The folder's name and every option unchanged, one training image relabelled: the saved runs belong to another split"
    from cskd_fastai.datasets import digits_folder
    root = digits_folder(tmp_path/'digits')
    args = _args(methods=('ce',)) + ['--data', str(root), '--out', str(tmp_path/'res')]
    assert main(args) == 0
    capsys.readouterr()
    f = sorted((root/'train'/'3').glob('*.png'))[-1]      # past the first 10 of its class: only the labels show the change
    f.rename(root/'train'/'5'/f.name)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert 'another configuration' in err and 'split_hash' in err


def test_error_while_training_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    """Bad input is one line before any training; an error raised inside a run is not shortened to one line: a `RunFailed`
    naming the run, the error as its cause, with its traceback"""
    import traceback
    import cskd_fastai.compare_runner as C
    assert main(_args(methods=('ce',)) + ['--lam', '-1']) == 2
    err = capsys.readouterr().err
    assert err.startswith('cskd-fastai: error:') and 'Traceback' not in err and len(err.strip().splitlines()) == 1
    def boom(*a, **k): raise ValueError("boom inside a run")
    monkeypatch.setattr(C, '_measures', boom)
    with pytest.raises(RunFailed, match='boom inside a run') as e: main(_args(methods=('ce',)) + ['--out', str(tmp_path/'r')])
    assert (e.value.method, e.value.seed) == ('ce', 0) and isinstance(e.value.__cause__, ValueError)
    assert any(f.name == 'boom' for f in traceback.extract_tb(e.value.__cause__.__traceback__))     # the traceback reaches the error
    assert 'failed while training' in capsys.readouterr().err
