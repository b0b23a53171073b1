#!/usr/bin/env python
"""The regime study: CS-KD against cross-entropy where cross-entropy is trained until it fits its training set.

CIFAR-10 at CPU scale in the paper's recipe: a class-balanced training subset, a validation split held
out of training (used only to fit the temperature of "cross-entropy + temperature scaling"), the full
10,000 test images; a CIFAR-style ResNet-18 (3×3 stem, no max-pool) at a quarter of its width; SGD lr 0.1,
momentum 0.9, weight decay 1e-4 (L2, as the paper's code), batch 128, step decay ×0.1 at 50 % and 75 %
of training, pad-4 random crop + horizontal flip. Metrics of the final epoch only.

Every run writes `<out>/<run>.json` and `<out>/<run>_logits.npz` (the final model's logits on the test, validation
and clean training images, float16, with their labels) when it ends; a run whose JSON exists is skipped, so the
study resumes where it stopped. `nbs/tutorials/regime_study.ipynb` reads the files.

`--data` is CIFAR-10 in the layout of fastai's `untar_data(URLs.CIFAR)` (a folder with train/<class>/ and test/<class>/,
or a .tgz of one); without it, the environment variable CSKD_CIFAR10 is used.

    python tools/regime_study.py --data ~/.fastai/data/cifar10                     # the whole study
    python tools/regime_study.py --data ... --list                                 # the runs and which are done
    python tools/regime_study.py --data ... --only pass_s0_f100 ce_s0_f015          # some runs
    python tools/regime_study.py --data ... --smoke                                # a tiny version, to test the script
"""
from __future__ import annotations
import argparse, json, math, os, sys, time, platform
from functools import partial
from pathlib import Path

import numpy as np
import torch, torch.nn as nn, torch.nn.functional as F

from fastai.data.load import DataLoader
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.optimizer import OptimWrapper
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat
from fastai.metrics import accuracy
from fastai.callback.schedule import ParamScheduler, SchedNo, SchedLin, combine_scheds
from fastai.torch_core import set_seed
from cskd_fastai.callback import CSKD
from cskd_fastai.partners import PartnerForward
from cskd_fastai.metrics import ece, nll, fit_temperature, apply_temperature
from cskd_fastai.datasets import image_folder
sys.path.insert(0, str(Path(__file__).resolve().parent))   # tools/, for `_cifar` also when this file is loaded by path
from _cifar import MEAN, STD, ImageTensors, pad_crop_flip, train_batch, eval_batch

# ---------------------------------------------------------------------------------------------- data
def load_cifar(data, n_train:int, n_val:int, n_test:int|None, cache_dir=None):
    """uint8 (N,3,32,32) tensors and labels: the first `n_train` training images of each class (sorted file names),
    the next `n_val` as validation, and the first `n_test` test images of each class (all if None)"""
    from PIL import Image
    root, split = image_folder(data)
    cache = Path(cache_dir or root.parent)/f'regime_{n_train}_{n_val}_{n_test}.pt'
    if cache.exists(): return torch.load(cache)
    classes = sorted(d.name for d in (root/'train').iterdir() if d.is_dir())
    def read(files): return torch.from_numpy(np.stack([np.asarray(Image.open(f).convert('RGB')) for f in files])).permute(0,3,1,2).contiguous()
    out = {k: ([], []) for k in ('train', 'valid', 'test')}
    for c,name in enumerate(classes):
        tr = sorted((root/'train'/name).iterdir())
        te = sorted((root/split/name).iterdir())
        parts = dict(train=tr[:n_train], valid=tr[n_train:n_train+n_val], test=te if n_test is None else te[:n_test])
        if len(parts['valid']) < n_val: raise ValueError(f"class {name} has {len(tr)} training images, fewer than {n_train}+{n_val}")
        for k,fs in parts.items(): out[k][0].append(read(fs)); out[k][1].append(torch.full((len(fs),), c))
    res = {k: (torch.cat(x), torch.cat(y)) for k,(x,y) in out.items()}
    res['classes'] = classes
    try: torch.save(res, cache)
    except OSError: pass
    return res

