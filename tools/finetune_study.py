#!/usr/bin/env python
"""The fine-tuning study: CS-KD against cross-entropy when a pretrained backbone is fine-tuned with `learn.fine_tune`.

No pretrained weights can be downloaded where this runs, so the backbone is a stand-in: timm's `resnet10t`
trained from scratch on the first five CIFAR-10 classes (airplane, automobile, bird, cat, deer; 500 training
images each, `fit_one_cycle(15, 3e-3)`), trained once and cached. Its body is then loaded into a fresh
`vision_learner(dls, 'resnet10t', pretrained=False)` for the other five classes (dog, frog, horse, ship,
truck), which the backbone has never seen, and fine-tuned with `learn.fine_tune(epochs, 3e-3)` and fastai's
other defaults; batch 32, 32 px, pad-4 random crop + horizontal flip.

Fine-tuning data: the first `n` training images of each class (sorted file names) for training; the last 100
of each class, held out of training for every run (the same 500 images for every method and size), to fit the
temperature of "cross-entropy + temperature scaling" (the fit table's validation columns show 20 a class); all
5,000 test images of the five classes for the metrics, of the final epoch only (nothing is selected on them).

Every run writes `<out>/<run>.json` (metrics, configuration) and `<out>/<run>.npz` (test and held-out logits,
float16) when it ends; a run whose JSON exists is skipped, so the study resumes where it stopped.
`nbs/tutorials/finetune_study.ipynb` reads the files.

    python tools/finetune_study.py --data PATH              # every run, most important first
    python tools/finetune_study.py --data PATH --list       # the runs and which are done
    python tools/finetune_study.py --data PATH --smoke      # a tiny version, to test the script

PATH is a folder in the layout of `untar_data(URLs.CIFAR)` or a .tgz of one (or set CSKD_CIFAR10).
"""
from __future__ import annotations
import argparse, json, os, platform, sys, tempfile, time
from pathlib import Path

import numpy as np
import torch, torch.nn.functional as F

from fastai.data.load import DataLoader
from fastai.data.core import DataLoaders
from fastai.vision.learner import vision_learner
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat
from fastai.metrics import accuracy
from fastai.callback.schedule import SchedLin, SchedNo, combine_scheds
from fastai.torch_core import set_seed
from cskd_fastai.callback import CSKD
from cskd_fastai.partners import PartnerForward
from cskd_fastai.metrics import ece, nll, fit_temperature, apply_temperature
from cskd_fastai.datasets import image_folder
sys.path.insert(0, str(Path(__file__).resolve().parent))   # tools/, for `_cifar` also when this file is loaded by path
from _cifar import MEAN, STD, ImageTensors, pad_crop_flip, train_batch, eval_batch

PRE_CLASSES,FT_CLASSES = range(0, 5),range(5, 10)      # CIFAR-10's classes in sorted order: airplane..deer, dog..truck
N_PRE,N_HELD,PRE_EPOCHS,ARCH,BS,LR = 500,100,15,'resnet10t',32,3e-3

# ---------------------------------------------------------------------------------------------- data
def load_images(data, n_pre=N_PRE, n_ft=500, n_held=N_HELD, n_test=None, cache_dir=None):
    """uint8 (N,3,32,32) tensors and labels (0-4 within each half): pretraining images (first `n_pre` of classes
    0-4) and their test images; fine-tuning images (first `n_ft` of classes 5-9), the held-out ones (last `n_held`)
    and the test images (first `n_test` per class, all if None)"""
    from PIL import Image
    root, split = image_folder(data)
    cache = Path(cache_dir)/f'images_{n_pre}_{n_ft}_{n_held}_{n_test}.pt' if cache_dir else None
    if cache is not None and cache.exists(): return torch.load(cache)
    classes = sorted(d.name for d in (root/'train').iterdir() if d.is_dir())
    if len(classes) != 10: raise ValueError(f"{root/'train'} has {len(classes)} class folders; this study needs CIFAR-10's 10.")
    def read(files): return torch.from_numpy(np.stack([np.asarray(Image.open(f).convert('RGB')) for f in files])).permute(0,3,1,2).contiguous()
    def part(cs, pick_train, pick_test=None):
        xs,ys = [],[]
        for k,c in enumerate(cs):
            fs = sorted((root/('train' if pick_test is None else split)/classes[c]).iterdir())
            fs = (pick_train if pick_test is None else pick_test)(fs)
            xs.append(read(fs)); ys.append(torch.full((len(fs),), k))
        return torch.cat(xs), torch.cat(ys)
    for c in FT_CLASSES:
        m = len(list((root/'train'/classes[c]).iterdir()))
        if m < n_ft + n_held: raise ValueError(f"Class {classes[c]} has {m} training images, fewer than {n_ft}+{n_held}.")
    test = (lambda fs: fs) if n_test is None else (lambda fs: fs[:n_test])
    res = dict(pre_train=part(PRE_CLASSES, lambda fs: fs[:n_pre]), pre_test=part(PRE_CLASSES, None, test),
               train=part(FT_CLASSES, lambda fs: fs[:n_ft]), held=part(FT_CLASSES, lambda fs: fs[-n_held:]),
               test=part(FT_CLASSES, None, test),
               pre_classes=[classes[c] for c in PRE_CLASSES], classes=[classes[c] for c in FT_CLASSES])
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix('.tmp'); torch.save(res, tmp); tmp.replace(cache)
    return res

