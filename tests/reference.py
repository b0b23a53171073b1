"""Reference computations the tests compare the library with, written once, from the definitions and without the
library's code: calibration metrics, the paired Student-t interval over seeds, the per-step loss of a training step
with `CSKD` (partner forward or partner cache), and the tiny model the fits use.

Tests import it as `from reference import ...` (pytest puts tests/ on `sys.path`); a notebook can import it after
putting the repository's tests/ folder on `sys.path`."""
from __future__ import annotations
import math
from contextlib import nullcontext
import numpy as np
import torch
from fastai.vision.all import Callback, ConvLayer, Flatten, nn
from fastai.callback.fp16 import MixedPrecision, AMPMode
from cskd_fastai.callback import CSKD


# ---------------------------------------------------------------------------------------------------- calibration
def softmax(z):
    "Row-wise softmax of logits `z`, in float64"
    z = np.asarray(z, np.float64); z = z - z.max(1, keepdims=True)
    e = np.exp(z); return e/e.sum(1, keepdims=True)

def ref_bin(c, M):
    "Bin of confidence `c` by the rule: edges e_m = m/M as floats, bin m is (e_m, e_{m+1}], 0 in the first"
    edges = [m/M for m in range(M+1)]
    if c == 0: return 0
    for m in range(M):
        if edges[m] < c <= edges[m+1]: return m
    raise AssertionError(c)

def ref_top(probs, targs):
    "(confidence, 1. if right else 0.) of each sample's top-label prediction (the first of tied classes)"
    P = np.asarray(probs, dtype=np.float64); y = np.asarray(targs)
    out = []
    for row, t in zip(P, y):
        k = max(range(len(row)), key=lambda j: (row[j], -j))
        out.append((float(row[k]), 1.0 if k == t else 0.0))
    return out

def ref_binned_gaps(pairs, assign):
    "pairs: (confidence, hit); assign: bin of each pair -> dict bin -> (n, mean conf, mean hit)"
    bins = {}
    for (c, h), b in zip(pairs, assign): bins.setdefault(b, []).append((c, h))
    return {b: (len(v), sum(c for c, _ in v)/len(v), sum(h for _, h in v)/len(v)) for b, v in bins.items()}

def ref_ece(probs, targs, M=15):
    """Expected calibration error: |accuracy - confidence| of the top label in M equal-width bins (e_m, e_{m+1}] with
    e_m = m/M (a confidence of 0 in the first), weighted by the bins' sizes. Vectorised over samples (studies hold
    thousands of predictions); the bin rule is written as comparisons with the edges, as `ref_bin` states it"""
    P = np.asarray(probs, dtype=np.float64); y = np.asarray(targs)
    k = P.argmax(1)                                       # the first of tied classes
    conf, hit = P[np.arange(len(P)), k], (k == y).astype(np.float64)
    tot = 0.
    for m in range(M):
        inb = (conf > m/M) & (conf <= (m+1)/M)
        if m == 0: inb |= conf == 0
        if inb.any(): tot += inb.sum()*abs(hit[inb].mean() - conf[inb].mean())
    return tot/len(P)

def ref_mce(probs, targs, M):
    pairs = ref_top(probs, targs)
    stats = ref_binned_gaps(pairs, [ref_bin(c, M) for c, _ in pairs])
    return max(abs(a - c) for n, c, a in stats.values())

def ref_adaptive_ece(probs, targs, M):
    "For distinct confidences: sort, cut into M runs of sizes differing by at most 1 (larger runs first)"
    pairs = sorted(ref_top(probs, targs))
    assert len({c for c, _ in pairs}) == len(pairs), "reference needs distinct confidences"
    n, total, start = len(pairs), 0., 0
    for m in range(M):
        size = n//M + (1 if m < n % M else 0)
        chunk = pairs[start:start+size]; start += size
        if chunk: total += len(chunk)/n*abs(sum(h for _, h in chunk)/len(chunk) - sum(c for c, _ in chunk)/len(chunk))
    return total

