"""One rank of a CS-KD fit under fastai's `distrib_ctx`, on CPU with gloo.

`test_distributed.py` launches this script on 2 processes (`torchrun --nproc_per_node 2 ddp_worker.py OUT RUN...`,
or the same with `accelerate launch`) and reads what each rank writes to `OUT/rank{RANK}.json`: for each named fit in
`RUNS`, what it saw. The learner is what a user writes (`Learner(..., cbs=CSKD())`, then
`with learn.distrib_ctx(): learn.fit(...)`); the callbacks next to `CSKD` only record."""
import json, os, sys
from copy import deepcopy
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from fastai.basics import *
from fastai.distributed import DistributedDL
from cskd_fastai.callback import CSKD
from reference import FormulaCheck

N_TRAIN, N_VALID, N_CLASSES, N_FEATS, BS = 256, 64, 4, 8, 32


def make_data():
    "Class-dependent Gaussian blobs (the same on every rank): features and labels of the 256+64 items"
    g = np.random.default_rng(0)
    y = np.arange(N_TRAIN + N_VALID) % N_CLASSES
    x = 2*g.normal(size=(N_CLASSES, N_FEATS))[y] + g.normal(size=(len(y), N_FEATS))
    return x.astype(np.float32), y


class Take(Transform):
    "Item `i` of array `a`, as a tensor"
    def __init__(self, a): super().__init__(); self.a = a
    def encodes(self, i): return tensor(self.a[i])


class Position(Transform):
    "The item's position in the training set, as a second input: lets each rank report which items it trained on"
    def encodes(self, i): return tensor(i)


class TinyNet(nn.Module):
    "BatchNorm (buffers that DDP broadcasts) and dropout (the partner forward runs in train mode); ignores the position"
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(N_FEATS, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1),
                                  nn.Linear(16, N_CLASSES))
    def forward(self, x, pos): return self.body(x)


def make_dls(num_workers):
    x, y = make_data()
    dsets = Datasets(range(N_TRAIN + N_VALID), tfms=[[Take(x)], [Position()], [Take(y)]], n_inp=2,
                     splits=(range(N_TRAIN), range(N_TRAIN, N_TRAIN + N_VALID)))
    return dsets.dataloaders(bs=BS, num_workers=num_workers, device='cpu')


class RecordPairs(Callback):
    "Before `CSKD` splits the batch: the positions of anchors (first half) and partners (second half), and their labels"
    order, run_valid = CSKD.order - 1, False
    def before_fit(self): self.epochs, self.loaders = [], []
    def before_train(self): self.epochs.append(dict(anchors=[], partners=[], same_class=True))
    def before_batch(self):
        pos, y = self.xb[1], self.yb[0]
        n = len(y)//2
        ep = self.epochs[-1]
        ep['anchors'] += pos[:n].tolist(); ep['partners'] += pos[n:].tolist()
        ep['same_class'] &= bool(torch.equal(y[:n], y[n:]))
        if not self.loaders: self.loaders = [type(self.dl).__name__, type(self.dl.dl).__name__, type(self.model).__name__]


class CheckLoss(FormulaCheck):
    """tests/reference.py's `FormulaCheck` (each step's loss is the anchors' loss + lam*T^2*KL recomputed without CSKD's
    values, the partners run again through the module inside DDP as it was before the partner pass), also keeping what
    the parent compares across ranks: each training phase's KD sum and anchor count, and each step's loss"""
    def before_fit(self): self.phases, self.losses = [], []
    def before_train(self): self.phases.append([0., 0])
    def before_backward(self):
        super().before_backward()                     # fails the rank if the loss is not the formula
        n = len(self.yall[0])//2
        self.phases[-1][0] += self.kd[-1]*n; self.phases[-1][1] += n
        self.losses.append(self.loss_grad.item())


def n_rows(preds, targs):
    "Metric: how many predictions fastai gathered over the ranks (its `DistributedDL` drops the padding)"
    return len(targs)