def first_per_class(x, y, n):
    "The first `n` items of each class"
    keep = torch.cat([torch.nonzero(y == c).flatten()[:n] for c in y.unique()])
    return x[keep], y[keep]

def make_dls(train, valid, n_classes, bs=BS):
    "fastai's defaults for the training loader (shuffled, last partial batch dropped); `valid` for the fit table's columns"
    tr = DataLoader(ImageTensors(*train), bs=bs, shuffle=True, drop_last=True, after_batch=train_batch, num_workers=0)
    va = DataLoader(ImageTensors(*valid), bs=256, shuffle=False, after_batch=eval_batch, num_workers=0)
    tr.n_inp = va.n_inp = 1         # a plain DataLoader has no `n_inp`
    dls = DataLoaders(tr, va)
    dls.c = n_classes
    return dls

def eval_dl(x, y): return DataLoader(ImageTensors(x, y), bs=256, shuffle=False, after_batch=eval_batch, num_workers=0)

@torch.no_grad()
def logits_of(learn, x, y):
    learn.model.eval()
    return torch.cat([learn.model(xb) for xb,_ in eval_dl(x, y)]).float()

# ------------------------------------------------------------------------------------- the stand-in
def pretrained_body(d, cache_dir, out, epochs=PRE_EPOCHS, seed=0, quiet=False):
    """The stand-in for pretrained weights: the state dict of the body of a `vision_learner(..., 'resnet10t')`
    trained from scratch on classes 0-4, trained once and cached in `cache_dir`; its figures go to `out`"""
    f = Path(cache_dir)/f'{ARCH}_cifar5_{len(d["pre_train"][1])}_e{epochs}_s{seed}.pth'
    if f.exists(): return torch.load(f)
    print(f"pretraining the stand-in backbone ({ARCH}, {epochs} epochs) -> {f}", flush=True)
    set_seed(seed, reproducible=True)
    learn = vision_learner(make_dls(d['pre_train'], first_per_class(*d['pre_test'], 20), 5), ARCH, pretrained=False,
                           n_out=5, metrics=accuracy, loss_func=CrossEntropyLossFlat())
    t0 = time.perf_counter()
    with learn.no_bar():
        if quiet:
            with learn.no_logging(): learn.fit_one_cycle(epochs, LR)
        else: learn.fit_one_cycle(epochs, LR)
    lg = logits_of(learn, *d['pre_test'])
    info = dict(arch=ARCH, classes=d['pre_classes'], n_train=len(d['pre_train'][1]), epochs=epochs, lr=LR, bs=BS, seed=seed,
                test_err=float((lg.argmax(1) != d['pre_test'][1]).float().mean()), n_test=len(d['pre_test'][1]),
                train_s=time.perf_counter() - t0)
    sd = {k: v.clone() for k,v in learn.model[0].state_dict().items()}
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix('.tmp'); torch.save(sd, tmp); tmp.replace(f)
    out.mkdir(parents=True, exist_ok=True)
    (out/'pretrain.json').write_text(json.dumps(info, indent=1))
    print(f"stand-in backbone: {100*info['test_err']:.1f}% error on the {info['n_test']} test images of its classes", flush=True)
    return sd

