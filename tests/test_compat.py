"""The fastai compatibility matrix (tests/compat_cases.py): each fastai data constructor × partner source, the models
whose output is not a bare tensor, and the errors and state issues, each a tiny fit checked at every step against a
computation of its own. The last test checks that the "Works with" page (nbs/works_with.ipynb) shows the outcomes
these tests just had: regenerate it with `python tests/compat_cases.py --page` when one changes."""
import json, re
from pathlib import Path

import numpy as np
import pytest
import torch
from fastai.torch_core import set_seed
from fastai.vision.all import Callback, Learner
from cskd_fastai.all import CSKD, paired_dls
from compat_cases import CASES, Data, Skip, run_case, image_dls, fit_checked
from reference import tiny_cnn, train_labels

pytestmark = pytest.mark.slow    # the slow tier (the compatibility matrix: every fastai data constructor × partner source, each a checked fit): `pytest --all` runs it

PAGE = Path(__file__).resolve().parent.parent/'nbs'/'works_with.ipynb'
_outcomes = {}       # (what, partner) -> 'pass' / 'fail' / 'skip', for the cases run in this pytest run


@pytest.fixture(scope='module')
def data(tmp_path_factory): return Data(tmp_path_factory.mktemp('compat'))


@pytest.mark.parametrize('case', CASES, ids=[c.id for c in CASES])
def test_case(case, data):
    set_seed(0)
    _outcomes[case.what, case.partner] = 'fail'
    try: case.run(data)
    except Skip as e:
        _outcomes[case.what, case.partner] = 'skip'
        pytest.skip(str(e))
    _outcomes[case.what, case.partner] = 'pass'


def test_run_case_reports_failures_and_skips(data):
    "The page's runner: an error becomes 'fail' with fastai's event line dropped, `Skip` becomes 'skip' with its reason"
    from compat_cases import Case
    def boom(d): raise RuntimeError("Exception occured in `CSKD` when calling event `before_train`:\n\tbad labels")
    def skip(d): raise Skip("needs a GPU")
    r = run_case(Case('G', 'boom', boom), data)
    assert (r['status'], r['note']) == ('fail', 'RuntimeError: bad labels')
    assert run_case(Case('G', 'skip', skip), data)['status'] == 'skip'
    assert run_case(Case('G', 'ok', lambda d: 'fine'), data) | {'seconds': 0} == dict(
        group='G', what='ok', partner='', expect=Case('G', 'ok', None).expect, status='pass', note='fine', seconds=0)


class AddToLoss(Callback):
    "A wrong loss: 0.01 more than `CSKD`'s"
    order = CSKD.order+1
    def after_loss(self): self.learn.loss_grad = self.loss_grad + 0.01


@pytest.mark.parametrize('partner', ['forward', 'cache'])
def test_the_checks_catch_a_wrong_loss(data, partner):
    learn = Learner(image_dls(data, 'from_folder'), tiny_cnn(), cbs=[CSKD(partner=partner), AddToLoss()])
    with pytest.raises(AssertionError, match='not close'): fit_checked(learn, partner)


def test_the_check_catches_partners_of_another_class(data):
    dls = image_dls(data, 'from_folder')
    wrong = np.random.default_rng(0).permutation(train_labels(dls.train).numpy())   # a pairing by shuffled labels
    learn = Learner(paired_dls(dls, labels=wrong), tiny_cnn(), cbs=CSKD())
    with pytest.raises(AssertionError, match='anchor and partner labels differ'): fit_checked(learn)


def _page_rows():
    "(what, partner) -> outcome ('pass', 'fail', 'skip') of each row of the page's saved tables"
    nb = json.loads(PAGE.read_text())
    md = ''.join(''.join(o['data']['text/markdown']) for c in nb['cells'] if c['cell_type'] == 'code'
                 for o in c.get('outputs', []) if 'text/markdown' in o.get('data', {}))
    rows, status, cols = {}, {'✅': 'pass', '❌': 'fail', '➖': 'skip'}, None
    for line in md.splitlines():
        cells = [c.strip().replace('\\|', '|') for c in re.split(r'(?<!\\)\|', line)[1:-1]]
        if 'what you do' in cells: cols = {c: i for i, c in enumerate(cells)}
        elif cols and len(cells) == len(cols) and cells[cols['outcome']][:1] in status:
            rows[cells[cols['what you do']].strip('`'), cells[cols['partner']]] = status[cells[cols['outcome']][:1]]
    return rows


def test_page_lists_every_case():
    rows = _page_rows()
    assert set(rows) == {(c.what, c.partner) for c in CASES}, "nbs/works_with.ipynb is stale: run `python tests/compat_cases.py --page`"


def test_page_shows_the_outcomes_just_measured():
    "Runs after the cases (file order): each case run in this pytest run has the outcome the page shows"
    if not _outcomes: pytest.skip('no case of the matrix ran in this pytest run')
    rows = _page_rows()
    diff = {k: (rows.get(k), v) for k, v in _outcomes.items() if rows.get(k) != v}
    assert not diff, f"the page shows (page, now) {diff}: run `python tests/compat_cases.py --page`"
