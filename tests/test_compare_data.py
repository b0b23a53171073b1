"`compare` on the user's own data: a CSV of image files and labels, a tabular and a text `DataLoaders`, a function of the seed"
import os, shutil, subprocess, sys
from functools import partial
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
from cskd_fastai.compare import compare
from cskd_fastai.datasets import image_folder

EXE = Path(sys.executable).parent/'cskd-fastai'


def _run(*args):
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, env={**os.environ, 'MPLBACKEND': 'Agg'}, timeout=600)


def _csv_set(tmp_path, n=12, valid_col=False):
    "`n` digits a class copied flat into `tmp_path/imgs`, listed in labels.csv (file name, label[, is_valid])"
    src, _ = image_folder()
    rows = []
    for c in sorted((src/'train').iterdir()):
        for i, f in enumerate(sorted(c.iterdir())[:n]):
            dst = tmp_path/'imgs'/f'{c.name}_{f.name}'
            dst.parent.mkdir(exist_ok=True); shutil.copy(f, dst)
            rows.append(dict(fname=f'imgs/{dst.name}', label=f'digit{c.name}', **({'is_valid': i < 4} if valid_col else {})))
    pd.DataFrame(rows).to_csv(tmp_path/'labels.csv', index=False)
    return tmp_path/'labels.csv'


@pytest.mark.slow
def test_csv_with_valid_column(tmp_path):
    csv = _csv_set(tmp_path, valid_col=True)
    r = _run('compare', '--data', str(csv), '--epochs', '1', '--bs', '16', '--methods', 'ce', 'ce+ts', '--seeds', '0', '--quiet')
    assert r.returncode == 0, r.stderr
    # 8 training rows a class: 2 (20%, rounded) set aside for the temperature, 6 trained on; the 4 `is_valid` rows evaluate
    text = ' '.join(r.stdout.split())
    assert "labels.csv: 60 training items, 20 calibration items" in text and "40 held-out items (the 'valid' split)" in text, r.stdout
    assert 'cross-entropy + temperature' in text


@pytest.mark.slow
def test_csv_without_valid_column_holds_out_a_fixed_share(tmp_path):
    csv = _csv_set(tmp_path)
    res = compare(csv, methods=('ce',), epochs=1, bs=16, seeds=(0,), calib_pct=0, verbose=False)
    c = res.config
    assert (c['n_train'], c['n_heldout'], c['valid_pct']) == (96, 24, 0.2)        # 120 rows, 20% held out
    again = compare(csv, methods=('ce',), epochs=1, bs=16, seeds=(1,), calib_pct=0, verbose=False)
    assert set(res.items['train']) == set(again.items['train'])    # the split does not follow the run's seed


def test_csv_errors(tmp_path, monkeypatch, capsys, no_fit):
    from cskd_fastai.cli import main
    monkeypatch.chdir(tmp_path)
    csv = _csv_set(tmp_path, n=2)
    df = pd.read_csv(csv); df.loc[0, 'fname'] = 'imgs/missing.png'; df.to_csv(csv, index=False)
    assert main(['compare', '--data', str(csv), '--epochs', '1', '--quiet']) == 2
    err = capsys.readouterr().err
    assert 'not under' in err and 'missing.png' in err
    pd.DataFrame(dict(fname=['a.png'])).to_csv(csv, index=False)
    assert main(['compare', '--data', str(csv), '--epochs', '1', '--quiet']) == 2
    assert 'first column' in capsys.readouterr().err


def _wine_dls(seed=0, bs=32):
    from sklearn.datasets import load_wine
    from fastai.tabular.all import TabularDataLoaders, Normalize, CategoryBlock
    df = load_wine(as_frame=True).frame
    df['target'] = df['target'].map({0: 'a', 1: 'b', 2: 'c'})
    valid_idx = list(range(0, len(df), 4))
    return TabularDataLoaders.from_df(df, procs=[Normalize], cont_names=[c for c in df if c != 'target'], y_names='target',
                                      y_block=CategoryBlock(), valid_idx=valid_idx, bs=bs, num_workers=0), set(valid_idx)


def test_tabular_dataloaders():
    from fastai.tabular.all import tabular_learner
    dls, valid_idx = _wine_dls()
    res = compare(dls, learner=partial(tabular_learner, layers=[32]), methods=('ce', 'pass', 'cskd', 'ce+ts', 'cskd+ts'),
                  epochs=3, lr=1e-2, seeds=(0, 1), verbose=False)
    assert res.methods == ['ce', 'pass', 'cskd', 'ce+ts', 'cskd+ts']
    assert np.isfinite(res.table[['top1_err', 'nll', 'ece', 'train_err']].to_numpy(float)).all()
    assert (res.table.loc[['ce+ts', 'cskd+ts'], 'temperature'] > 0).all()
    # the calibration rows are training rows: never held-out, never trained on; 20% of each class of the training rows
    calib, train = set(res.items['calib']), set(res.items['train'])
    assert not calib & valid_idx and not calib & train and not train & valid_idx
    n_train_rows = 178 - len(valid_idx)
    assert len(calib) + len(train) == n_train_rows and len(res.preds['ce/0/targs']) == len(valid_idx)
    from sklearn.datasets import load_wine
    y = load_wine().target
    for c in range(3): assert sum(y[i] == c for i in calib) == round(0.2*sum(y[i] == c for i in range(178) if i not in valid_idx))
    c = res.config
    assert c['learner'] == 'tabular_learner' and c['arch'] is None and c['size'] is None
    from cskd_fastai.compare import report
    text = ' '.join(report(res).split())
    assert 'The KD term: CS-KD vs partner pass' in text and '2 seeds' in text and 'the learner tabular_learner' in text
    assert text.count('Bottom line:') == 1