def make_dls(d, bs=128, workers=0):
    tr = DataLoader(ImageTensors(*d['train']), bs=bs, shuffle=True, drop_last=False, after_batch=train_batch, num_workers=workers)
    # the fit table's validation columns: 20 images a class of the held-out validation split, to watch the fit
    # cheaply; the test metrics are computed once, at the end
    keep = torch.cat([torch.nonzero(d['valid'][1] == c).flatten()[:20] for c in range(len(d['classes']))])
    va = DataLoader(ImageTensors(d['valid'][0][keep], d['valid'][1][keep]), bs=512, shuffle=False, after_batch=eval_batch, num_workers=0)
    tr.n_inp = va.n_inp = 1        # a plain DataLoader has no `n_inp`: with the cache's 3-tuples fastai would guess 2
    dls = DataLoaders(tr, va)
    dls.c = len(d['classes'])
    return dls

def eval_dl(x, y): return DataLoader(ImageTensors(x, y), bs=512, shuffle=False, after_batch=eval_batch, num_workers=0)

# --------------------------------------------------------------------------------------------- model
class BasicBlock(nn.Module):
    def __init__(self, ni, nf, stride):
        super().__init__()
        self.conv1,self.bn1 = nn.Conv2d(ni, nf, 3, stride, 1, bias=False),nn.BatchNorm2d(nf)
        self.conv2,self.bn2 = nn.Conv2d(nf, nf, 3, 1, 1, bias=False),nn.BatchNorm2d(nf)
        self.shortcut = (nn.Sequential() if stride == 1 and ni == nf else
                         nn.Sequential(nn.Conv2d(ni, nf, 1, stride, bias=False), nn.BatchNorm2d(nf)))
    def forward(self, x): return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))

def cifar_resnet18(n_classes=10, width=16):
    """ResNet-18 for 32-px images as in the paper's code (3×3 stem, stride 1, no max-pool; [2,2,2,2] basic blocks),
    with stage widths `width`×(1,2,4,8) (64 in the paper)"""
    layers, ni = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)], width
    for s,nf in enumerate([width, 2*width, 4*width, 8*width]):
        for b in range(2): layers.append(BasicBlock(ni, nf, 2 if (b == 0 and s > 0) else 1)); ni = nf
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ni, n_classes)]
    return nn.Sequential(*layers)

# ---------------------------------------------------------------------------------------------- runs
def warmup(pct:float=0.5):
    "λ from 0 to 1 linearly over the first `pct` of training (the high-learning-rate phase), then 1"
    return combine_scheds([pct, 1-pct], [SchedLin(0., 1.), SchedNo(1., 1.)])

def _pass_only():
    from cskd_fastai.callback import PartnerPassOnly
    return PartnerPassOnly(partner='forward')

METHODS = {                                 # name: what the Learner gets (callbacks or loss)
    'ce':          lambda: dict(),
    'cskd':        lambda: dict(cbs=[CSKD()]),                                       # λ=1, T=4, the paper's
    'cskd-cache':  lambda: dict(cbs=[CSKD(partner='cache')]),
    'cskd-warmup': lambda: dict(cbs=[CSKD(lam=warmup())]),
    'ls':          lambda: dict(loss_func=LabelSmoothingCrossEntropyFlat(eps=0.1)),
    # the control: CS-KD's partner pass (training mode, BatchNorm statistics updated by the partners), no KD term
    'pass':        lambda: dict(cbs=[_pass_only()]),
    # CS-KD whose partner pass leaves BatchNorm's running statistics to the anchors
    'cskd-nobn':   lambda: dict(cbs=[CSKD(partner=PartnerForward(train=True, bn_stats=False))]),
    # the λ/T sweep (one changed at a time from the paper's λ=1, T=4)
    'cskd-lam0.25': lambda: dict(cbs=[CSKD(lam=0.25)]),
    'cskd-lam0.5':  lambda: dict(cbs=[CSKD(lam=0.5)]),
    'cskd-lam2':    lambda: dict(cbs=[CSKD(lam=2.)]),
    'cskd-T2':      lambda: dict(cbs=[CSKD(T=2.)]),
    'cskd-T8':      lambda: dict(cbs=[CSKD(T=8.)]),
}

