#!/usr/bin/env python
"""Write `cskd_fastai/evidence.json`: what the studies measured, as `compare`'s report quotes it, recomputed from the
saved runs under nbs/tutorials/.

    python tools/make_evidence.py            # rewrite cskd_fastai/evidence.json from the saved runs
    python tools/make_evidence.py --check    # exit 1 if the file is not what the saved runs give
    python tools/make_evidence.py --show     # print the rows

A row is one setting of one study and one CS-KD method paired with cross-entropy over the seeds both have:
cross-entropy's held-out error, ECE and mean confidence minus accuracy, and CS-KD minus cross-entropy in top-1
error, NLL and ECE (the mean over the paired seeds, with its 95% Student-t interval where there are two or more).
Error, ECE and confidence are in percentage points rounded to 0.1, NLL in nats rounded to 0.001: the report
prints them as they are here. Every setting that has both methods is a row, whichever way CS-KD moved ECE.
`lam_sweeps` holds, per setting and seed with two or more values of λ, CS-KD's confidence minus accuracy for each.

Adding runs
- More runs of a study listed in STUDIES below (another seed, setting, or a CS-KD method named in its `methods`):
  save them where the study saves its runs, under the study's naming, then run this tool and commit the JSON.
  A new seed joins its setting's row; a new setting, or a method of `methods` with cross-entropy runs of the same
  setting and seeds, becomes a row.
- A new study: add a `Study(...)` to STUDIES: its folder under nbs/tutorials/, its title, whether its models start
  from pretrained weights, the CS-KD methods to pair with cross-entropy, and either `keys` and `setting` for a
  folder of one JSON file per run (each with `method`, `seed`, `test_err`, `test_nll`, `test_ece` and `mean_conf`,
  as tools/digits_study.py writes them) or `compare_folder=True` for a `cskd-fastai compare --out` folder (read from
  its results.json and predictions.npz); `aliases` renames a method of the files (e.g. 'cskd-drop', the paper's CS-KD,
  as 'cskd'). A study whose notebook nbs/tutorials/<first folder>.ipynb exists gets its page's address; a CS-KD
  method named in METHOD_NAMES gets that name. Then add the folder to FOLDERS in tests/test_compare_evidence.py.
"""
from __future__ import annotations
import argparse, json, math, re, sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TUT = ROOT/'nbs'/'tutorials'
OUT = ROOT/'cskd_fastai'/'evidence.json'
SITE = 'https://cskd-fastai.readthedocs.io/tutorials/'
METHOD_NAMES = {'cskd': 'CS-KD', 'cskd-nodrop': 'CS-KD, partner pass without dropout',
                'cskd-nodrop-lam2': 'CS-KD, partner pass without dropout, λ=2'}


@dataclass
class Study:
    folder: str                          # under nbs/tutorials/
    title: str                           # as the report names it
    pretrained: bool = False             # models start from pretrained weights
    methods: tuple = ('cskd',)           # CS-KD methods paired with cross-entropy ('ce')
    keys: tuple = ()                     # per-run JSON: the fields that name a setting
    setting: Callable | None = None      # a run's JSON -> the setting in words
    compare_folder: bool = False         # a `cskd-fastai compare --out` folder
    lam_sweep: bool = False              # collect CS-KD's confidence minus accuracy per λ
    aliases: dict | None = None          # a method's name in the files -> its name here ('cskd-drop' -> 'cskd': the paper's CS-KD)


def _regime_setting(r):
    sched = f"{r['full_epochs']}-epoch schedule compressed to {r['epochs']}" if r['frac'] < 1 else f"{r['epochs']} epochs"
    return f"CIFAR-10, {r['n_train']:,} images, {sched}"

