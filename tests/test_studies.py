"""The studies' numbers, recomputed from their saved results with plain numpy/scipy (independent of the notebooks),
and checked against what the notebooks say.

`headline()` is the dict of figures the front page and `compare`'s note may quote (run this file as a script to
print it); `digits_points()` and `regime_points()` are the points of the ΔECE-against-overconfidence figure."""
import json, re
from pathlib import Path

import numpy as np
import pytest
from reference import t_quantile, paired, mean_std, softmax, ref_ece   # the statistics and ECE: tests/reference.py

ROOT = Path(__file__).resolve().parent.parent
TUT = ROOT/'nbs'/'tutorials'
REGIME = TUT/'regime_study'
DIGITS = TUT/'digits_study'


# ---------------------------------------------------------------------------------------------------- metrics
def ece15(P, y): return ref_ece(P, y, 15)

def nll_of(P, y): return float(-np.mean(np.log(np.maximum(P[np.arange(len(y)), y], 1e-12))))


# ---------------------------------------------------------------------------------------------------- results
def regime_runs():
    "Every saved regime-study run: name -> its JSON"
    return {f.stem: json.loads(f.read_text()) for f in sorted(REGIME.glob('*.json'))}

PCT = {'test_err': 100, 'test_nll': 1, 'test_ece': 100, 'gap': 100, 'ts_nll': 1, 'ts_ece': 100, 'ts_gap': 100}

def _val(r, k):
    if k == 'gap': return (r['mean_conf'] - r['test_acc'])*100
    if k == 'ts_gap': return (r['ts_mean_conf'] - r['test_acc'])*100
    return r[k]*PCT[k]

def _of(runs, method, frac=1.):
    return {r['seed']: r for r in runs.values() if r['method'] == method and abs(r['frac'] - frac) < 1e-9}

def headline():
    """The regime study's figures (200 epochs; error, ECE and confidence − accuracy in %, NLL in nats): mean and std
    (ddof=1) over seeds per method; paired differences over seeds with 95% Student-t intervals"""
    runs = regime_runs()
    out = dict(methods={}, diffs={})
    rows = {'ce': ('ce', 'test'), 'cskd': ('cskd', 'test'), 'ce+ts': ('ce', 'ts'), 'cskd+ts': ('cskd', 'ts'),
            'pass': ('pass', 'test'), 'cskd-nobn': ('cskd-nobn', 'test'), 'ls': ('ls', 'test'),
            'cskd-cache': ('cskd-cache', 'test'), 'cskd-warmup': ('cskd-warmup', 'test')}
    keys = {'test': ('test_err', 'test_nll', 'test_ece', 'gap'), 'ts': ('test_err', 'ts_nll', 'ts_ece', 'ts_gap')}
    names = ('err', 'nll', 'ece', 'gap')
    per = {}
    for name, (m, kind) in rows.items():
        rs = _of(runs, m)
        if not rs: continue
        per[name] = {s: {n: _val(r, k) for n, k in zip(names, keys[kind])} for s, r in rs.items()}
        out['methods'][name] = {n: mean_std([v[n] for v in per[name].values()]) for n in names} | {'seeds': sorted(rs)}
    for a, b in [('cskd', 'ce'), ('cskd+ts', 'ce+ts'), ('cskd', 'ce+ts'), ('pass', 'ce'), ('cskd', 'pass'),
                 ('cskd-nobn', 'ce'), ('ls', 'ce'), ('ls', 'cskd')]:
        if a not in per or b not in per: continue
        seeds = sorted(set(per[a]) & set(per[b]))
        out['diffs'][f'{a} - {b}'] = {n: paired([per[a][s][n] for s in seeds], [per[b][s][n] for s in seeds]) for n in names} | {'seeds': seeds}
    return out