def method_kw(method):
    if method not in METHODS: raise ValueError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
    return METHODS[method](), {}

def run_list(seeds=(0, 1, 2)):
    "Every run of the study, most important first: (method, seed, fraction of the full schedule)"
    runs = [('ce', 0, 1.), ('cskd', 0, 1.)]
    runs += [(m, 0, f) for f in (0.1, 0.3) for m in ('ce', 'cskd', 'cskd-warmup')]
    runs += [(m, s, 1.) for s in seeds[1:] for m in ('ce', 'cskd')]
    runs += [('cskd-cache', 0, 1.), ('ls', 0, 1.), ('cskd-warmup', 0, 1.)]
    # added: the partner-pass control on 3 seeds, two more points of the sweep, the λ/T sweep, CS-KD without the
    # partners' BatchNorm updates
    runs += [('pass', s, 1.) for s in seeds]
    runs += [(m, 0, f) for f in (0.15, 0.2) for m in ('ce', 'cskd')]
    # the λ/T sweep, one seed: where CS-KD ends underconfident (20 epochs) and overconfident (60 and 200 epochs)
    lt = ('cskd-lam0.25', 'cskd-lam2', 'cskd-T2', 'cskd-T8')
    runs += [(m, 0, f) for f in (.1, .3) for m in lt]
    runs += [(m, 0, 1.) for m in ('cskd-lam2', 'cskd-T8', 'cskd-T2', 'cskd-lam0.25', 'cskd-nobn')]
    return runs

def run_name(method, seed, frac): return f"{method}_s{seed}_f{int(round(frac*100)):03d}"

@torch.no_grad()
def logits_of(learn, dl):
    learn.model.eval()
    return torch.cat([learn.model(xb) for xb,_ in dl]).float()