# ---------------------------------------------------------------------------------------------- methods
try: from cskd_fastai.callback import PartnerPassOnly
except ImportError:                    # releases without it: the same control
    class PartnerPassOnly(CSKD):
        "The control: CSKD's partner loader and partner forward (training mode) on every batch, with no KD term (λ = 0)"
        def __init__(self): super().__init__(lam=0.)
        def before_batch(self):
            self.source.split(self.learn)
            self.source.prepare(self.learn)

def lam_warmup(pct=0.3):
    "λ from 0 to 1 over the first `pct` of each fit (one-cycle's warm-up, `pct_start=0.3`), then 1"
    return combine_scheds([pct, 1-pct], [SchedLin(0., 1.), SchedNo(1., 1.)])

METHODS = {   # name: (loss function or None, callbacks for both fits, callbacks for the unfrozen fit only)
    'ce':           (None, lambda: [], lambda: []),
    'cskd':         (None, lambda: [CSKD()], lambda: []),
    'partner-only': (None, lambda: [PartnerPassOnly()], lambda: []),
    'ls':           (lambda: LabelSmoothingCrossEntropyFlat(eps=0.1), lambda: [], lambda: []),
    'cskd-unfrozen':(None, lambda: [], lambda: [CSKD()]),
    'cskd-warmup':  (None, lambda: [CSKD(lam=lam_warmup())], lambda: []),
    'cskd-lam0.25': (None, lambda: [CSKD(lam=0.25)], lambda: []),
    'cskd-T2':      (None, lambda: [CSKD(T=2.)], lambda: []),
    'cskd-nodrop':  (None, lambda: [CSKD(partner=PartnerForward(dropout=False))], lambda: []),   # partner pass without dropout
    'cskd-drop':    (None, lambda: [CSKD(partner=PartnerForward(dropout=True))], lambda: []),    # partner pass with dropout
    'cskd-nodrop-lam2': (None, lambda: [CSKD(lam=2., partner=PartnerForward(dropout=False))], lambda: []),
    'cskd-nodrop-lam0.25': (None, lambda: [CSKD(lam=0.25, partner=PartnerForward(dropout=False))], lambda: []),
    'cskd-nodrop-unfrozen': (None, lambda: [], lambda: [CSKD(partner=PartnerForward(dropout=False))]),
}

def fine_tune(learn, epochs, base_lr=LR, unfrozen_cbs=None, freeze_epochs=1, lr_mult=100, pct_start=0.3, div=5.):
    "`Learner.fine_tune` step by step (fastai 2.8's source), with `unfrozen_cbs` added to the unfrozen fit only"
    learn.freeze()
    learn.fit_one_cycle(freeze_epochs, slice(base_lr), pct_start=0.99)
    base_lr /= 2
    learn.unfreeze()
    learn.fit_one_cycle(epochs, slice(base_lr/lr_mult, base_lr), pct_start=pct_start, div=div, cbs=unfrozen_cbs)

def run_name(method, n, epochs, seed): return f"{method}_n{n:03d}_e{epochs}_s{seed}"

