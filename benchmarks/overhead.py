"""CS-KD's overhead: epoch time and peak memory of a fastai fit with and without `CSKD()` (partner forward,
and `partner='cache'`), against a minimal plain-PyTorch loop with and without the paper's recipe, plus the
time to build the class index.

Same model (a timm model, `--arch`, 10 classes), same images, batch size, optimizer (Adam) and
augmentation (random horizontal flip) everywhere. Each configuration runs in its own child process
(so that its peak memory can be read), and the configurations are alternated over `--rounds`
rounds so that drift in machine speed hits all of them. Not part of the test run.

    python benchmarks/overhead.py --data ~/.fastai/data/cifar10 [--n-per-class 300] [--rounds 3]
    python benchmarks/overhead.py --data ... --device cuda --fp16 --workers 8 --arch resnet18 --bs 128   # a GPU

`--data` is CIFAR-10 in the layout of fastai's `untar_data(URLs.CIFAR)`, a folder or a .tgz of one (without
`--data`, the environment variable CSKD_CIFAR10); `--data digits` runs on the bundled digits (upscaled).

On a GPU (`--device cuda`, or `auto` when one is there) each configuration also reports its peak GPU memory
(`torch.cuda.max_memory_allocated` over the timed epochs), `--fp16` trains fastai with `to_fp16()` and the
PyTorch loops under `torch.autocast` with a `GradScaler`. `--recipe fast` gives fastai a foreach (CPU) or fused
(CUDA) `torch.optim.Adam` through `OptimWrapper` and flips images as a batch transform on the device instead of
an item transform: what a fastai user can do about fastai's own per-step cost.

Ends with one JSON line of the figures. `benchmarks/gpu.sh` runs the GPU settings.
"""
import argparse, json, os, resource, statistics, subprocess, sys, time, warnings
from pathlib import Path
os.environ.setdefault('MPLBACKEND', 'Agg')
warnings.filterwarnings('ignore')

CONFIGS = ('fastai', 'fastai+cskd', 'fastai+cskd-cache', 'torch', 'torch+cskd')


def _files(root, split, n_per_class):
    "Sorted (path, class index) pairs, the first `n_per_class` of each class"
    classes = sorted(d.name for d in (root/split).iterdir() if d.is_dir())
    res = []
    for i, c in enumerate(classes):
        fs = sorted(f for f in (root/split/c).iterdir() if f.suffix.lower() in ('.png', '.jpg', '.jpeg'))
        res += [(f, i) for f in fs[:n_per_class]]
    return res, classes