def test_function_of_the_seed():
    "`data` as a function of the seed: called per run, after the seed is set"
    from fastai.tabular.all import tabular_learner
    calls = []
    def make(seed): calls.append(seed); return _wine_dls(bs=16)[0]
    res = compare(make, learner=partial(tabular_learner, layers=[16]), methods=('ce', 'ce+ts'), epochs=1, seeds=(3, 4), verbose=False)
    assert sorted(set(calls)) == [0, 3, 4] and res.table.loc['ce', 'n_seeds'] == 2      # 0: the split is read once, first


def test_function_of_the_seed_must_keep_the_split():
    "A function whose split follows the seed is refused before that seed trains: the calibration items are carved once"
    import numpy as np
    from sklearn.datasets import load_wine
    from fastai.tabular.all import TabularDataLoaders, Normalize, CategoryBlock, tabular_learner
    df = load_wine(as_frame=True).frame
    df['target'] = df['target'].map({0: 'a', 1: 'b', 2: 'c'})
    def make(seed):
        valid_idx = np.random.default_rng(seed).permutation(len(df))[:45].tolist()     # a split that moves with the seed
        return TabularDataLoaders.from_df(df, procs=[Normalize], cont_names=[c for c in df if c != 'target'], y_names='target',
                                          y_block=CategoryBlock(), valid_idx=valid_idx, bs=16, num_workers=0)
    with pytest.raises(ValueError, match=r'`data\(1\)` returned other training or held-out items'):
        compare(make, learner=partial(tabular_learner, layers=[8]), methods=('ce',), epochs=1, seeds=(0, 1), verbose=False)


def test_own_data_needs_a_learner():
    with pytest.raises(ValueError, match='pass `learner=`'): compare(_wine_dls()[0], epochs=1, seeds=(0,))


def test_dataloaders_without_items():
    "A `DataLoaders` over plain tensors trains as it is; the `+ts` rows, which need a split of its items, are refused clearly"
    import torch
    from torch.utils.data import TensorDataset
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(120, 4, generator=g), torch.arange(120) % 3
    x[:, 0] += y
    dls = DataLoaders.from_dsets(TensorDataset(x[:90], y[:90]), TensorDataset(x[90:], y[90:]), bs=16)
    make = lambda dls, **kw: Learner(dls, torch.nn.Linear(4, 3), loss_func=torch.nn.CrossEntropyLoss(), **kw)
    with pytest.raises(ValueError, match='`calib_pct`'): compare(dls, learner=make, methods=('ce', 'ce+ts'), epochs=1, seeds=(0,), verbose=False)
    res = compare(dls, learner=make, methods=('ce',), calib_pct=0, epochs=1, seeds=(0,), verbose=False)
    assert np.isfinite(res.table.loc['ce', 'nll']) and np.isnan(res.table.loc['ce', 'train_err'])


def _text_dls():
    from fastai.text.all import TextDataLoaders, Tokenizer, BaseTokenizer
    rng = np.random.default_rng(0)
    pos, neg = 'good great fine nice happy glad'.split(), 'bad awful poor sad ugly grim'.split()
    labels = np.arange(160) % 2
    texts = [' '.join(rng.choice(pos if c else neg, 5)) + ' ' + ' '.join(rng.choice(pos + neg, 3)) for c in labels]
    df = pd.DataFrame(dict(text=texts, label=np.where(labels == 1, 'pos', 'neg'), is_valid=np.arange(160) >= 120))
    return TextDataLoaders.from_df(df, text_col='text', label_col='label', valid_col='is_valid', tok_tfm=BaseTokenizer(), bs=16, seq_len=16)


@pytest.mark.slow
def test_text_dataloaders():
    from fastai.text.all import text_classifier_learner, AWD_LSTM
    res = compare(_text_dls(), learner=partial(text_classifier_learner, arch=AWD_LSTM, pretrained=False),
                  methods=('ce', 'pass', 'cskd', 'ce+ts'), epochs=1, seeds=(0,), verbose=False)
    assert res.methods == ['ce', 'pass', 'cskd', 'ce+ts']
    assert np.isfinite(res.table[['top1_err', 'nll', 'ece', 'train_err']].to_numpy(float)).all()
    assert res.curves['cskd'][0]['kd_loss'].iloc[-1] > 0
    calib, train = set(res.items['calib']), set(res.items['train'])    # the table's row labels
    assert len(calib) == 24 and not calib & train and calib | train == set(range(120))     # rows 120-159 are `is_valid`
    assert len(res.preds['ce/0/targs']) == 40