def one_run(d, body, method, n, epochs, seed, out, quiet=False):
    lf, cbs, ucbs = METHODS[method]
    set_seed(seed, reproducible=True)
    dls = make_dls(first_per_class(*d['train'], n), first_per_class(*d['held'], 20), len(d['classes']))
    learn = vision_learner(dls, ARCH, pretrained=False, n_out=len(d['classes']), metrics=accuracy,
                           loss_func=lf() if lf else CrossEntropyLossFlat(), cbs=cbs())
    learn.model[0].load_state_dict(body)
    t0 = time.perf_counter()
    with learn.no_bar():
        if quiet:
            with learn.no_logging(): fine_tune(learn, epochs, unfrozen_cbs=ucbs())
        else: fine_tune(learn, epochs, unfrozen_cbs=ucbs())
    train_s = time.perf_counter() - t0
    names = learn.recorder.metric_names[1:-1]
    hist = [dict(zip(names, map(lambda v: None if v is None else float(v), v))) for v in learn.recorder.values]
    tr = first_per_class(*d['train'], n)
    lt,lh,ltr = logits_of(learn, *d['test']),logits_of(learn, *d['held']),logits_of(learn, *tr)
    y,yh = d['test'][1],d['held'][1]
    P,Ph = lt.double().softmax(1),lh.double().softmax(1)
    Tfit = fit_temperature(Ph, yh)
    Pts = apply_temperature(P, Tfit)
    acc = float((P.argmax(1) == y).double().mean())
    r = dict(method=method, n_per_class=n, epochs=epochs, seed=seed, arch=ARCH, bs=BS, lr=LR, freeze_epochs=1,
             classes=d['classes'], n_train=len(tr[1]), n_held=len(yh), n_test=len(y),
             test_err=1-acc, test_acc=acc, test_nll=nll(P, y), test_ece=ece(P, y, 15), mean_conf=float(P.max(1).values.mean()),
             held_err=float((Ph.argmax(1) != yh).double().mean()), held_nll=nll(Ph, yh),
             held_mean_conf=float(Ph.max(1).values.mean()),
             temperature=Tfit, ts_nll=nll(Pts, y), ts_ece=ece(Pts, y, 15), ts_mean_conf=float(Pts.max(1).values.mean()),
             train_acc=float((ltr.argmax(1) == tr[1]).double().mean()), train_nll=float(F.cross_entropy(ltr, tr[1])),
             train_s=train_s, history=hist, torch=torch.__version__, threads=torch.get_num_threads(),
             machine=platform.processor() or platform.machine())
    out.mkdir(parents=True, exist_ok=True)
    name = run_name(method, n, epochs, seed)
    tmp = out/f'.{name}.npz.tmp.npz'
    np.savez_compressed(tmp, test=lt.half().numpy(), held=lh.half().numpy())
    tmp.replace(out/f'{name}.npz')
    tmp = out/f'.{name}.json.tmp'
    tmp.write_text(json.dumps(r, indent=1)); tmp.replace(out/f'{name}.json')   # last: the run counts as done
    return r

# ---------------------------------------------------------------------------------------------- the plan
SIZES,MAIN_SIZES,SCHEDULES,MAIN_EPOCHS = (20, 50, 200, 500),(50, 200),(8, 3),8
BASE,REMEDIES = ('ce', 'cskd', 'partner-only'),('cskd-unfrozen', 'cskd-warmup', 'cskd-lam0.25', 'cskd-T2')
SMALLER = ('cskd-T2', 'cskd-lam0.25')   # the variants with a weaker KD term