STUDIES = [
    Study('regime_study', 'the regime study', keys=('frac', 'epochs', 'full_epochs', 'n_train'), setting=_regime_setting,
          lam_sweep=True),
    Study('cifar10_study', 'the CIFAR-10 study', compare_folder=True),
    Study('finetune_study', 'the fine-tuning study', pretrained=True, keys=('n_per_class', 'epochs'),
          setting=lambda r: f"5 CIFAR-10 classes, {r['n_per_class']} images per class, fine_tune({r['epochs']}) from a stand-in "
                            "pretrained backbone"),
    Study('digits_study', 'the digits study', methods=('cskd', 'cskd-nodrop'), keys=('n_per_class', 'epochs'),
          setting=lambda r: f"digits, {r['n_per_class']} images per class, {r['epochs']} epochs"),
    Study('dropout_study/digits', 'the dropout study', methods=('cskd', 'cskd-nodrop', 'cskd-nodrop-lam2'), keys=('n_per_class', 'epochs'),
          setting=lambda r: f"digits, {r['n_per_class']} images per class, {r['epochs']} epochs"),
    Study('dropout_study/finetune', 'the dropout study', pretrained=True,
          methods=('cskd', 'cskd-nodrop', 'cskd-nodrop-lam2', 'cskd-nodrop-lam0.25', 'cskd-nodrop-unfrozen'),
          aliases={'cskd-drop': 'cskd'}, keys=('n_per_class', 'epochs'),
          setting=lambda r: f"5 CIFAR-10 classes, {r['n_per_class']} images per class, fine_tune({r['epochs']}) from a stand-in "
                            "pretrained backbone"),
    Study('dropout_study/finetune_strong', 'the dropout study', pretrained=True, methods=('cskd', 'cskd-nodrop', 'cskd-nodrop-lam2'),
          aliases={'cskd-drop': 'cskd'}, keys=('n_per_class', 'epochs'),
          setting=lambda r: f"5 CIFAR-10 classes, {r['n_per_class']} images per class, fine_tune({r['epochs']}) from a stronger "
                            "stand-in pretrained backbone"),
    Study('dropout_study/text', 'the dropout study', methods=('cskd', 'cskd-nodrop'), aliases={'cskd-drop': 'cskd'},
          keys=('n_per_class', 'epochs'),
          setting=lambda r: f"text (6 classes of docstrings), AWD-LSTM from scratch, {r['n_per_class']} per class, {r['epochs']} epochs"),
]


# ---------------------------------------------------------------------------------------------------- arithmetic
def ece(P, y, n_bins=15):
    "Expected calibration error with `n_bins` equal-width bins ((m-1)/M, m/M] of the top probability, 0 in the first"
    conf, hit = P.max(1), (P.argmax(1) == y).astype(float)
    b = np.clip(np.ceil(conf*n_bins).astype(int) - 1, 0, n_bins - 1)
    return float(sum(abs(hit[b == m].mean() - conf[b == m].mean())*(b == m).mean() for m in range(n_bins) if (b == m).any()))

def paired(d):
    "Mean of the differences `d` and its 95% Student-t interval (None, None with one difference)"
    d = np.asarray(d, float)
    if len(d) < 2: return float(d.mean()), None, None
    from scipy.stats import t
    h = float(t.ppf(0.975, len(d) - 1))*float(d.std(ddof=1))/math.sqrt(len(d))
    return float(d.mean()), float(d.mean() - h), float(d.mean() + h)

def _r(v, nd): return None if v is None else round(v, nd) + 0.   # + 0. turns -0.0 into 0.0


# ---------------------------------------------------------------------------------------------------- reading runs
def _rel(p): return Path(p).relative_to(ROOT).as_posix()

def json_runs(study: Study) -> dict:
    "(setting, method) -> {seed: figures} of a folder of one JSON file per run"
    out = {}
    for f in sorted((TUT/study.folder).glob('*.json')):
        r = json.loads(f.read_text())
        if not {'method', 'seed', 'test_err', 'test_nll', 'test_ece', 'mean_conf'} <= set(r): continue
        key = tuple(r[k] for k in study.keys)
        out.setdefault((key, (study.aliases or {}).get(r['method'], r['method'])), {})[r['seed']] = dict(
            err=100*r['test_err'], nll=r['test_nll'], ece=100*r['test_ece'], gap=100*(r['mean_conf'] - (1 - r['test_err'])),
            setting=study.setting(r), file=_rel(f))
    return out

def compare_runs(study: Study) -> dict:
    "(setting, method) -> {seed: figures} of a `cskd-fastai compare --out` folder, from its held-out probabilities"
    d = TUT/study.folder
    cfg = json.loads((d/'results.json').read_text())['config']
    setting = f"CIFAR-10, {cfg['n_train']:,} images, {cfg['arch']}, {cfg['epochs']} epochs"
    out = {}
    with np.load(d/'predictions.npz') as z:
        for k in sorted(z.files):
            if not k.endswith('/probs'): continue
            m, s, _ = k.split('/')
            P, y = z[k].astype(np.float64), z[f'{m}/{s}/targs'].astype(int)
            err = float((P.argmax(1) != y).mean())
            out.setdefault(((), m), {})[int(s)] = dict(
                err=100*err, nll=float(-np.log(np.maximum(P[np.arange(len(y)), y], 1e-300)).mean()), ece=100*ece(P, y, cfg['n_bins']),
                gap=100*(P.max(1).mean() - (1 - err)), setting=setting, file=f"{_rel(d/'predictions.npz')}:{m}/{s}")
    return out


