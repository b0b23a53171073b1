#!/usr/bin/env python
"""The text study: cross-entropy and CS-KD with and without dropout in the partner pass, on an AWD-LSTM text
classifier trained from scratch on small data.

The data ships with Python: the docstrings of six packages of its standard library (asyncio, email, importlib,
logging, unittest, xml), each labelled with its package, the first 48 words of each, sorted by file and position and
shuffled once with a fixed seed. The first `n` of each class train; the last 100 of each class are held out for
the metrics (the same for every run). fastai's `text_classifier_learner(dls, AWD_LSTM, pretrained=False)` with
its default dropouts (on embeddings, weights, hidden and output activations) on a smaller network (embeddings of
100, 256 hidden units, 2 layers, so that a run takes a minute or two on one CPU thread), batch 32,
`fit_one_cycle(epochs, 3e-3)`; CS-KD with T=4, λ=1. Metrics of the final epoch. Runs with the same seed share
initial weights and data order. The Python version decides the exact docstrings: it is saved with each run.

Every run writes `<out>/<run>.json` (metrics) and `<out>/<run>_logits.npz` (held-out logits and labels); a run
whose JSON exists is skipped.

    python tools/text_study.py --methods ce cskd-drop cskd-nodrop --seeds 0 1 2
"""
from __future__ import annotations
import argparse, ast, platform, sys, sysconfig, time, warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from digits_study import run_name, save_run      # the same run names and files as the digits study

PACKAGES = ('asyncio', 'email', 'importlib', 'logging', 'unittest', 'xml')
N_HELD, N_WORDS = 100, 48
METHODS = ('ce', 'cskd-drop', 'cskd-nodrop', 'cskd-nodrop-lam2')

def docstrings(package:str) -> list[str]:
    "Docstrings of `package`'s modules, classes and functions (six words or more), in file order, outside its tests"
    root = Path(sysconfig.get_paths()['stdlib'])/package
    out = []
    for f in sorted(root.rglob('*.py')):
        if 'test' in f.relative_to(root).parts[:-1] or f.name.startswith('test'): continue
        try: tree = ast.parse(f.read_text(encoding='utf-8'))
        except (SyntaxError, UnicodeDecodeError): continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                d = ast.get_docstring(node)
                if d and len(d.split()) >= 6: out.append(' '.join(d.split()[:N_WORDS]))
    return out

def table(n:int) -> pd.DataFrame:
    "`n` training and `N_HELD` held-out docstrings of each package, with an `is_valid` column"
    rows = []
    for c in PACKAGES:
        ds = docstrings(c)
        ds = [ds[i] for i in np.random.default_rng(0).permutation(len(ds))]
        if len(ds) < n + N_HELD: raise ValueError(f"{c} has {len(ds)} docstrings, fewer than {n}+{N_HELD}.")
        rows += [(t, c, False) for t in ds[:n]] + [(t, c, True) for t in ds[-N_HELD:]]
    return pd.DataFrame(rows, columns=['text', 'label', 'is_valid'])


def one_run(n, epochs, method, seed, out):
    from fastai.text.all import TextDataLoaders, text_classifier_learner, AWD_LSTM, awd_lstm_clas_config, accuracy, set_seed
    from cskd_fastai.callback import CSKD
    from cskd_fastai.partners import PartnerForward
    from cskd_fastai.metrics import ece, nll
    df = table(n)
    set_seed(seed, reproducible=True)
    dls = TextDataLoaders.from_df(df, text_col='text', label_col='label', valid_col='is_valid', bs=32, seq_len=48,
                                  num_workers=0)
    cbs = {'ce': [], 'cskd-drop': [CSKD(partner=PartnerForward(dropout=True))],
           'cskd-nodrop': [CSKD(partner=PartnerForward(dropout=False))],
           'cskd-nodrop-lam2': [CSKD(lam=2., partner=PartnerForward(dropout=False))]}[method]
    config = dict(awd_lstm_clas_config, emb_sz=100, n_hid=256, n_layers=2)
    learn = text_classifier_learner(dls, AWD_LSTM, pretrained=False, config=config, metrics=accuracy, cbs=cbs)
    t0 = time.perf_counter()
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, 3e-3)
    train_s = time.perf_counter() - t0
    with learn.no_bar():
        zv, yv = learn.get_preds(dl=dls.valid.new(shuffle=False, drop_last=False), act=lambda x: x)
        zt, yt = learn.get_preds(dl=dls.train.new(shuffle=False, drop_last=False), act=lambda x: x)
    P = zv.float().softmax(1)
    r = dict(n_per_class=n, epochs=epochs, method=method, seed=seed, n_train=int((~df.is_valid).sum()),
             n_heldout=int(df.is_valid.sum()), classes=list(dls.vocab[1]),
             test_err=float((P.argmax(1) != yv).float().mean()), test_nll=nll(P, yv), test_ece=ece(P, yv, 15),
             mean_conf=float(P.max(1).values.mean()), test_acc=float((P.argmax(1) == yv).float().mean()),
             train_acc=float((zt.argmax(1) == yt).float().mean()), train_s=train_s, s_per_epoch=train_s/epochs,
             python=platform.python_version(), torch=torch.__version__, threads=torch.get_num_threads(),
             machine=platform.machine())
    return save_run(out, run_name(n, epochs, method, seed), r, heldout_logits=zv.float().numpy(), heldout_y=yv.numpy().astype(np.int8))

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', default='nbs/tutorials/dropout_study/text')
    p.add_argument('--n', type=int, default=50, help="training docstrings per package")
    p.add_argument('--epochs', type=int, default=20)
    p.add_argument('--methods', nargs='*', default=list(METHODS[:3]), choices=METHODS)
    p.add_argument('--seeds', nargs='*', type=int, default=[0, 1, 2])
    p.add_argument('--threads', type=int, default=1, help="torch threads")
    a = p.parse_args(argv)
    warnings.filterwarnings('ignore', category=FutureWarning)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    for s in a.seeds:
        for m in a.methods:
            if (out/f'{run_name(a.n, a.epochs, m, s)}.json').exists(): continue
            r = one_run(a.n, a.epochs, m, s, out)
            print(f"{run_name(a.n, a.epochs, m, s)}: error {r['test_err']:.4f}  NLL {r['test_nll']:.3f}  ECE {r['test_ece']:.4f}  "
                  f"conf-acc {r['mean_conf']-r['test_acc']:+.4f}  train acc {r['train_acc']:.3f}  {r['train_s']:.0f} s", flush=True)

if __name__ == '__main__': main()
