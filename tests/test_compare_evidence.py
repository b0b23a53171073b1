"The numbers `compare` prints about the regime study, recomputed from the study's saved results with code of their own"
import json
from pathlib import Path
import numpy as np
import pytest
from cskd_fastai.compare import EVIDENCE, DEFAULT_NOTE, LAM_SWEEP

STUDY = Path(__file__).parents[1]/'nbs'/'tutorials'/'regime_study'


def _load(stem, study='regime_study'):
    f = STUDY.parent/study/f'{stem}.json'
    if not f.exists(): pytest.fail(f"{f} is missing: `compare` quotes it")
    return json.loads(f.read_text())


def _pts(x): return round(100*float(x), 1)


def _ece(P, y, M=15):
    "Expected calibration error with M equal-width bins ((m-1)/M, m/M], a confidence of 0 in the first"
    conf, hit = P.max(1), (P.argmax(1) == y).astype(float)
    b = np.clip(np.ceil(conf*M).astype(int) - 1, 0, M - 1)
    return sum(abs(hit[b == m].mean() - conf[b == m].mean())*(b == m).mean() for m in range(M) if (b == m).any())


def _point(study, ce_keys, cskd_keys):
    "Cross-entropy's overconfidence and CS-KD's ECE minus cross-entropy's (points), and the runs' settings"
    if not (Path(__file__).parents[1]/'nbs'/'tutorials'/study/'results.json').exists():      # a folder of per-run JSONs
        ce, cskd = [[_load(s, study) for s in keys] for keys in (ce_keys, cskd_keys)]
        assert [r['method'] for r in ce] == ['ce']*len(ce) and [r['method'] for r in cskd] == ['cskd']*len(cskd)
        assert sorted(r['seed'] for r in ce) == sorted(r['seed'] for r in cskd)          # paired seeds
        assert len({(r['epochs'], r.get('frac'), r['n_train']) for r in ce + cskd}) == 1     # one setting per point
        gap = np.mean([r['mean_conf'] - (1 - r['test_err']) for r in ce])
        d_ece = np.mean([r['test_ece'] for r in cskd]) - np.mean([r['test_ece'] for r in ce])
        return gap, d_ece, dict(n=len(ce), epochs=ce[0]['epochs'], n_train=ce[0]['n_train'])
    # a `compare` folder: everything recomputed from the saved held-out probabilities
    d = Path(__file__).parents[1]/'nbs'/'tutorials'/study
    z, cfg = np.load(d/'predictions.npz'), json.loads((d/'results.json').read_text())['config']
    P = lambda k: (z[f'{k}/probs'].astype(np.float64), z[f'{k}/targs'])
    gap = np.mean([p.max(1).mean() - (p.argmax(1) == y).mean() for p, y in map(P, ce_keys)])
    d_ece = np.mean([_ece(*P(k)) for k in cskd_keys]) - np.mean([_ece(*P(k)) for k in ce_keys])
    return gap, d_ece, dict(n=len(ce_keys), epochs=cfg['epochs'], n_train=cfg['n_train'], arch=cfg['arch'])


@pytest.mark.parametrize('e', EVIDENCE, ids=[e['run'] for e in EVIDENCE])
def test_each_evidence_point_is_what_the_saved_runs_say(e):
    gap, d_ece, s = _point(*e['files'])
    assert (e['ce_gap'], e['d_ece']) == (_pts(gap), _pts(d_ece))
    assert f"{s['n']} seed{'s' if s['n'] > 1 else ''}" in e['run'] and f"{s['epochs']} " in e['run'] and f"{s['n_train']:,} images" in e['run']
    if 'arch' in s: assert s['arch'] in e['run']


def test_notebook_training_accuracy_sentence():
    "The compare page's example of a run not fitted yet, whose CS-KD ECE gain was already large"
    nb = json.loads((Path(__file__).parents[1]/'nbs'/'06_compare.ipynb').read_text())
    text = ' '.join(' '.join(''.join(c['source']) for c in nb['cells']).split())
    r = _load('ce_s0_f030')
    assert r['epochs'] == 60 and f"with 60 of 200 epochs cross-entropy had {round(100*r['train_acc'])}% training accuracy" in text


def test_default_note_numbers():
    "The note after the digits' default run: CIFAR-10, 200 epochs, 3 seeds"
    ce = [_load(f'ce_s{s}_f100') for s in range(3)]
    cskd = [_load(f'cskd_s{s}_f100') for s in range(3)]
    assert all(r['epochs'] == 200 for r in ce + cskd)
    gap = _pts(np.mean([r['mean_conf'] - (1 - r['test_err']) for r in ce]))
    ece_ce, ece_cskd = _pts(np.mean([r['test_ece'] for r in ce])), _pts(np.mean([r['test_ece'] for r in cskd]))
    ts_ce = _pts(np.mean([r['ts_ece'] for r in ce]))
    note = ' '.join(DEFAULT_NOTE.split())
    assert f"cross-entropy ended {gap} points overconfident" in note
    assert f"CS-KD took its ECE from {ece_ce}% to {ece_cskd}%" in note
    assert f"took it to {ts_ce}%" in note and '3 seeds' in note and '200 epochs' in note
    assert 'epochs' not in note.split('CIFAR-10')[0]            # nothing about the digits run's own length


def test_lambda_sweep():
    "The λ sweep behind the advice: CS-KD's confidence minus accuracy for each λ, one run each, the same setting"
    rs = [_load(f) for f in LAM_SWEEP['files']]
    lam = lambda r: 1. if r['method'] == 'cskd' else float(r['method'].split('cskd-lam')[1])    # the paper's λ=1 unless named
    assert [(lam(r), _pts(r['mean_conf'] - (1 - r['test_err']))) for r in rs] == LAM_SWEEP['points']
    assert len({(r['epochs'], r['frac'], r['seed'], r['n_train']) for r in rs}) == 1
    r = rs[0]
    assert f"seed {r['seed']}" in LAM_SWEEP['run'] and f"{r['epochs']} of 200 epochs" in LAM_SWEEP['run'] and f"{r['n_train']:,} images" in LAM_SWEEP['run']
    g = [p[1] for p in sorted(LAM_SWEEP['points'])]
    assert g == sorted(g, reverse=True)           # confidence falls as λ grows: what the advice says


def test_finetune_numbers():
    "The fine-tuning line: CS-KD minus cross-entropy after fine_tune(8), paired over 3 seeds, 95% Student-t intervals"
    from scipy import stats
    from cskd_fastai.compare import FINETUNE, _finetune_line
    d = STUDY.parent/'finetune_study'
    for n, err, ece in FINETUNE:
        pairs = [[json.loads((d/f'{m}_n{n:03d}_e8_s{s}.json').read_text()) for m in ('ce', 'cskd')] for s in range(3)]
        assert all(a['seed'] == b['seed'] and a['n_per_class'] == b['n_per_class'] == n and a['epochs'] == b['epochs'] == 8
                   for a, b in pairs)
        for key, said in (('test_err', err), ('test_ece', ece)):
            x = np.array([100*(b[key] - a[key]) for a, b in pairs])
            h = stats.t.ppf(0.975, len(x) - 1)*x.std(ddof=1)/np.sqrt(len(x))
            assert said == tuple(round(v, 1) for v in (x.mean(), x.mean() - h, x.mean() + h))
    line = _finetune_line()
    assert '3 seeds' in line and 'fine_tune(8)' in line