def ref_adaptive_ece_ties(probs, targs, M):
    "With ties: the edges are the last confidence of each of the M runs, and a bin takes the confidences in (previous edge, edge]"
    pairs = ref_top(probs, targs)
    cs, n = sorted(c for c, _ in pairs), len(pairs)
    ends, pos = [], 0
    for m in range(M - 1):
        pos += n//M + (1 if m < n % M else 0)
        ends.append(cs[pos - 1])
    assign = [sum(1 for e in ends if e < c) for c, _ in pairs]
    stats = ref_binned_gaps(pairs, assign)
    return sum(k/n*abs(a - c) for k, c, a in stats.values())

def ref_classwise(probs, targs, M):
    P = np.asarray(probs, dtype=np.float64); y = np.asarray(targs); N, K = P.shape
    per = []
    for k in range(K):
        pairs = [(float(P[i, k]), 1.0 if y[i] == k else 0.0) for i in range(N)]
        stats = ref_binned_gaps(pairs, [ref_bin(c, M) for c, _ in pairs])
        per.append(sum(n/N*abs(a - c) for n, c, a in stats.values()))
    return per

def ref_nll(probs, targs):
    P = np.asarray(probs, dtype=np.float64)
    return -sum(math.log(max(P[i, t], 1e-12)) for i, t in enumerate(np.asarray(targs)))/len(P)

def ref_brier(probs, targs):
    P = np.asarray(probs, dtype=np.float64)
    return sum(sum((P[i, k] - (1. if k == t else 0.))**2 for k in range(P.shape[1])) for i, t in enumerate(np.asarray(targs)))/len(P)

def ref_top_k_error(probs, targs, k):
    "k=1: the argmax (first of tied) is wrong; k>1: at least k classes have a strictly higher probability than the label"
    P = np.asarray(probs, dtype=np.float64); y = np.asarray(targs)
    if k == 1: return sum(h == 0. for _, h in ref_top(P, y))/len(y)
    return sum(sum(p > row[t] for p in row) >= k for row, t in zip(P, y))/len(y)

def random_preds(n, k, seed, scale=3., absent=()):
    "`n` random (probabilities, labels) of `k` classes, labels drawn from the probabilities; the classes in `absent` never a label"
    g = torch.Generator().manual_seed(seed)
    probs = (torch.randn(n, k, generator=g, dtype=torch.float64)*scale).softmax(1)
    targs = torch.multinomial(probs, 1, generator=g)[:, 0]
    for a in absent: targs[targs == a] = (a + 1) % k        # relabel class `a` as another class
    return probs, targs


# ---------------------------------------------------------------------------------------------------- statistics
def t_quantile(df, q=0.975):
    "The `q` quantile of Student's t with `df` degrees of freedom"
    from scipy.stats import t
    return float(t.ppf(q, df))

def paired(a, b):
    "a − b over paired seeds: mean, std (ddof=1), the 95% Student-t interval (lo, hi), p (two-sided), n; with one seed no interval"
    d = np.asarray(a, float) - np.asarray(b, float)
    n = len(d)
    if n < 2: return dict(mean=float(d.mean()), std=None, lo=None, hi=None, p=None, n=n)
    from scipy.stats import t
    sd = float(d.std(ddof=1)); se = sd/np.sqrt(n)
    h = t_quantile(n-1)*se
    p = float(2*t.sf(abs(d.mean())/se, n-1)) if se > 0 else 0.
    return dict(mean=float(d.mean()), std=sd, lo=float(d.mean()-h), hi=float(d.mean()+h), p=p, n=n)

def mean_std(v):
    "Mean and std (ddof=1; None for one value) of `v`, and its length"
    v = np.asarray(v, float)
    return dict(mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else None, n=len(v))


# ---------------------------------------------------------------------------------------------------- models
def tiny_cnn(n_out=10, width=8):
    "A small BatchNorm + dropout CNN: cheap, and exercises both training-mode behaviours of a partner pass"
    return nn.Sequential(ConvLayer(3, width, stride=2), ConvLayer(width, 2*width, stride=2), nn.AdaptiveAvgPool2d(1),
                         Flatten(), nn.Dropout(0.2), nn.Linear(2*width, n_out))


# ---------------------------------------------------------------------------------------------------- the loss of a step
def plain(t): return torch.Tensor.as_subclass(t, torch.Tensor) if isinstance(t, torch.Tensor) else t
def first_logits(out): return out[0] if isinstance(out, (tuple, list)) else out