def _rss_mb(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024


def _device(name):
    import torch
    if name == 'auto': name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if name == 'cuda' and not torch.cuda.is_available(): sys.exit("--device cuda: no CUDA device here")
    return torch.device(name)


def child(cfg, root, n_per_class, bs, size, epochs, workers, seed, torch_adam=False, device='cpu', fp16=False,
          arch='resnet10t', recipe='fastai'):
    "One configuration in this process: returns seconds per training epoch and memory figures"
    import numpy as np, torch, timm
    import torch.nn.functional as F
    from PIL import Image
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    dev = _device(device)
    cuda = dev.type == 'cuda'
    root = Path(root)
    items, classes = _files(root, 'train', n_per_class)
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=len(classes)).to(dev)
    times = []
    def sync():
        if cuda: torch.cuda.synchronize()
    if cuda: torch.cuda.reset_peak_memory_stats()
    if cfg.startswith('fastai'):
        from fastai.vision.all import (DataBlock, ImageBlock, CategoryBlock, FlipItem, Resize, Learner, set_seed,
                                       IndexSplitter, Callback, parent_label, OptimWrapper, partial)
        from cskd_fastai.all import CSKD
        set_seed(seed)
        from fastai.vision.augment import Flip
        class Timer(Callback):
            order = 100
            def before_epoch(self):
                if cuda and self.epoch == 1: torch.cuda.reset_peak_memory_stats()   # the first epoch is warm-up
            def before_train(self): sync(); self.t0 = time.perf_counter()
            def after_train(self): sync(); times.append(time.perf_counter() - self.t0)
        fast = recipe == 'fast'
        db = DataBlock((ImageBlock, CategoryBlock(vocab=classes)), get_y=parent_label, splitter=IndexSplitter([]),
                       item_tfms=[Resize(size)] + ([] if fast else [FlipItem(0.5)]),
                       batch_tfms=[Flip(p=0.5)] if fast else None)
        dls = db.dataloaders([f for f, _ in items], bs=bs, num_workers=workers, drop_last=True, device=dev)
        cbs = [Timer()] + {'fastai': [], 'fastai+cskd': [CSKD()], 'fastai+cskd-cache': [CSKD(partner='cache')]}[cfg]
        # fastai's own Adam by default; `--torch-adam` gives fastai torch.optim.Adam (as the PyTorch loop uses);
        # `--recipe fast` a foreach (CPU) or fused (CUDA) torch.optim.Adam
        opt_kw = {}
        if fast: opt_kw = dict(opt_func=partial(OptimWrapper, opt=torch.optim.Adam, **({'fused': True} if cuda else {'foreach': True})))
        elif torch_adam: opt_kw = dict(opt_func=partial(OptimWrapper, opt=torch.optim.Adam))
        learn = Learner(dls, model, cbs=cbs, **opt_kw)
        if fp16: learn = learn.to_fp16()
        base = _rss_mb()
        with learn.no_bar(), learn.no_logging(): learn.fit(epochs, 1e-3)
    else:
        from cskd_fastai.all import cskd_loss
        class Pairs(torch.utils.data.Dataset):
            "The paper's recipe: each item comes with a random same-class partner, both augmented on their own"
            def __init__(self, items):
                self.items, self.labels = items, np.array([c for _, c in items])
                self.by_class = [np.flatnonzero(self.labels == c) for c in range(len(classes))]
            def __len__(self): return len(self.items)
            def load(self, i):
                im = Image.open(self.items[i][0]).convert('RGB').resize((size, size))
                x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float()/255
                return x.flip(2) if torch.rand(()) < 0.5 else x
            def __getitem__(self, i):
                y = self.labels[i]
                if cfg == 'torch': return self.load(i), torch.zeros(()), y        # no partner loaded
                j = self.by_class[y][torch.randint(len(self.by_class[y]), ()).item()]
                return self.load(i), self.load(j), y
        dl = torch.utils.data.DataLoader(Pairs(items), batch_size=bs, shuffle=True, drop_last=True, num_workers=workers,
                                         pin_memory=cuda)
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        scaler = torch.amp.GradScaler('cuda', enabled=fp16 and cuda)
        amp = lambda: torch.autocast(dev.type, dtype=torch.float16 if cuda else torch.bfloat16, enabled=fp16)
        base = _rss_mb()
        for ep in range(epochs):
            if cuda and ep == 1: torch.cuda.reset_peak_memory_stats()
            model.train(); sync(); t0 = time.perf_counter()
            for x, xp, y in dl:
                x, xp, y = x.to(dev, non_blocking=True), xp.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                with amp():
                    logits = model(x)
                    if cfg == 'torch': loss = F.cross_entropy(logits, y)
                    else:
                        with torch.no_grad(): plog = model(xp)       # the paper's code: after the anchors' forward
                        loss = F.cross_entropy(logits, y) + cskd_loss(logits, plog, 4.)
                opt.zero_grad(); scaler.scale(loss).backward(); scaler.step(opt); scaler.update()
            sync(); times.append(time.perf_counter() - t0)
    n_steps = len(items)//bs
    return dict(cfg=cfg, epoch_s=times[1:] or times, imgs_per_s=[n_steps*bs/t for t in (times[1:] or times)],
                peak_rss_mb=_rss_mb(), setup_rss_mb=base,
                gpu_peak_mb=torch.cuda.max_memory_allocated()/2**20 if cuda else None,
                device=torch.cuda.get_device_name() if cuda else 'cpu')