def regime_points():
    "Sweep and full-length points of the regime study: CE's confidence − accuracy and CS-KD − CE (seed-paired means)"
    runs, pts = regime_runs(), []
    for frac in sorted({r['frac'] for r in runs.values()}):
        ce, ck = _of(runs, 'ce', frac), _of(runs, 'cskd', frac)
        seeds = sorted(set(ce) & set(ck))
        if not seeds: continue
        pts.append(dict(study='CIFAR-10 regime', point=f"{ce[seeds[0]]['epochs']} epochs", seeds=len(seeds),
                        ce_gap=np.mean([_val(ce[s], 'gap') for s in seeds]),
                        **{f'd_{n}': np.mean([_val(ck[s], k) - _val(ce[s], k) for s in seeds])
                           for n, k in [('ece', 'test_ece'), ('nll', 'test_nll'), ('err', 'test_err')]}))
    return pts

def digits_points():
    "Points of the digits study: CE's confidence − accuracy and CS-KD − CE on the held-out images (seed-paired means)"
    rs = [json.loads(f.read_text()) for f in sorted(DIGITS.glob('*.json'))]
    pts = []
    for n, e in sorted({(r['n_per_class'], r['epochs']) for r in rs}):
        ce = {r['seed']: r for r in rs if (r['n_per_class'], r['epochs'], r['method']) == (n, e, 'ce')}
        ck = {r['seed']: r for r in rs if (r['n_per_class'], r['epochs'], r['method']) == (n, e, 'cskd')}
        seeds = sorted(set(ce) & set(ck))
        if not seeds: continue
        pts.append(dict(study='digits', point=f"{n}/class, {e} epochs", seeds=len(seeds),
                        ce_gap=np.mean([100*(ce[s]['mean_conf'] - ce[s]['test_acc']) for s in seeds]),
                        d_ece=np.mean([100*(ck[s]['test_ece'] - ce[s]['test_ece']) for s in seeds]),
                        d_nll=np.mean([ck[s]['test_nll'] - ce[s]['test_nll'] for s in seeds]),
                        d_err=np.mean([100*(ck[s]['test_err'] - ce[s]['test_err']) for s in seeds])))
    return pts


# ---------------------------------------------------------------------------------------------------- formatting
def f2(v, sign=False):
    "As the notebooks print: 2 decimals, a true minus sign"
    s = f"{v:+.2f}" if sign else f"{v:.2f}"
    return s.replace('-', '−')

def interval(d): return f"[{f2(d['lo'], True)}, {f2(d['hi'], True)}]"

def md_text(nb):
    return '\n'.join(''.join(c['source']) for c in json.loads(Path(nb).read_text())['cells'] if c['cell_type'] == 'markdown')


# ---------------------------------------------------------------------------------------------------- tests
needs_regime = pytest.mark.skipif(not (REGIME/'ce_s0_f100.json').exists(), reason="regime study results not present")

@needs_regime
def test_saved_metrics_match_the_logits():
    "Every run with saved test logits: error, NLL and ECE recomputed here equal the JSON's (to float16 precision)"
    checked = 0
    for name, r in regime_runs().items():
        f = REGIME/f'{name}_logits.npz'
        if f.exists():
            z = np.load(f); P, y = softmax(z['test_logits']), z['test_y'].astype(int)
        elif (REGIME/f'{name}_test_logits.npz').exists():     # the first two runs saved test logits only
            P, y = softmax(np.load(REGIME/f'{name}_test_logits.npz')['logits']), np.repeat(np.arange(10), 1000)
        else: continue
        assert abs((P.argmax(1) != y).mean() - r['test_err']) < 2e-3, name
        assert abs(nll_of(P, y) - r['test_nll']) < 5e-3*max(1, r['test_nll']), name
        assert abs(ece15(P, y) - r['test_ece']) < 3e-3, name
        assert abs(P.max(1).mean() - r['mean_conf']) < 2e-3, name
        checked += 1
    assert checked >= 2

@pytest.mark.skipif(not list(DIGITS.glob('*.json')), reason="digits study results not present")
def test_digits_metrics_match_the_logits():
    "The digits study's JSON figures equal those recomputed from its saved held-out logits"
    for f in sorted(DIGITS.glob('*.json')):
        r = json.loads(f.read_text()); z = np.load(f.with_name(f.stem + '_logits.npz'))
        P, y = softmax(z['heldout_logits']), z['heldout_y'].astype(int)
        assert len(y) == r['n_heldout'] and abs((P.argmax(1) != y).mean() - r['test_err']) < 3e-3, f.name
        assert abs(nll_of(P, y) - r['test_nll']) < 5e-3*max(1, r['test_nll']) and abs(ece15(P, y) - r['test_ece']) < 3e-3, f.name
        assert abs((softmax(z['train_logits']).argmax(1) == z['train_y']).mean() - r['train_acc']) < 3e-3, f.name

