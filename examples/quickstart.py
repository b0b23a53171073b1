"""Train the same small model on scikit-learn's digits with plain cross-entropy and with `CSKD()`, offline.

    python examples/quickstart.py [--epochs 5] [--arch resnet10t]

Prints, for each method, the held-out error and negative log-likelihood after the last epoch, the
KD term's last epoch average, and the training time per epoch."""
import argparse, os, time, warnings
os.environ.setdefault('MPLBACKEND', 'Agg')
warnings.filterwarnings('ignore', category=FutureWarning)
import torch.nn.functional as F
from cskd_fastai.all import *


def train(dls, arch, epochs, seed, cbs=None):
    set_seed(seed, reproducible=True)
    learn = vision_learner(dls, arch, pretrained=False, metrics=accuracy, cbs=cbs)
    t0 = time.perf_counter()
    learn.fit_one_cycle(epochs, 3e-3)
    per_epoch = (time.perf_counter() - t0)/epochs
    probs, targs = learn.get_preds()
    nll = F.nll_loss(probs.clamp_min(1e-12).log(), targs).item()
    err = (probs.argmax(1) != targs).float().mean().item()
    kd = learn.recorder.values[-1][learn.recorder.metric_names.index('kd_loss')-1] if cbs else float('nan')
    return dict(error=err, nll=nll, kd_loss=kd, s_per_epoch=per_epoch)


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--epochs', type=int, default=5); p.add_argument('--arch', default='resnet10t')
    p.add_argument('--size', type=int, default=32); p.add_argument('--seed', type=int, default=0)
    a = p.parse_args()
    dls = ImageDataLoaders.from_folder(digits_folder(), valid='valid', item_tfms=Resize(a.size), bs=64, num_workers=0)
    rows = {}
    for name, cbs in [('cross-entropy', None), ('CS-KD (T=4, lam=1)', CSKD())]:
        print(f"\n== {name}")
        rows[name] = train(dls, a.arch, a.epochs, a.seed, cbs)
    print(f"\ndigits: {len(dls.train_ds)} train / {len(dls.valid_ds)} valid images, {a.arch} from scratch, "
          f"{a.epochs} epochs, seed {a.seed}; metrics of the final epoch on the valid split")
    print(f"{'method':<20} {'top-1 error':>11} {'NLL':>7} {'kd_loss':>8} {'s/epoch':>8}")
    for name, r in rows.items():
        print(f"{name:<20} {r['error']*100:>10.2f}% {r['nll']:>7.3f} {r['kd_loss']:>8.3f} {r['s_per_epoch']:>8.1f}")