def run_list(seeds=(0, 1, 2)):
    "Every run, most important first: (method, images per class, fine_tune epochs, seed)"
    runs = []
    def add(ms, ns, es, ss):
        for e in es:
            for s in ss:
                for n in ns:
                    for m in ms:
                        if (m, n, e, s) not in runs: runs.append((m, n, e, s))
    add(BASE, MAIN_SIZES, [MAIN_EPOCHS], seeds)                     # 1. the question, at the sizes the issue measured
    add(REMEDIES + ('ls',), (50,), [MAIN_EPOCHS], seeds[:1])        # 2. the remedies and label smoothing
    add(BASE, (20,), [MAIN_EPOCHS], seeds)                          # 3. the smallest size
    add(REMEDIES + ('ls',), (20,), [MAIN_EPOCHS], seeds[:1])
    add(SMALLER, (20, 50), [MAIN_EPOCHS], seeds)                    # 4. the remedies that kept the error on seed 0
    add(('ce', 'cskd'), (20, 50), [3], seeds)                       # 5. the short schedule
    add(SMALLER, (200,), [MAIN_EPOCHS], seeds)
    add(('cskd-lam0.25',), (20, 50), [3], seeds)
    add(('ce', 'cskd', 'cskd-lam0.25'), (200,), [3], seeds)
    add(('cskd-unfrozen', 'cskd-warmup', 'ls'), (20, 50), [MAIN_EPOCHS], seeds)
    add(('ce', 'cskd', 'cskd-lam0.25'), (500,), [MAIN_EPOCHS], seeds[:1])   # 6. the largest size
    add(REMEDIES + ('ls',), (200,), [MAIN_EPOCHS], seeds[:1])
    add(REMEDIES + ('ls',) + BASE, SIZES, [MAIN_EPOCHS, 3], seeds)  # 7. the rest
    return runs

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data', default=os.environ.get('CSKD_CIFAR10'),
                   help="CIFAR-10 in the layout of `untar_data(URLs.CIFAR)`, a folder or a .tgz (default: $CSKD_CIFAR10)")
    p.add_argument('--out', default='nbs/tutorials/finetune_study', help="where each run writes its results")
    p.add_argument('--cache', default=os.environ.get('CSKD_FASTAI_CACHE', Path(tempfile.gettempdir())/'cskd_fastai_data'),
                   help="where the decoded images and the stand-in backbone are cached")
    p.add_argument('--only', nargs='*', default=None, help="run names to run (default: all, in order)")
    p.add_argument('--max-runs', type=int, default=None, help="stop after this many runs")
    p.add_argument('--threads', type=int, default=1, help="torch threads")
    p.add_argument('--methods', nargs='*', default=None, choices=list(METHODS),
                   help="with --sizes: run these methods at these sizes, `fine_tune(8)`, over --seeds (instead of the plan)")
    p.add_argument('--sizes', nargs='*', type=int, default=None, help="images per class, with --methods")
    p.add_argument('--seeds', nargs='*', type=int, default=[0, 1, 2], help="seeds, with --methods")
    p.add_argument('--n-pre', type=int, default=N_PRE, help="pretraining images per class for the stand-in backbone")
    p.add_argument('--pre-epochs', type=int, default=PRE_EPOCHS, help="pretraining epochs for the stand-in backbone")
    p.add_argument('--list', action='store_true', help="list the runs, done or not, and exit")
    p.add_argument('--smoke', action='store_true', help="tiny data, 1 epoch, 2 runs, into a temporary folder: tests the script")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    if a.smoke: out = Path(tempfile.mkdtemp(prefix='finetune_smoke_'))
    if (a.methods is None) != (a.sizes is None): p.error("--methods and --sizes go together")
    plan = run_list() if a.methods is None else [(m, n, MAIN_EPOCHS, s) for s in a.seeds for n in a.sizes for m in a.methods]
    runs = [r for r in plan if a.only is None or run_name(*r) in a.only]
    if a.list:
        done = sum((out/f'{run_name(*r)}.json').exists() for r in runs)
        for r in runs: print(run_name(*r), 'done' if (out/f'{run_name(*r)}.json').exists() else '-')
        print(f"{done} of {len(runs)} done")
        return
    if a.data is None: p.error("pass --data (CIFAR-10 in the layout of `untar_data(URLs.CIFAR)`, a folder or a .tgz) or set CSKD_CIFAR10")
    cache = Path(a.cache)/'finetune_study'
    if a.smoke:
        d = load_images(a.data, n_pre=20, n_ft=10, n_held=10, n_test=20, cache_dir=cache)
        body = pretrained_body(d, out, out, epochs=1, quiet=True)
        for m in ('ce', 'cskd', 'partner-only', 'cskd-unfrozen'):
            r = one_run(d, body, m, 10, 1, 0, out, quiet=True)
            print(json.dumps({k:v for k,v in r.items() if k not in ('history', 'classes')}))
        print(f"smoke results in {out}")
        return
    d = load_images(a.data, n_pre=a.n_pre, n_ft=max(SIZES), cache_dir=cache)
    body = pretrained_body(d, cache, out, epochs=a.pre_epochs)
    todo = [r for r in runs if not (out/f'{run_name(*r)}.json').exists()]
    print(f"{len(runs)-len(todo)} of {len(runs)} runs done; {len(todo)} to go", flush=True)
    for i,r in enumerate(todo[:a.max_runs]):
        if (out/f'{run_name(*r)}.json').exists(): continue
        print(f"{run_name(*r)}: training", flush=True)
        res = one_run(d, body, *r, out=out)
        print(f"{run_name(*r)}: test error {100*res['test_err']:.2f}%  NLL {res['test_nll']:.3f}  ECE {100*res['test_ece']:.2f}%  "
              f"T {res['temperature']:.2f}  {res['train_s']:.0f} s", flush=True)

if __name__ == '__main__': main()