@needs_regime
def test_splits_and_final_epoch():
    "Each run is reported at its last epoch, on all 10,000 test images, with the validation split held out of training"
    for name, r in regime_runs().items():
        assert r['n_test'] == 10000 and r['n_train'] == 1000 and r['n_valid'] == 1000, name
        assert len(r['history']) == r['epochs'] == max(1, round(r['full_epochs']*r['frac'])), name

@needs_regime
def test_regime_notebook_quotes_the_figures():
    "The regime notebook's text quotes the figures recomputed here, with the interval that decides each verdict"
    text = ' '.join(md_text(TUT/'regime_study.ipynb').split())            # line breaks as spaces
    h = headline()
    m, d = h['methods'], h['diffs']
    quotes = [f"{f2(m['ce'][k]['mean'])}{u} → {f2(m['cskd'][k]['mean'])}{u}" for k, u in (('err', '%'), ('nll', ''), ('ece', '%'))]
    quotes += [f"NLL {f2(m['ce+ts']['nll']['mean'])} and ECE {f2(m['ce+ts']['ece']['mean'])}%",
               f"NLL {f2(m['cskd+ts']['nll']['mean'])}, ECE {f2(m['cskd+ts']['ece']['mean'])}%"]
    for a, ks in [('cskd - ce', ('err', 'nll', 'ece')), ('cskd+ts - ce+ts', ('nll', 'ece')), ('cskd - ce+ts', ('nll', 'ece'))]:
        quotes += [f2(d[a][k]['mean'], True) for k in ks] + [interval(d[a][k]) for k in ks]
    assert d['cskd - ce']['err']['lo'] < 0 < d['cskd - ce']['err']['hi'] and 'no clear difference in error' in text
    assert d['cskd - ce']['ece']['hi'] < 0 and d['cskd - ce']['nll']['hi'] < 0
    assert d['cskd+ts - ce+ts']['ece']['lo'] > 0                          # "still worse calibrated"
    # single-seed rows: the seed-0 figures, and the cache sentence as the files have it
    runs = regime_runs()
    r0 = lambda meth: _of(runs, meth)[0]
    for meth in ('ls', 'cskd-cache', 'cskd-warmup'):
        assert len(_of(runs, meth)) == 1 or m[meth]['err']['n'] > 1
        quotes.append(f"{100*r0(meth)['test_err']:.2f}%")
    quotes.append(f"error {100*r0('cskd-cache')['test_err']:.2f}% (CS-KD {100*r0('cskd')['test_err']:.2f}%, "
                  f"cross-entropy {100*r0('ce')['test_err']:.2f}%)")
    assert 'standard deviation over seeds' in text and '(1 seed)' in md_text(TUT/'regime_study.ipynb') + _code(TUT/'regime_study.ipynb')
    # the control: with 3 seeds its intervals, with fewer the caveat
    if 'pass - ce' in d:
        if d['pass - ce']['err']['n'] >= 3:
            for a in ('pass - ce', 'cskd - pass'):
                quotes += [f2(d[a][k]['mean'], True) for k in ('err', 'nll', 'ece')] + [interval(d[a][k]) for k in ('err', 'nll', 'ece')]
            # the partners page quotes the ECE split of the 3 seeds
            page = ' '.join(md_text(ROOT/'nbs'/'02_partners.ipynb').split())
            for a in ('pass - ce', 'cskd - pass'):
                q = f"{f2(d[a]['ece']['mean'], True)} points {interval(d[a]['ece'])}" if a == 'pass - ce' else \
                    f"{f2(d[a]['ece']['mean'], True)} {interval(d[a]['ece'])}"
                assert q in page, q
            assert d['cskd - pass']['ece']['hi'] < 0 and d['cskd - pass']['nll']['hi'] < 0
            if all(d['pass - ce'][k]['lo'] < 0 < d['pass - ce'][k]['hi'] for k in ('err', 'nll', 'ece')):
                assert 'no clear difference in any of the three' in text.lower()
        else: assert 'nothing can be concluded' in text
    missing = [q for q in quotes if q not in text]
    assert not missing, missing
    assert 'compressed' in text and not re.search(r'(that is|is) the crossover|crossover (lies|is)', text.lower())   # no crossover claim

