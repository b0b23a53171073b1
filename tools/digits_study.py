#!/usr/bin/env python
"""The digits study: cross-entropy, CS-KD and the partner-pass control on scikit-learn's digits at several
training-set sizes and training lengths, to see how CS-KD's effect on calibration follows cross-entropy's
overconfidence on held-out images.

The recipe is that of `cskd-fastai compare`'s default run: the bundled digits (`digits_folder()`: 80 % of each
class for training, 20 % held out), the first `n` training images of each class (sorted file names), all the
held-out images (360) for evaluation; timm's `resnet10t` from scratch at 32 px, batch 64, `fit_one_cycle(epochs,
3e-3)`, rotation ±10°, zoom 1.1 and lighting 0.1 (no flips); CS-KD with T=4, λ=1. Metrics of the final epoch.
Runs with the same seed share initial weights and data order.

Every run writes `<out>/<run>.json` (metrics) and `<out>/<run>_logits.npz` (held-out and training logits, float16,
with labels); a run whose JSON exists is skipped.

    python tools/digits_study.py                        # every run
    python tools/digits_study.py --list                 # the runs and which are done
    python tools/digits_study.py --grid 10:60 --seeds 0  # some runs
"""
from __future__ import annotations
import argparse, json, os, platform, time, warnings
from pathlib import Path

import numpy as np
import torch

METHODS = ('ce', 'cskd', 'pass', 'cskd-nodrop', 'cskd-nodrop-lam2')
# 'pass': CS-KD's partner pass without the KD term (the control); 'cskd-nodrop': CS-KD with the partner pass's dropout
# modules in eval mode (`PartnerForward(dropout=False)`), at λ=1 and λ=2
GRID = ((10, 60), (10, 30), (30, 30), (30, 60), (30, 15), (100, 30), (10, 15), (100, 60))   # (images per class, epochs)

def run_name(n, epochs, method, seed): return f"n{n:03d}_e{epochs:03d}_{method}_s{seed}"

def _dsets(n):
    from fastai.data.block import DataBlock, CategoryBlock
    from fastai.data.transforms import get_image_files, parent_label, GrandparentSplitter
    from fastai.vision.data import ImageBlock
    from fastai.vision.augment import Resize, aug_transforms
    from cskd_fastai.datasets import digits_folder
    root = digits_folder()
    def items(p):
        keep, seen = [], {}
        for f in sorted(get_image_files(p, folders=['train', 'valid'])):
            k = (f.parent.parent.name, f.parent.name)
            seen[k] = seen.get(k, 0) + 1
            if k[0] == 'valid' or seen[k] <= n: keep.append(f)
        return keep
    db = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=items, get_y=parent_label,
                   splitter=GrandparentSplitter(train_name='train', valid_name='valid'), item_tfms=Resize(32),
                   batch_tfms=aug_transforms(size=32, do_flip=False, max_rotate=10., max_zoom=1.1, max_warp=0., max_lighting=0.1))
    return db, db.datasets(root)

def one_run(n, epochs, method, seed, out):
    from fastai.torch_core import set_seed
    from fastai.vision.learner import vision_learner
    from fastai.metrics import accuracy
    from fastai.callback.schedule import fit_one_cycle  # noqa: F401  (patches Learner.fit_one_cycle)
    from cskd_fastai.callback import CSKD, PartnerPassOnly
    from cskd_fastai.partners import PartnerForward
    from cskd_fastai.metrics import ece, nll
    db, ds = _dsets(n)
    set_seed(seed, reproducible=True)
    dls = ds.dataloaders(bs=64, after_item=db.item_tfms, after_batch=db.batch_tfms, num_workers=0)
    cbs = {'ce': [], 'cskd': [CSKD(partner=PartnerForward(dropout=True))], 'pass': [PartnerPassOnly()],
           'cskd-nodrop': [CSKD(partner=PartnerForward(dropout=False))],
           'cskd-nodrop-lam2': [CSKD(lam=2., partner=PartnerForward(dropout=False))]}[method]
    learn = vision_learner(dls, 'resnet10t', pretrained=False, metrics=accuracy, cbs=cbs)
    t0 = time.perf_counter()
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, 3e-3)
    train_s = time.perf_counter() - t0
    with learn.no_bar():
        zv, yv = learn.get_preds(dl=dls.valid, act=lambda x: x)
        zt, yt = learn.get_preds(dl=dls.test_dl(ds.train.items, with_labels=True, num_workers=0), act=lambda x: x)
    P = zv.float().softmax(1)
    r = dict(n_per_class=n, epochs=epochs, method=method, seed=seed, n_train=len(ds.train), n_heldout=len(ds.valid),
             test_err=float((P.argmax(1) != yv).float().mean()), test_nll=nll(P, yv), test_ece=ece(P, yv, 15),
             mean_conf=float(P.max(1).values.mean()), test_acc=float((P.argmax(1) == yv).float().mean()),
             train_acc=float((zt.argmax(1) == yt).float().mean()), train_s=train_s, s_per_epoch=train_s/epochs,
             torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine())
    return save_run(out, run_name(n, epochs, method, seed), r, heldout_logits=zv.half().numpy(), heldout_y=yv.numpy().astype(np.int8),
                    train_logits=zt.half().numpy(), train_y=yt.numpy().astype(np.int8))

def save_run(out, name, record, **arrays):
    "Write a finished run: `arrays` to `out/<name>_logits.npz`, then `record` to `out/<name>.json` (each atomically); return `record`"
    out.mkdir(parents=True, exist_ok=True)
    tmp = out/f'.{name}_logits.npz.tmp'
    with open(tmp, 'wb') as fh: np.savez_compressed(fh, **arrays)
    tmp.replace(out/f'{name}_logits.npz')
    tmp = out/f'.{name}.json.tmp'
    tmp.write_text(json.dumps(record, indent=1)); tmp.replace(out/f'{name}.json')
    return record

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', default='nbs/tutorials/digits_study')
    p.add_argument('--grid', nargs='*', default=None, help="points as n:epochs (default: all of GRID)")
    p.add_argument('--methods', nargs='*', default=list(METHODS[:3]), choices=METHODS)
    p.add_argument('--threads', type=int, default=1, help="torch threads")
    p.add_argument('--seeds', nargs='*', type=int, default=[0, 1, 2])
    p.add_argument('--list', action='store_true')
    a = p.parse_args(argv)
    warnings.filterwarnings('ignore', category=FutureWarning)
    torch.set_num_threads(a.threads)
    grid = GRID if a.grid is None else [tuple(map(int, g.split(':'))) for g in a.grid]
    out = Path(a.out)
    runs = [(n, e, m, s) for (n, e) in grid for s in a.seeds for m in a.methods]
    for r in runs:
        f = out/f'{run_name(*r)}.json'
        if a.list: print(run_name(*r), 'done' if f.exists() else '-'); continue
        if f.exists(): continue
        res = one_run(*r, out=out)
        print(f"{run_name(*r)}: error {res['test_err']:.4f}  NLL {res['test_nll']:.3f}  ECE {res['test_ece']:.4f}  "
              f"conf-acc {res['mean_conf']-res['test_acc']:+.4f}  train acc {res['train_acc']:.3f}  {res['train_s']:.0f} s", flush=True)

if __name__ == '__main__': main()