def kl_rows(target, anchor, T):
    "`KL(softmax(target/T) || softmax(anchor/T))` of each row, written out (not `cskd_loss`)"
    q, logp = torch.softmax(target.float()/T, 1), torch.log_softmax(anchor.float()/T, 1)
    return (q*(q.clamp_min(1e-30).log() - logp)).sum(1)

def lam_of(cb, learn): return float(cb.lam(learn.pct_train)) if callable(cb.lam) else float(cb.lam)

def rnn_regularizers(learn):
    "What fastai's `RNNRegularizer` (text learners) adds to the loss after `CSKD`: its AR and TAR terms, recomputed"
    reg, rnn = getattr(learn, 'rnn_regularizer', None), getattr(learn, 'rnn', None)
    if reg is None or rnn is None: return 0.
    res, h = 0., rnn.raw_out
    if reg.alpha: res += reg.alpha*rnn.out.detach().float().pow(2).mean()
    if reg.beta and len(h) > 1: res += reg.beta*(h[:,1:] - h[:,:-1]).detach().float().pow(2).mean()
    return res

def _autocast(learn):
    "The region fastai's `MixedPrecision` autocasts a batch in (on CUDA, in its `amp_mode`'s dtype); none without it or without CUDA"
    mp = [c for c in learn.cbs if isinstance(c, MixedPrecision)]
    if not mp or not torch.cuda.is_available(): return nullcontext()
    return torch.autocast('cuda', dtype=torch.bfloat16 if AMPMode(mp[0].amp_mode) == AMPMode.BF16 else torch.float16)


class FormulaCheck(Callback):
    """`partner='forward'`: each training step's loss recomputed without `CSKD`'s own values. Before `CSKD` splits the
    batch, anchors and partners must have the same labels, and the paired batch, the random state, the model's buffers
    and the attributes of its stateful modules (those with `reset`, e.g. an RNN's hidden state) are kept. Before the
    backward pass the partner half is run through the model as it was then (same mode, same dropout draws, the same
    autocast, on stand-in buffers and state, all put back after), and the loss to backpropagate must be
    `loss_func(anchors) + λ T² KL` (+ fastai's RNN regularizers) written out here. `get_logits` picks the logits from the
    model's output (default: the output, or its first element). `checked` counts the steps; `lams` and `kd` hold each
    step's λ and λT²KL"""
    order, run_valid = CSKD.order-1, False                    # sees the whole paired batch
    def __init__(self, tol=1e-4, get_logits=first_logits):
        self.tol, self.get_logits, self.checked, self.lams, self.kd = tol, get_logits, 0, [], []
    @property
    def steps(self): return self.checked
    def _model(self): return getattr(self.learn.model, 'module', self.learn.model)
    def before_batch(self):
        ys = [plain(y) for y in self.learn.yb]
        n = len(ys[0])//2
        assert len(ys[0]) == 2*n and n > 0, f"expected a paired batch, got {len(ys[0])} rows"
        y0 = ys[0].reshape(len(ys[0]), -1)                    # (bs,) or (bs, 1) (tabular)
        bad = (y0[:n] != y0[n:]).any(1).nonzero().flatten().tolist()
        assert not bad, f"anchor and partner labels differ at rows {bad[:5]}: {y0[:n][bad[:5]].flatten().tolist()} vs {y0[n:][bad[:5]].flatten().tolist()}"
        self.xall, self.yall = [plain(x).clone() for x in self.learn.xb], [y.clone() for y in ys]
        m = self._model()                                     # CSKD's partner forward comes next, before the anchors'
        self.bufs = [(mm, k, b.clone()) for mm in m.modules() for k, b in mm._buffers.items() if b is not None]
        self.state = [(mm, {k: v for k, v in vars(mm).items() if not k.startswith('_') and k != 'training'})
                      for mm in m.modules() if callable(getattr(mm, 'reset', None))]
        self.rng = torch.get_rng_state()
    def _partner_logits(self, train):
        "The partners through the model with the buffers, state and random state of `before_batch`, on stand-ins"
        m, n = self._model(), len(self.yall[0])//2
        bufs, state = [(mm, k, mm._buffers[k]) for mm, k, _ in self.bufs], [(mm, dict(vars(mm))) for mm, _ in self.state]
        rng, modes = torch.get_rng_state(), [(mm, mm.training) for mm in m.modules()]
        try:
            for mm, k, b in self.bufs: mm._buffers[k] = b.clone()
            for mm, d in self.state: mm.__dict__.update(d)
            if not train: m.eval()
            torch.set_rng_state(self.rng)
            with torch.no_grad(), _autocast(self.learn): return plain(self.get_logits(m(*[x[n:] for x in self.xall]))).float()
        finally:
            for mm, k, b in bufs: mm._buffers[k] = b
            for mm, d in state: mm.__dict__.update(d)
            for mm, t in modes: mm.training = t
            torch.set_rng_state(rng)
    def before_backward(self):
        cb, n = self.learn.cskd, len(self.yall[0])//2
        lam, T = lam_of(cb, self.learn), cb.T
        target = self._partner_logits(getattr(cb.source, 'train', True))
        pred = self.learn.pred if isinstance(self.learn.pred, torch.Tensor) else self.get_logits(self.learn.pred)
        kd = kl_rows(target, plain(pred.detach()).float(), T).mean()
        base = self.learn.loss_func(self.learn.pred.detach() if isinstance(self.learn.pred, torch.Tensor) else self.learn.pred,
                                    *[y[:n] for y in self.yall]) + rnn_regularizers(self.learn)
        torch.testing.assert_close(plain(self.learn.loss_grad.detach()).float(), plain(base + lam*T**2*kd).float(),
                                   rtol=self.tol, atol=self.tol)
        self.checked += 1; self.lams.append(lam); self.kd.append(float(lam*T**2*kd))


