"""Per-epoch training time of a plain fastai fit and of the same fit with `CSKD()`, plus class-index build time.

Same model, data and batch size; runs alternate (plain, CS-KD, plain, CS-KD, ...) in one process so
that drift in machine speed hits both. Not part of the test run. Ends with one JSON line.

    python benchmarks/epoch_time.py [--size 32] [--bs 64] [--arch resnet10t] [--epochs 2] [--repeats 3]
"""
import argparse, json, os, statistics, time, warnings
os.environ.setdefault('MPLBACKEND', 'Agg')
warnings.filterwarnings('ignore')
import numpy as np, torch
from fastai.vision.all import *
from cskd_fastai.all import *


class EpochTimer(Callback):
    "Wall time of each training phase (data loading, forward, backward, step), validation excluded"
    order = 100
    def before_fit(self): self.times = []
    def before_train(self): self.t0 = time.perf_counter()
    def after_train(self): self.times.append(time.perf_counter() - self.t0)


def run(dls, arch, cskd, epochs, seed):
    set_seed(seed)
    cbs = [EpochTimer()] + ([CSKD()] if cskd else [])
    learn = vision_learner(dls, arch, pretrained=False, metrics=accuracy, cbs=cbs)
    with learn.no_bar(), learn.no_logging(): learn.fit(epochs + 1, 1e-3)
    return learn.epoch_timer.times[1:]          # the first epoch warms up allocators and caches


def index_times(sizes=(10**4, 10**5, 10**6), n_classes=100):
    rng, res = np.random.default_rng(0), {}
    for n in sizes:
        labels = rng.integers(0, n_classes, n)
        t0 = time.perf_counter(); ClassIndex(labels); res[n] = time.perf_counter() - t0
    return res


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--size', type=int, default=32); p.add_argument('--bs', type=int, default=64)
    p.add_argument('--arch', default='resnet10t'); p.add_argument('--epochs', type=int, default=2)
    p.add_argument('--repeats', type=int, default=3); p.add_argument('--workers', type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    dls = ImageDataLoaders.from_folder(digits_folder(), valid='valid', item_tfms=Resize(a.size), bs=a.bs,
                                       num_workers=a.workers)
    plain, cskd = [], []
    for r in range(a.repeats):
        plain += run(dls, a.arch, False, a.epochs, r)
        cskd += run(dls, a.arch, True, a.epochs, r)
        print(f"repeat {r}: plain {np.round(plain[-a.epochs:], 2)} s/epoch, CS-KD {np.round(cskd[-a.epochs:], 2)} s/epoch")
    mp, mc = statistics.median(plain), statistics.median(cskd)
    idx = index_times()
    print(f"digits ({len(dls.train_ds)} train images, {a.size}px), {a.arch}, bs {a.bs}, {torch.get_num_threads()} threads, "
          f"{a.workers} workers")
    print(f"median train epoch: plain {mp:.2f} s, CS-KD {mc:.2f} s, ratio {mc/mp:.2f}")
    print('class index build: ' + ', '.join(f"{n:,} labels {t*1000:.1f} ms" for n, t in idx.items()))
    print(json.dumps({'benchmark': 'epoch_time', 'arch': a.arch, 'size': a.size, 'bs': a.bs, 'workers': a.workers,
                      'n_train': len(dls.train_ds), 'plain_epoch_s': round(mp, 3), 'cskd_epoch_s': round(mc, 3),
                      'ratio': round(mc/mp, 3), 'index_build_s': {str(n): round(t, 4) for n, t in idx.items()}}))