# ---------------------------------------------------------------------------------------------------- rows
def rows(study: Study) -> list:
    "The study's rows: each setting and CS-KD method of `study.methods` paired with cross-entropy over their common seeds"
    runs = compare_runs(study) if study.compare_folder else json_runs(study)
    page = study.folder.split('/')[0]
    url = f"{SITE}{page}.html" if (TUT/f'{page}.ipynb').exists() else None
    res = []
    for (key, m), by_seed in runs.items():
        if m not in study.methods or (key, 'ce') not in runs: continue
        ce = runs[key, 'ce']
        seeds = sorted(set(ce) & set(by_seed))
        if not seeds: continue
        row = dict(study=study.folder, title=study.title, url=url,
                   setting=by_seed[seeds[0]]['setting'], method=m, method_name=METHOD_NAMES.get(m, m),
                   pretrained=study.pretrained, seeds=seeds,
                   ce_err=_r(np.mean([ce[s]['err'] for s in seeds]), 1), ce_ece=_r(np.mean([ce[s]['ece'] for s in seeds]), 1),
                   ce_gap=_r(np.mean([ce[s]['gap'] for s in seeds]), 1))
        for k, nd in (('err', 1), ('nll', 3), ('ece', 1)):
            mean, lo, hi = paired([by_seed[s][k] - ce[s][k] for s in seeds])
            row.update({f'd_{k}': _r(mean, nd), f'd_{k}_lo': _r(lo, nd), f'd_{k}_hi': _r(hi, nd)})
        row['files'] = {'ce': [ce[s]['file'] for s in seeds], m: [by_seed[s]['file'] for s in seeds]}
        res.append((key, m, row))
    return [r for _, _, r in sorted(res, key=lambda t: (t[0], study.methods.index(t[1])))]

def lam_sweeps(study: Study) -> list:
    "Per setting and seed with two or more values of λ: CS-KD's confidence minus accuracy for each λ (T and the rest as the paper's)"
    runs, by = json_runs(study), {}
    for (key, m), by_seed in runs.items():
        lam = 1. if m == 'cskd' else float(m.split('cskd-lam')[1]) if re.fullmatch(r'cskd-lam[\d.]+', m) else None
        if lam is None: continue
        for s, v in by_seed.items(): by.setdefault((key, s), {})[lam] = v
    return [dict(study=study.folder, title=study.title, setting=next(iter(pts.values()))['setting'], seed=s,
                 points=[[lam, _r(pts[lam]['gap'], 1)] for lam in sorted(pts)], files=[pts[lam]['file'] for lam in sorted(pts)])
            for (key, s), pts in sorted(by.items()) if len(pts) >= 2]

def build() -> dict:
    "The whole file"
    present = [s for s in STUDIES if (TUT/s.folder).is_dir()]
    return dict(about="What the studies measured: cross-entropy's held-out error, ECE and mean confidence minus accuracy, and CS-KD "
                      "minus cross-entropy (d_*), paired by seed, with 95% Student-t intervals (_lo, _hi) over two or more seeds; "
                      "points, NLL in nats. Written by tools/make_evidence.py from the saved runs under nbs/tutorials/.",
                runs=[r for s in present for r in rows(s)],
                lam_sweeps=[w for s in present if s.lam_sweep for w in lam_sweeps(s)])

def dumps(ev) -> str: return json.dumps(ev, indent=1, ensure_ascii=False) + '\n'


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--check', action='store_true', help="exit 1 if the file is not what the saved runs give")
    ap.add_argument('--show', action='store_true', help="print the rows")
    a = ap.parse_args()
    ev = build()
    if a.show:
        for r in sorted(ev['runs'], key=lambda r: r['ce_gap']):
            print(f"{r['ce_gap']:+6.1f} -> ECE {r['d_ece']:+6.1f}  error {r['d_err']:+6.1f}  {r['method']:<12} {len(r['seeds'])} seed(s)  "
                  f"{r['title']}: {r['setting']}")
        for w in ev['lam_sweeps']: print('λ sweep:', w['setting'], 'seed', w['seed'], w['points'])
    if a.check:
        same = OUT.exists() and OUT.read_text(encoding='utf-8') == dumps(ev)
        print(f"{OUT.relative_to(ROOT)} is {'up to date' if same else 'NOT what the saved runs give: run tools/make_evidence.py'}")
        sys.exit(0 if same else 1)
    if not a.show:
        OUT.write_text(dumps(ev), encoding='utf-8')
        print(f"wrote {OUT.relative_to(ROOT)}: {len(ev['runs'])} runs, {len(ev['lam_sweeps'])} λ sweep(s)")