def train_labels(dl):
    "The encoded label of each item of `dl.dataset`, by position, read item by item through fastai's own indexing"
    ds = dl.dataset
    if hasattr(ds, 'ys') and hasattr(ds, 'y_names'): return torch.as_tensor(np.asarray(ds.ys.iloc[:, 0]), dtype=torch.long)
    return torch.tensor([int(ds[i][-1]) for i in range(len(ds))])


class CacheCheck(Callback):
    """`partner='cache'`: the positions appended to each batch are the anchors' (their labels, read item by item, agree),
    each drawn partner is of its anchor's class, and the loss is the anchors' loss + λ T² mean(seen·KL) with the targets
    read from a table of each item's last logits (float16, as the cache stores them) that this callback keeps itself
    (fresh for each new `CacheCheck`). `steps` counts the steps, `kd` holds each step's λT²KL, `cached_partners` the
    partners that had a target"""
    order, run_valid = CSKD.order-1, False
    def __init__(self, tol=1e-3): self.tol, self.steps, self.kd, self.table, self.cached_partners = tol, 0, [], None, 0
    def before_train(self):
        if self.table is None: self.labels = train_labels(self.dls.train)
    def before_batch(self):
        *ys, pos = [plain(y) for y in self.learn.yb]
        pos = pos.cpu()                                       # the check works on the CPU, wherever the model is
        assert torch.equal(ys[0].cpu().reshape(-1), self.labels[pos]), "the positions appended to the batch are not the anchors'"
        self.pos, self.anchor_y = pos.clone(), ys[0].clone()
    def before_backward(self):
        cb, pred = self.learn.cskd, plain(self.learn.pred.detach()).float().cpu()
        lam, T = lam_of(cb, self.learn), cb.T
        if self.table is None: self.table, self.seen = torch.zeros(len(self.labels), pred.shape[1]), torch.zeros(len(self.labels), dtype=torch.bool)
        pidx = torch.as_tensor(cb.source.partner_idx).cpu() if lam > 0 else self.pos
        assert torch.equal(self.labels[pidx], self.labels[self.pos]), "a cached partner of another class"
        kd = (kl_rows(self.table[pidx], pred, T)*self.seen[pidx]).mean()
        base = (self.learn.loss_func(self.learn.pred.detach(), self.anchor_y) + rnn_regularizers(self.learn)).cpu()
        torch.testing.assert_close(plain(self.learn.loss_grad.detach()).float().cpu(), plain(base + lam*T**2*kd).float(),
                                   rtol=self.tol, atol=self.tol)
        self.cached_partners += int(self.seen[pidx].sum())
        self.table[self.pos] = pred.clamp(-6e4, 6e4).half().float(); self.seen[self.pos] = True
        self.steps += 1; self.kd.append(float(lam*T**2*kd))