def index_times(sizes=(10**4, 10**5, 10**6), n_classes=100, reps=3):
    import numpy as np
    from cskd_fastai.all import ClassIndex
    rng, res = np.random.default_rng(0), {}
    for n in sizes:
        labels = rng.integers(0, n_classes, n)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter(); ClassIndex(labels); ts.append(time.perf_counter() - t0)
        res[n] = min(ts)
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data', default=os.environ.get('CSKD_CIFAR10'),
                   help="CIFAR-10 in untar_data(URLs.CIFAR)'s layout (train/<class>/...), a folder or a .tgz of one "
                        "(default: $CSKD_CIFAR10); 'digits' for the bundled digits")
    p.add_argument('--n-per-class', type=int, default=300); p.add_argument('--bs', type=int, default=64)
    p.add_argument('--size', type=int, default=32); p.add_argument('--epochs', type=int, default=2)
    p.add_argument('--rounds', '--repeats', dest='repeats', type=int, default=3, help="rounds the configurations are alternated over")
    p.add_argument('--workers', type=int, default=0)
    p.add_argument('--device', default='cpu', choices=['auto', 'cpu', 'cuda'])
    p.add_argument('--fp16', action='store_true', help="fastai to_fp16(); the PyTorch loops under autocast + GradScaler")
    p.add_argument('--arch', default='resnet10t', help="timm model name (default: resnet10t)")
    p.add_argument('--recipe', default='fastai', choices=['fastai', 'fast'],
                   help="fast: fused/foreach torch Adam through OptimWrapper, flips as a batch transform on the device")
    p.add_argument('--only', nargs='+', default=None, choices=CONFIGS, help="run these configurations only")
    p.add_argument('--child', default=None, help=argparse.SUPPRESS); p.add_argument('--root', default=None, help=argparse.SUPPRESS)
    p.add_argument('--seed', type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument('--torch-adam', action='store_true', help="fastai fits use torch.optim.Adam (OptimWrapper) instead of fastai's Adam")
    a = p.parse_args()
    if a.child:
        print('RESULT ' + json.dumps(child(a.child, a.root, a.n_per_class, a.bs, a.size, a.epochs + 1, a.workers, a.seed, a.torch_adam,
                                           a.device, a.fp16, a.arch, a.recipe)))
        return
    if not a.data: p.error("no data: pass --data PATH (CIFAR-10 in untar_data(URLs.CIFAR)'s layout, a folder or a .tgz "
                           "of one) or set CSKD_CIFAR10; --data digits runs on the bundled digits")
    from cskd_fastai.datasets import image_folder
    try: root, _ = image_folder(None if a.data == 'digits' else a.data)
    except (FileNotFoundError, ValueError) as e: p.error(f"--data {a.data}: {e}")
    configs = tuple(a.only or CONFIGS)
    res = {c: [] for c in configs}
    for r in range(a.repeats):
        for cfg in configs:
            cmd = [sys.executable, __file__, '--child', cfg, '--root', str(root), '--n-per-class', str(a.n_per_class),
                   '--bs', str(a.bs), '--size', str(a.size), '--epochs', str(a.epochs), '--workers', str(a.workers),
                   '--seed', str(r), '--device', a.device, '--arch', a.arch, '--recipe', a.recipe] + \
                  (['--torch-adam'] if a.torch_adam else []) + (['--fp16'] if a.fp16 else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')]
            if out.returncode or not line: sys.exit(f"{cfg} failed:\n{out.stderr[-3000:]}")
            d = json.loads(line[-1][7:]); res[cfg].append(d)
            gpu = f"  GPU peak {d['gpu_peak_mb']:.0f} MB" if d['gpu_peak_mb'] is not None else ""
            print(f"round {r} {cfg:<17} {statistics.median(d['epoch_s']):6.2f} s/epoch  "
                  f"{statistics.median(d['imgs_per_s']):7.1f} anchors/s  peak RSS {d['peak_rss_mb']:.0f} MB "
                  f"(setup {d['setup_rss_mb']:.0f} MB){gpu}", flush=True)
    if set(configs) != set(CONFIGS):
        print(json.dumps({c: [dict(epoch_s=statistics.median(d['epoch_s']), gpu_peak_mb=d['gpu_peak_mb']) for d in v] for c, v in res.items()}))
        return
    med = lambda cfg, k: statistics.median(x for d in res[cfg] for x in d[k])
    mem = lambda cfg: statistics.median(d['peak_rss_mb'] - d['setup_rss_mb'] for d in res[cfg])
    peak = lambda cfg: statistics.median(d['peak_rss_mb'] for d in res[cfg])
    idx = index_times()
    gpu = lambda cfg: statistics.median(d['gpu_peak_mb'] for d in res[cfg]) if res[cfg][0]['gpu_peak_mb'] is not None else None
    figs = dict(
        data=str(root), n_train=len(_files(root, 'train', a.n_per_class)[0]), arch=a.arch, size=a.size, bs=a.bs,
        device=res['fastai'][0]['device'], fp16=a.fp16, recipe=a.recipe,
        workers=a.workers, threads=os.cpu_count(), rounds=a.repeats,
        fastai_optimizer=('torch.optim.Adam ' + ('fused' if a.device != 'cpu' else 'foreach')) if a.recipe == 'fast' else 'torch.optim.Adam' if a.torch_adam else 'fastai Adam',
        gpu_peak_mb={c: gpu(c) and round(gpu(c), 1) for c in CONFIGS},
        gpu_peak_ratio_cskd_over_plain=gpu('fastai') and round(gpu('fastai+cskd')/gpu('fastai'), 3),
        gpu_peak_ratio_cache_over_plain=gpu('fastai') and round(gpu('fastai+cskd-cache')/gpu('fastai'), 3),
        epoch_s={c: round(med(c, 'epoch_s'), 3) for c in CONFIGS},
        epoch_time_ratio_cskd_over_plain=round(med('fastai+cskd', 'epoch_s')/med('fastai', 'epoch_s'), 3),
        epoch_time_ratio_cache_over_plain=round(med('fastai+cskd-cache', 'epoch_s')/med('fastai', 'epoch_s'), 3),
        epoch_time_ratio_torch_cskd_over_torch=round(med('torch+cskd', 'epoch_s')/med('torch', 'epoch_s'), 3),
        peak_rss_ratio_cskd_over_plain=round(peak('fastai+cskd')/peak('fastai'), 3),
        peak_rss_ratio_cache_over_plain=round(peak('fastai+cskd-cache')/peak('fastai'), 3),
        training_rss_growth_mb={c: round(mem(c), 1) for c in CONFIGS},
        throughput_fastai_cskd_over_torch_loop=round(med('fastai+cskd', 'imgs_per_s')/med('torch+cskd', 'imgs_per_s'), 3),
        index_build_s={str(n): round(t, 5) for n, t in idx.items()})
    print(f"\nepoch time: fastai {figs['epoch_s']['fastai']:.2f} s, fastai+CSKD {figs['epoch_s']['fastai+cskd']:.2f} s, "
          f"plain-PyTorch CS-KD loop {figs['epoch_s']['torch+cskd']:.2f} s")
    print(f"plain-PyTorch loop without CS-KD {figs['epoch_s']['torch']:.2f} s, CSKD(partner='cache') {figs['epoch_s']['fastai+cskd-cache']:.2f} s")
    print(f"CS-KD / plain fastai epoch-time ratio: {figs['epoch_time_ratio_cskd_over_plain']:.2f} (target <= 1.35)")
    print(f"CSKD(partner='cache') / plain fastai epoch-time ratio: {figs['epoch_time_ratio_cache_over_plain']:.2f} (target <= 1.05)")
    print(f"the same ratio in the plain-PyTorch loop: {figs['epoch_time_ratio_torch_cskd_over_torch']:.2f}")
    print(f"CS-KD / plain fastai peak-RSS ratio: {figs['peak_rss_ratio_cskd_over_plain']:.2f} (target <= 1.15); "
          f"cache: {figs['peak_rss_ratio_cache_over_plain']:.2f}")
    print(f"fastai+CSKD throughput / plain-PyTorch CS-KD loop: {figs['throughput_fastai_cskd_over_torch_loop']:.2f} (target >= 0.9)")
    if figs['gpu_peak_ratio_cskd_over_plain']:
        print(f"GPU peak memory, CSKD / plain fastai: {figs['gpu_peak_ratio_cskd_over_plain']:.3f} (target <= 1.05); "
              f"cache: {figs['gpu_peak_ratio_cache_over_plain']:.3f}")
    print('class index build: ' + ', '.join(f"{int(n):,} labels {t*1000:.1f} ms" for n, t in figs['index_build_s'].items()))
    print(json.dumps(figs))


if __name__ == '__main__':
    main()