def _code(nb): return '\n'.join(''.join(c['source']) for c in json.loads(Path(nb).read_text())['cells'] if c['cell_type'] == 'code')

SHORT = TUT/'cifar10_study'

def short_study():
    "The short CIFAR-10 study's runs from its saved test probabilities: {(method, seed): metrics in % / nats}"
    z = dict(np.load(SHORT/'predictions.npz'))
    if (TUT/'cifar10_study_cache'/'predictions.npz').exists(): z.update(np.load(TUT/'cifar10_study_cache'/'predictions.npz'))
    out = {}
    for k in z:
        if not k.endswith('/probs'): continue
        m, s, _ = k.split('/'); P = z[k].astype(np.float64); y = z[f'{m}/{s}/targs'].astype(int)
        acc = (P.argmax(1) == y).mean()
        out[(m, int(s))] = dict(err=100*(1-acc), nll=nll_of(P, y), ece=100*ece15(P, y), gap=100*(P.max(1).mean() - acc))
    return out

@pytest.mark.skipif(not (SHORT/'predictions.npz').exists(), reason="short study results not present")
def test_short_study_notebook_quotes_the_figures():
    "The short CIFAR-10 study's text: means, paired differences and their 95% intervals, recomputed from its predictions"
    r, text = short_study(), md_text(TUT/'cifar10_study.ipynb')
    seeds = sorted(s for m, s in r if m == 'ce')
    col = lambda m, k: [r[(m, s)][k] for s in seeds]
    q = [f"{np.mean(col('ce', 'gap')):.1f} points above", f"{abs(np.mean(col('cskd', 'gap'))):.1f} points below",
         f"ECE from {np.mean(col('ce', 'ece')):.1f}% to {np.mean(col('cskd', 'ece')):.1f}%"]
    for m, ks in [('cskd', ('err', 'nll', 'ece')), ('cskd+mixup', ('err',))]:
        for k in ks:
            d = paired(col(m, k), col('ce', k))
            q.append(interval(d))
    missing = [x for x in q if x not in text]
    assert not missing, missing
    d = paired(col('cskd', 'err'), col('ce', 'err'))
    assert d['lo'] < 0 < d['hi'] and 'no clear difference' in text      # the error claim follows the interval
    assert 'not a result of\ntemperature scaling' in text or 'not a result of temperature scaling' in ' '.join(text.split())

def test_paired_interval_is_students_t():
    "The interval of 3 paired differences, written out: mean ± t(0.975, 2)·sd/√3 with t = 4.303"
    d = paired([1., 2., 6.], [0., 0., 0.])
    assert abs(t_quantile(2) - 4.3027) < 1e-3
    sd = np.sqrt(((np.array([1, 2, 6]) - 3)**2).sum()/2)
    assert abs(d['lo'] - (3 - 4.3027*sd/np.sqrt(3))) < 1e-3 and abs(d['hi'] - (3 + 4.3027*sd/np.sqrt(3))) < 1e-3
    assert paired([1.], [0.])['lo'] is None

def test_ece15_on_a_hand_example():
    "Two bins by hand: confidences 0.9, 0.9 (one right) and 0.5 (right): (2·|0.5−0.9| + 1·|1−0.5|)/3"
    P = np.array([[.9, .1], [.9, .1], [.5, .5]]); y = np.array([0, 1, 0])
    assert abs(ece15(P, y) - (2*.4 + .5)/3) < 1e-12


if __name__ == '__main__':
    import pprint
    pprint.pprint(headline(), width=140, sort_dicts=False)
    for p in regime_points() + digits_points(): print(p)