def fit_once(seed, num_workers, train_metrics=False, epochs=2):
    set_seed(seed)
    dls = make_dls(num_workers)
    learn = Learner(dls, TinyNet(), loss_func=CrossEntropyLossFlat(), metrics=[accuracy, AccumMetric(n_rows, flatten=False)],
                    cbs=[CSKD(lam=1., T=4.), RecordPairs(), CheckLoss()])
    learn.recorder.train_metrics = train_metrics
    # sync_bn=False on CPU only: `nn.SyncBatchNorm` (fastai's default, sync_bn=True) needs GPUs
    with learn.no_bar(), learn.distrib_ctx(sync_bn=False): learn.fit(epochs, 1e-2)
    rp, cl = learn.record_pairs, learn.check_loss
    return dict(epochs=rp.epochs, loaders=rp.loaders, checked=cl.checked, kd_local=cl.phases, losses=cl.losses,
                values=[[float(v) for v in vs] for vs in learn.recorder.values],
                names=list(learn.recorder.metric_names),
                params=torch.cat([p.detach().flatten() for p in learn.model.parameters()]).tolist(),
                buffers=torch.cat([b.detach().float().flatten() for b in learn.model.buffers()]).tolist(),
                after=[type(learn.dls.train).__name__, type(learn.model).__name__, len(learn.metrics)])


class RecordCache(Callback):
    "After `CSKD(partner='cache')` took the positions off the batch: they must be the rows' positions (the second input)"
    order, run_valid = CSKD.order + 1, False
    def before_fit(self): self.anchors, self.positions_match, self.loaders = [], True, []
    def before_batch(self):
        pos = self.xb[1]
        self.anchors += pos.tolist()
        self.positions_match &= bool(torch.equal(self.learn.cskd.source.pos.cpu(), pos.cpu())) and len(self.yb) == 1
        if not self.loaders: self.loaders = [type(self.dl).__name__, type(self.dl.dl).__name__, type(self.model).__name__]


def fit_cache(seed, epochs=2):
    "A fit with `CSKD(partner='cache')`: every rank should end with the same cache, holding both ranks' anchors"
    set_seed(seed)
    learn = Learner(make_dls(0), TinyNet(), loss_func=CrossEntropyLossFlat(), metrics=accuracy,
                    cbs=[CSKD(partner='cache'), RecordCache()])
    with learn.no_bar(), learn.distrib_ctx(sync_bn=False): learn.fit(epochs, 1e-2)
    cb, rc = learn.cskd.source, learn.record_cache
    return dict(anchors=rc.anchors, positions_match=rc.positions_match, loaders=rc.loaders,
                cache=cb.cache.float().tolist(), seen=cb.seen.tolist(),
                names=list(learn.recorder.metric_names), values=[[float(v) for v in vs] for vs in learn.recorder.values],
                params=torch.cat([p.detach().flatten() for p in learn.model.parameters()]).tolist())


RUNS = dict(seed0=dict(seed=0, num_workers=0),
            seed0_again=dict(seed=0, num_workers=0),
            seed1_workers=dict(seed=1, num_workers=1, train_metrics=True),
            cache=dict(seed=2, fn=fit_cache))


def _broadcast_cpu(self, t, rank):
    "`DistributedDL._broadcast` without its `.cuda()` (NCCL needs CUDA tensors, gloo takes CPU ones)"
    t = torch.LongTensor(t)
    torch.distributed.broadcast(t, rank)
    return t.tolist()


def _fit(fn=fit_once, **kw): return fn(**kw)


if __name__ == '__main__':
    # The one test-only shim: fastai broadcasts each epoch's indices with NCCL through `.cuda()` tensors; on CPU
    # (gloo) the same broadcast is done on CPU tensors. The library itself has no shim.
    DistributedDL._broadcast = _broadcast_cpu
    out, names, rank = sys.argv[1], sys.argv[2:], int(os.environ['RANK'])
    torch.set_num_threads(1)
    res = dict(rank=rank, world_size=int(os.environ['WORLD_SIZE']), runs={n: _fit(**RUNS[n]) for n in names})
    with open(os.path.join(out, f'rank{rank}.json'), 'w') as f: json.dump(res, f)