def one_run(d, method, seed, frac, epochs, out, bs=128, width=16, workers=0, quiet=False):
    E = max(1, int(round(epochs*frac)))
    set_seed(seed, reproducible=True)
    dls = make_dls(d, bs, workers)
    kw, _ = method_kw(method)
    model = cifar_resnet18(len(d['classes']), width)
    opt = partial(OptimWrapper, opt=torch.optim.SGD, momentum=0.9, weight_decay=1e-4)
    learn = Learner(dls, model, loss_func=kw.get('loss_func', CrossEntropyLossFlat()), opt_func=opt, metrics=accuracy,
                    cbs=kw.get('cbs', []))
    sched = ParamScheduler({'lr': combine_scheds([.5, .25, .25], [SchedNo(.1, .1), SchedNo(.01, .01), SchedNo(.001, .001)])})
    t0 = time.perf_counter()
    with learn.no_bar():                        # the fit table (one line an epoch) still prints, unless `quiet`
        if quiet:
            with learn.no_logging(): learn.fit(E, lr=0.1, cbs=sched)
        else: learn.fit(E, lr=0.1, cbs=sched)
    train_s = time.perf_counter() - t0
    names = learn.recorder.metric_names[1:-1]
    hist = [dict(zip(names, map(float, v))) for v in learn.recorder.values]
    # final model, eval mode: test, the held-out validation split, and the clean (unaugmented) training set
    res = {}
    for k in ('test', 'valid', 'train'):
        lg = logits_of(learn, eval_dl(*d[k])); y = d[k][1]
        res[k] = (lg, y)
    P = res['test'][0].softmax(1); y = res['test'][1]
    Tfit = fit_temperature(res['valid'][0].double().softmax(1), res['valid'][1])
    Pts = apply_temperature(P.double(), Tfit)
    conf = P.max(1).values
    r = dict(method=method, seed=seed, frac=frac, epochs=E, full_epochs=epochs, width=width, bs=bs,
             n_train=len(d['train'][1]), n_valid=len(d['valid'][1]), n_test=len(y),
             test_err=float((P.argmax(1) != y).float().mean()), test_nll=nll(P, y), test_ece=ece(P, y, 15),
             mean_conf=float(conf.mean()), test_acc=float((P.argmax(1) == y).float().mean()),
             train_acc=float((res['train'][0].argmax(1) == d['train'][1]).float().mean()),
             train_nll=float(F.cross_entropy(res['train'][0], d['train'][1])),
             valid_err=float((res['valid'][0].argmax(1) != res['valid'][1]).float().mean()),
             temperature=Tfit, ts_nll=nll(Pts, y), ts_ece=ece(Pts, y, 15), ts_mean_conf=float(Pts.max(1).values.mean()),
             train_s=train_s, s_per_epoch=train_s/E, history=hist,
             torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.processor() or platform.machine())
    out.mkdir(parents=True, exist_ok=True)
    lg = {f'{k}_logits': res[k][0].half().numpy() for k in res} | {f'{k}_y': res[k][1].numpy().astype(np.int8) for k in res}
    tmp = out/f'.{run_name(method, seed, frac)}_logits.npz.tmp'
    with open(tmp, 'wb') as fh: np.savez_compressed(fh, **lg)
    tmp.replace(out/f'{run_name(method, seed, frac)}_logits.npz')
    tmp = out/f'.{run_name(method, seed, frac)}.json.tmp'     # the JSON last: its presence marks the run as done
    tmp.write_text(json.dumps(r, indent=1)); tmp.replace(out/f'{run_name(method, seed, frac)}.json')
    return r

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data', default=os.environ.get('CSKD_CIFAR10'),
                   help="CIFAR-10 in URLs.CIFAR's layout (folder or .tgz); default: $CSKD_CIFAR10")
    p.add_argument('--out', default='nbs/tutorials/regime_study')
    p.add_argument('--n-train', type=int, default=100, help="training images per class")
    p.add_argument('--n-val', type=int, default=100, help="held-out validation images per class (temperature only)")
    p.add_argument('--n-test', type=int, default=None, help="test images per class (all 1,000 if not given)")
    p.add_argument('--epochs', type=int, default=200, help="epochs of the full schedule (the paper's 200)")
    p.add_argument('--width', type=int, default=16)
    p.add_argument('--only', nargs='*', default=None, help="run names to run (default: all, in order)")
    p.add_argument('--list', action='store_true')
    p.add_argument('--smoke', action='store_true', help="tiny data and 2 epochs into a temp folder: tests the script")
    a = p.parse_args(argv)
    if a.smoke:
        import tempfile
        a.n_train,a.n_val,a.n_test,a.epochs,a.out = 20,10,20,2,tempfile.mkdtemp(prefix='regime_smoke_')
    out = Path(a.out)
    runs = [r for r in run_list() if a.only is None or run_name(*r) in a.only]
    if a.list:
        for r in runs: print(run_name(*r), 'done' if (out/f'{run_name(*r)}.json').exists() else '-')
        return
    if not a.data: p.error("--data is required (CIFAR-10 in URLs.CIFAR's layout: a folder with train/ and test/, "
                           "or a .tgz of one), or set CSKD_CIFAR10")
    d = load_cifar(a.data, a.n_train, a.n_val, a.n_test)
    for r in runs:
        f = out/f'{run_name(*r)}.json'
        if f.exists(): print(f"{f.name}: done, skipped", flush=True); continue
        print(f"{run_name(*r)}: training", flush=True)
        res = one_run(d, *r, epochs=a.epochs, out=out, width=a.width, quiet=a.smoke)
        print(f"{run_name(*r)}: test error {res['test_err']:.4f}  NLL {res['test_nll']:.3f}  ECE {res['test_ece']:.4f}  "
              f"train acc {res['train_acc']:.4f}  {res['s_per_epoch']:.1f} s/epoch", flush=True)
        if a.smoke: print(json.dumps({k:v for k,v in res.items() if k != 'history'}))

if __name__ == '__main__': main()
