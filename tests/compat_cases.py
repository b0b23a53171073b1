"""The fastai paths `CSKD` is tried on, as a list of cases: tests/test_compat.py runs each one as a test, and
nbs/works_with.ipynb runs them all and shows the outcome of each ("Works with" page).

Every training case is a tiny fit (16 px digits, a few batches, tiny models) checked at every step against
a computation of its own: the paired batch is read before `CSKD` splits it (anchors and partners must have
the same label), and the loss `CSKD` backpropagates is recomputed (`loss_func + λ T² KL`) with the partners run again
through the model as it was before the partner pass; with `partner='cache'` the check keeps its own table of each
item's last logits (tests/reference.py's `FormulaCheck` and `CacheCheck`). The other cases are the errors and state issues a user runs into.

`python tests/compat_cases.py` runs every case and prints the table; `--page` re-executes the docs page
(its saved outputs are what the site shows)."""
from __future__ import annotations
import contextlib, io, os, re, sys, tempfile, time, warnings
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.vision.all import *
from fastai.tabular.all import *
from fastai.text.all import *
from cskd_fastai.all import *
from reference import FormulaCheck, CacheCheck, tiny_cnn, train_labels, plain, first_logits

BS, PX, N_TRAIN, N_VALID = 16, 16, 6, 2      # per class: 60 training digits, 3 batches of 16 (fastai drops the last)


class Skip(Exception):
    "A case that cannot run on this machine, with the reason"


# ------------------------------------------------------------------------------------------------
# Independent checks, at every training step: tests/reference.py's `FormulaCheck` (partner forward) and `CacheCheck`

def check_for(partner): return CacheCheck() if partner == 'cache' else FormulaCheck()

def fit_checked(learn, partner='forward', n_epoch=1, chk=None, **kwargs):
    "Fit `learn` (which has a `CSKD`) with the step check for `partner`; the loss must be finite and every step checked"
    chk = chk or check_for(partner)
    with learn.no_bar(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit(n_epoch, cbs=chk, **kwargs)
    assert chk.steps == n_epoch*len(learn.dls.train), f"{chk.steps} steps checked of {n_epoch*len(learn.dls.train)}"
    rec = getattr(learn, 'recorder', None)
    if rec is not None:
        assert 'kd_loss' in rec.metric_names, f"no kd_loss column: {rec.metric_names}"
        assert np.isfinite(rec.values[-1][0]), "non-finite training loss"
    return chk


# ------------------------------------------------------------------------------------------------
# Data: small and generated once per folder

class Data:
    "The inputs the cases build their `DataLoaders` from, made on first use under `root`"
    def __init__(self, root): self.root = Path(root)

    @property
    def digits(self) -> Path:
        "train/<digit>/ and valid/<digit>/ with `N_TRAIN` and `N_VALID` images per class"
        dest = self.root/'digits'
        if not (dest/'.complete').exists():
            full = digits_folder(self.root/'digits_full')
            for split, k in (('train', N_TRAIN), ('valid', N_VALID)):
                for c in sorted(p.name for p in (full/split).iterdir()):
                    (dest/split/c).mkdir(parents=True, exist_ok=True)
                    for f in sorted((full/split/c).iterdir())[:k]: (dest/split/c/f.name).write_bytes(f.read_bytes())
            (dest/'.complete').touch()
        return dest

    def files(self): return sorted(get_image_files(self.digits))

    @property
    def df(self) -> pd.DataFrame:
        "One row per image: `fname` (relative to `digits`), `label`, `is_valid`"
        return pd.DataFrame({'fname': [f.relative_to(self.digits).as_posix() for f in self.files()],
                             'label': [f.parent.name for f in self.files()],
                             'is_valid': [f.parent.parent.name == 'valid' for f in self.files()]})

    @property
    def csv(self) -> Path:
        p = self.digits/'labels.csv'
        if not p.exists(): self.df.to_csv(p, index=False)
        return p

    @property
    def flat(self) -> list[Path]:
        "The same images in one folder, named `<label>_<n>.png`"
        dest = self.root/'flat'
        if not dest.exists():
            dest.mkdir()
            for f in self.files(): (dest/f'{f.parent.name}_{f.stem}.png').write_bytes(f.read_bytes())
        return sorted(dest.iterdir())

    @property
    def text_df(self) -> pd.DataFrame:
        "Three classes of short documents: each class has its own words, plus words all classes share"
        rng = np.random.default_rng(0)
        own = {'sports': 'ball goal team score match', 'food': 'bread soup cheese apple salad',
               'weather': 'rain snow wind cloud storm'}
        shared = 'the a of today really very'.split()
        rows = []
        for c, words in own.items():
            for i in range(16):
                ws = list(rng.choice(words.split(), 5)) + list(rng.choice(shared, 3))
                rng.shuffle(ws)
                rows.append((' '.join(ws), c, i >= 12))
        return pd.DataFrame(rows, columns=['text', 'label', 'is_valid'])

    @property
    def text_folder(self) -> Path:
        "`text_df` as train/<class>/<n>.txt and valid/<class>/<n>.txt"
        dest = self.root/'text'
        if not dest.exists():
            for i, (t, c, v) in enumerate(self.text_df.itertuples(index=False)):
                f = dest/('valid' if v else 'train')/c/f'{i:03d}.txt'
                f.parent.mkdir(parents=True, exist_ok=True); f.write_text(t)
        return dest

    @property
    def wine(self) -> pd.DataFrame:
        "scikit-learn's wine table, as a DataFrame with a `target` column"
        from sklearn.datasets import load_wine
        return load_wine(as_frame=True).frame


def image_dls(data, how):
    "The digits through fastai constructor `how`"
    kw = dict(item_tfms=Resize(PX), bs=BS, num_workers=0)
    d = data.digits
    if how == 'from_folder': return ImageDataLoaders.from_folder(d, train='train', valid='valid', **kw)
    if how == 'from_df': return ImageDataLoaders.from_df(data.df, d, fn_col='fname', label_col='label', valid_col='is_valid', **kw)
    if how == 'from_csv': return ImageDataLoaders.from_csv(d, csv_fname=data.csv.name, fn_col='fname', label_col='label', valid_col='is_valid', **kw)
    fs = data.flat
    if how == 'from_lists': return ImageDataLoaders.from_lists(fs[0].parent, fs, [f.name.split('_')[0] for f in fs], valid_pct=0.25, seed=0, **kw)
    if how == 'from_name_func': return ImageDataLoaders.from_name_func(fs[0].parent, fs, label_func=lambda name: name.split('_')[0], valid_pct=0.25, seed=0, **kw)
    if how == 'from_path_re': return ImageDataLoaders.from_path_re(fs[0].parent, fs, pat=r'(\d+)_\d+\.png$', valid_pct=0.25, seed=0, **kw)
    if how == 'DataBlock(ColReader)':
        return DataBlock(blocks=(ImageBlock, CategoryBlock), get_x=ColReader('fname', pref=f'{d}/'), get_y=ColReader('label'),
                         splitter=ColSplitter('is_valid'), item_tfms=Resize(PX)).dataloaders(data.df, bs=BS, num_workers=0)
    if how == 'DataBlock(tuples)':
        items = [(f, f.parent.name) for f in data.files()]
        return DataBlock(blocks=(ImageBlock, CategoryBlock), get_x=ItemGetter(0), get_y=ItemGetter(1),
                         splitter=FuncSplitter(lambda o: o[0].parent.parent.name == 'valid'),
                         item_tfms=Resize(PX)).dataloaders(items, bs=BS, num_workers=0)
    raise ValueError(how)


def text_dls(data, how):
    if how == 'from_df': return TextDataLoaders.from_df(data.text_df, text_col='text', label_col='label', valid_col='is_valid', bs=8, num_workers=0)
    return TextDataLoaders.from_folder(data.text_folder, valid='valid', bs=8, num_workers=0)

def tabular_dls(data):
    df = data.wine
    return TabularDataLoaders.from_df(df, y_names='target', y_block=CategoryBlock(), cont_names=[c for c in df.columns if c != 'target'],
                                      procs=[Normalize], valid_idx=list(range(0, len(df), 4)), bs=32, num_workers=0)

SMALL_AWD = dict(awd_lstm_clas_config, emb_sz=16, n_hid=32, n_layers=2)


# ------------------------------------------------------------------------------------------------
# The cases

@dataclass
class Case:
    group: str     # section of the table
    what: str      # what the user did
    run: callable  # run(data) -> a short note; raises on failure, `Skip` where it cannot run here
    partner: str = ''
    expect: str = 'trains; partners same-class and the loss is the formula at every step'
    key: str = ''  # short test id
    @property
    def id(self): return self.key or re.sub(r'[^\w]+', '-', f'{self.what}-{self.partner}').strip('-')


def _note(chk): return f"{chk.steps} steps checked; mean KD term {np.mean(chk.kd):.3f}"

def _image_case(how, partner):
    def run(data):
        dls = image_dls(data, how)
        learn = Learner(dls, tiny_cnn(dls.c), cbs=CSKD(partner=partner))
        return _note(fit_checked(learn, partner))
    return run

def _text_case(how, partner, config=SMALL_AWD):
    def run(data):
        dls = text_dls(data, how)
        learn = text_classifier_learner(dls, AWD_LSTM, pretrained=False, config=config, cbs=CSKD(partner=partner))
        return _note(fit_checked(learn, partner))
    return run

def _tabular_case(partner):
    def run(data):
        dls = tabular_dls(data)
        learn = tabular_learner(dls, layers=[16], cbs=CSKD(partner=partner))
        return _note(fit_checked(learn, partner))
    return run


class TupleNet(nn.Module):
    "A CNN that returns `(logits, features)`"
    def __init__(self, n_out=10):
        super().__init__()
        self.body, self.head = nn.Sequential(*list(tiny_cnn(n_out).children())[:-1]), nn.Linear(16, n_out)
    def forward(self, x):
        h = self.body(x)
        return self.head(h), h

class KeepLogits(Callback):
    "The first element of the model's output is what the loss and metrics see"
    def after_pred(self): self.learn.pred = self.pred[0]

def _tuple_model(data):
    dls = image_dls(data, 'from_folder')
    learn = Learner(dls, TupleNet(dls.c), cbs=[CSKD(), KeepLogits()])
    return _note(fit_checked(learn))


class FeaturesFirstNet(TupleNet):
    "A CNN that returns `(features, logits)`"
    def forward(self, x): return super().forward(x)[::-1]

class KeepSecond(Callback):
    "The second element of the model's output is what the loss and metrics see"
    def after_pred(self): self.learn.pred = self.pred[1]

def second(out): return out[1]

def _logits_elsewhere(data):
    dls = image_dls(data, 'from_folder')
    learn = Learner(dls, FeaturesFirstNet(dls.c), cbs=[CSKD(partner=PartnerForward(get_logits=second)), KeepSecond()])
    return _note(fit_checked(learn, chk=FormulaCheck(get_logits=second)))

def _logits_elsewhere_no_option(data):
    dls = image_dls(data, 'from_folder')
    learn = Learner(dls, FeaturesFirstNet(dls.c), cbs=[CSKD(), KeepSecond()])
    def go():
        with learn.no_bar(): learn.fit(1)
    return _raises_clearly(go, r'get_logits')

class StatefulNet(nn.Module):
    "A CNN whose output also depends on the features of its previous call, as an RNN's on its hidden state; `reset()` forgets them"
    def __init__(self, n_out=10):
        super().__init__()
        self.body = nn.Sequential(ConvLayer(3, 8, stride=2), ConvLayer(8, 16, stride=2), nn.AdaptiveAvgPool2d(1), Flatten())
        self.head, self.h = nn.Linear(16, n_out), None
    def reset(self): self.h = None
    def forward(self, x):
        f = self.body(x)
        out = self.head(f if self.h is None else f + self.h)
        self.h = f.detach().mean(0)
        return out

class StateCheck(FormulaCheck):
    "`FormulaCheck` for `StatefulNet`; also, the anchors' logits must be those of the model as it was before the partner pass"
    def before_batch(self):
        super().before_batch()
        self.copies = deepcopy(self._model()), deepcopy(self._model())
    def _partner_logits(self, train):
        n = len(self.yall[0])//2
        with torch.no_grad(): return first_logits(self.copies[0](*[x[n:] for x in self.xall])).float()
    def before_backward(self):
        n = len(self.yall[0])//2
        with torch.no_grad(): anchors = self.copies[1](*[x[:n] for x in self.xall]).float()
        torch.testing.assert_close(plain(self.learn.pred.detach()).float(), anchors, rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"the anchors' logits are not those of the model before the partner pass: {m}")
        super().before_backward()

def _stateful_model(data):
    dls = image_dls(data, 'from_folder')
    learn = Learner(dls, StatefulNet(dls.c), cbs=CSKD())
    return _note(fit_checked(learn, chk=StateCheck()))

def _paired_dls_from_df(data):
    dls = paired_dls(image_dls(data, 'from_df'))
    learn = Learner(dls, tiny_cnn(dls.c), cbs=CSKD())
    return _note(fit_checked(learn))


def _to_fp16(partner):
    def run(data):
        dls = image_dls(data, 'from_folder')
        learn = Learner(dls, tiny_cnn(), cbs=CSKD(partner=partner)).to_fp16()
        dtypes = set()
        h = learn.model[-1].register_forward_hook(lambda m, i, o: dtypes.add(str(o.dtype).replace('torch.', '')) if m.training else None)
        try: chk = fit_checked(learn, partner)
        finally: h.remove()
        return _note(chk) + f"; logits in {', '.join(sorted(dtypes))}" + (
            " (fastai's to_fp16 autocasts on CUDA only: on a CPU it trains in float32)" if not torch.cuda.is_available() else '')
    return run

def _mid_level_datasets(data):
    fs = data.files()
    dsets = Datasets(fs, tfms=[[PILImage.create], [parent_label, Categorize()]], splits=GrandparentSplitter()(fs))
    dls = dsets.dataloaders(after_item=[Resize(PX), ToTensor()], after_batch=[IntToFloatTensor()], bs=BS, num_workers=0)
    learn = Learner(dls, tiny_cnn(dls.c), cbs=CSKD())
    return _note(fit_checked(learn))

def _vision_learner_fine_tune(data):
    dls = image_dls(data, 'from_folder')
    learn = vision_learner(dls, 'resnet10t', pretrained=False, cbs=CSKD())
    chk = FormulaCheck()
    learn.add_cb(chk)
    with learn.no_bar(), warnings.catch_warnings():
        warnings.simplefilter('ignore'); learn.fine_tune(1)
    learn.remove_cb(chk)
    assert chk.steps == 2*len(dls.train), f"{chk.steps} steps checked of {2*len(dls.train)}"
    assert learn.recorder.metric_names.count('kd_loss') == 1
    return f"frozen and unfrozen fits: " + _note(chk)

def _not_single_label(block, get_y):
    def run(data):
        dls = DataBlock(blocks=(ImageBlock, block), get_y=get_y, splitter=GrandparentSplitter(),
                        item_tfms=Resize(PX)).dataloaders(data.files(), bs=BS, num_workers=0)
        learn = Learner(dls, tiny_cnn(dls.c if hasattr(dls, 'c') else 1), loss_func=MSELossFlat() if block is RegressionBlock else None, cbs=CSKD())
        def go():
            with learn.no_bar(): learn.fit(1)
        msg = _raises_clearly(go, r'single-label')
        assert type(learn.dls.train) is not PairedDL, "the training loader was not put back"
        return msg
    return run

def _two_labels(f): return [f.parent.name, 'even' if int(f.parent.name) % 2 == 0 else 'odd']
def _digit_value(f): return float(f.parent.name)

def _raises_clearly(f, *words):
    "Run `f`; it must raise, with a message that has each of `words` (regexes, case-insensitive); return the message"
    try: f()
    except Exception as e:
        msg = str(e)
        missing = [w for w in words if not re.search(w, msg, re.I)]
        if missing: raise AssertionError(f"raised {type(e).__name__}, but the message misses {missing}: {msg[:300]}") from e
        return _message(e)[:240]
    raise AssertionError("no error was raised")

def _two_cskd_in_one_fit(data):
    dls = image_dls(data, 'from_folder')
    learn = Learner(dls, tiny_cnn(), cbs=CSKD())
    def go():
        with learn.no_bar(): learn.fit(1, cbs=CSKD(T=2.))
    msg = _raises_clearly(go, r'CSKD', r'already|second|two|more than one|duplicate|only one')
    assert type(learn.dls.train) is TfmdDL, "the training loader was not put back"
    fit_checked(learn)                                    # the learner still trains with its own CSKD
    return msg

def _two_cskd_in_cbs(data):
    dls = image_dls(data, 'from_folder')
    def go():
        learn = Learner(dls, tiny_cnn(), cbs=[CSKD(), CSKD(T=2.)])
        with learn.no_bar(): learn.fit(1)
    return _raises_clearly(go, r'CSKD', r'already|second|two|more than one|duplicate|only one')

def _attach_or_refused(cb, make):
    "`make()` (a learner given `cb`); `None` and the refusal if `CSKD` refuses clearly to serve a second learner"
    try: return make(), None
    except Exception as e:
        if 'CSKD' not in str(e) or not re.search(r'another|other|already', str(e)): raise
        return None, _message(e)

def _cache_to_new_learner(data):
    dls = image_dls(data, 'from_folder')
    cb = CSKD(partner='cache')
    learn1 = Learner(dls, tiny_cnn(), cbs=cb)
    fit_checked(learn1, 'cache', n_epoch=2)
    learn2, refused = _attach_or_refused(cb, lambda: Learner(dls, tiny_cnn(), cbs=cb))
    if refused:                                           # then the way the message gives: off the first learner
        learn1.remove_cb(cb)
        learn2 = Learner(dls, tiny_cnn(), cbs=cb)
    chk = fit_checked(learn2, 'cache', chk=CacheCheck())    # a fresh table: the first step's KD term must be 0
    assert abs(chk.kd[0]) < 1e-6, f"first step's KD term {chk.kd[0]:.3f}, not 0"
    return (f"refused while on the first learner ({refused[:60]}...); after `learn1.remove_cb(cb)`: " if refused else '') + \
           f"first step's KD term {chk.kd[0]:.3g}; " + _note(chk)

def _cache_new_model_same_learner(data):
    dls = image_dls(data, 'from_folder')
    learn = Learner(dls, tiny_cnn(), cbs=CSKD(partner='cache'))
    fit_checked(learn, 'cache', n_epoch=2)
    learn.model = tiny_cnn()
    chk = fit_checked(learn, 'cache', chk=CacheCheck())
    assert abs(chk.kd[0]) < 1e-6, f"first step's KD term {chk.kd[0]:.3f}, not 0"
    return f"first step's KD term {chk.kd[0]:.3g}; " + _note(chk)

def _same_cskd_two_learners(data):
    dls = image_dls(data, 'from_folder')
    cb = CSKD()
    l1 = Learner(dls, tiny_cnn(), cbs=cb)
    l2, refused = _attach_or_refused(cb, lambda: Learner(dls, tiny_cnn(), cbs=cb))
    for l in ((l1,) if refused else (l2, l1, l2)): fit_checked(l)
    for i, l in enumerate((l1,) if refused else (l1, l2)):
        names = l.recorder.metric_names
        assert names.count('kd_loss') == 1, f"learner {i+1}'s columns: {names}"
        v = l.recorder.log[names.index('kd_loss')]
        assert v is not None and v > 0, f"learner {i+1}'s kd_loss is {v}"
    return f"refused: {refused}; the first learner trains and logs kd_loss" if refused else "both learners train and log kd_loss"

def _no_recorder(data):
    dls = image_dls(data, 'from_folder')
    learn = Learner(dls, tiny_cnn(), cbs=CSKD())
    learn.remove_cb(learn.recorder)
    return _note(fit_checked(learn))

def _monitor_kd_loss(data):
    dls = image_dls(data, 'from_folder')
    learn = Learner(dls, tiny_cnn(), cbs=CSKD(lam=SchedLin(0, 1)), path=data.root/'learner')
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        with learn.no_bar(): learn.fit(2, cbs=SaveModelCallback(monitor='kd_loss'))
    hits = [str(w.message) for w in ws if 'kd_loss' in str(w.message)]
    assert hits, f"no warning about monitoring kd_loss (warnings: {[str(w.message)[:80] for w in ws]})"
    return f"warns: {hits[0].splitlines()[0][:160]}"

def _one_image_class(data):
    words = 'zero one two three four five six seven eight nine'.split()
    fs = [f for f in data.files() if f.parent.name != '3' or f.parent.parent.name == 'valid' or f.name == min(
          g.name for g in (data.digits/'train'/'3').iterdir())]
    items = [(f, words[int(f.parent.name)]) for f in fs]
    dls = DataBlock(blocks=(ImageBlock, CategoryBlock), get_x=ItemGetter(0), get_y=ItemGetter(1),
                    splitter=FuncSplitter(lambda o: o[0].parent.parent.name == 'valid'),
                    item_tfms=Resize(PX)).dataloaders(items, bs=BS, num_workers=0)
    learn = Learner(dls, tiny_cnn(dls.c), cbs=CSKD())
    chk = FormulaCheck()
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        with learn.no_bar(): learn.fit(2, cbs=chk)
    hits = [str(w.message) for w in ws if re.search(r"\bthree\b", str(w.message))]
    assert len(hits) == 1, f"{len(hits)} warnings name the class 'three' in a 2-epoch fit (all: {[str(w.message)[:80] for w in ws]})"
    assert chk.steps == 2*len(dls.train)
    return f"warns once: {hits[0].splitlines()[0][:160]}"

def _non_native_fp16(data):
    dls = image_dls(data, 'from_folder')
    plain = Learner(dls, tiny_cnn()).to_non_native_fp16()
    try:
        with plain.no_bar(), warnings.catch_warnings():
            warnings.simplefilter('ignore'); plain.fit(1)
    except Exception as e:
        raise Skip(f"fastai's to_non_native_fp16() does not train here even without CSKD: {_message(e)[:120]}") from None
    learn = Learner(dls, tiny_cnn(), cbs=CSKD()).to_non_native_fp16()
    dtypes = []
    h = learn.model.register_forward_pre_hook(lambda m, i: dtypes.append((m.training, i[0].dtype)))
    try:
        with learn.no_bar(), warnings.catch_warnings():
            warnings.simplefilter('ignore'); learn.fit(1)
    finally: h.remove()
    train = [d for t, d in dtypes if t]
    assert len(train) == 2*len(dls.train), f"{len(train)} training forwards for {len(dls.train)} steps (expected a partner pass and an anchor pass per step)"
    assert all(d == torch.float16 for d in train), f"training forwards saw {sorted(set(map(str, train)))}"
    return f"{len(train)} training forwards, all in float16"

def _relabelled(data):
    fs = data.files()
    lab = {f.name: f.parent.name for f in fs}
    dblock = DataBlock(blocks=(ImageBlock, CategoryBlock), get_y=lambda f: lab[f.name], splitter=GrandparentSplitter(),
                       item_tfms=Resize(PX))
    dls = dblock.dataloaders(fs, bs=BS, num_workers=0)
    learn = Learner(dls, tiny_cnn(), cbs=CSKD())
    fit_checked(learn)
    names = sorted(lab); new = np.random.default_rng(0).permutation([lab[n] for n in names])
    lab.update(zip(names, new))                           # the same items, other labels (e.g. after cleaning them)
    return "after relabelling: " + _note(fit_checked(learn))


IMAGE = ['from_folder', 'from_df', 'from_csv', 'from_lists', 'from_name_func', 'from_path_re', 'DataBlock(ColReader)', 'DataBlock(tuples)']
_CODE = {'from_folder': "ImageDataLoaders.from_folder(path)", 'from_df': "ImageDataLoaders.from_df(df, path, valid_col='is_valid')",
         'from_csv': "ImageDataLoaders.from_csv(path, 'labels.csv', valid_col='is_valid')",
         'from_lists': "ImageDataLoaders.from_lists(path, fnames, labels)",
         'from_name_func': "ImageDataLoaders.from_name_func(path, fnames, label_func)",
         'from_path_re': "ImageDataLoaders.from_path_re(path, fnames, pat)",
         'DataBlock(ColReader)': "DataBlock(get_x=ColReader('fname', pref=path), get_y=ColReader('label'), splitter=ColSplitter('is_valid'))",
         'DataBlock(tuples)': "DataBlock(get_x=ItemGetter(0), get_y=ItemGetter(1)) over (path, label) tuples"}

CASES = ([Case('Data', _CODE[h], _image_case(h, p), p, key=f'image-{h}-{p}') for h in IMAGE for p in ('forward', 'cache')]
         + [Case('Data', "Datasets(files, tfms=[[PILImage.create], [parent_label, Categorize()]]).dataloaders(...)", _mid_level_datasets, 'forward', key='image-Datasets')]
         + [Case('Data', "paired_dls(ImageDataLoaders.from_df(df, path, valid_col='is_valid'))", _paired_dls_from_df, 'forward', key='image-paired_dls-from_df')]
         + [Case('Data', "TabularDataLoaders.from_df(wine, y_names='target', y_block=CategoryBlock()) + tabular_learner", _tabular_case(p), p, key=f'tabular-{p}') for p in ('forward', 'cache')]
         + [Case('Data', f"TextDataLoaders.{h}(...) + text_classifier_learner (small AWD_LSTM)", _text_case(h, p), p, key=f'text-{h}-{p}')
            for h in ('from_df', 'from_folder') for p in ('forward', 'cache')]
         + [Case('Models', "text_classifier_learner(dls, AWD_LSTM, pretrained=False): its model returns a tuple", _text_case('from_df', 'forward', None), 'forward', key='model-awd_lstm'),
            Case('Models', "a model returning (logits, features), an after_pred callback keeping the logits", _tuple_model, 'forward', key='model-tuple'),
            Case('Models', "a model returning (features, logits): CSKD(partner=PartnerForward(get_logits=lambda o: o[1]))", _logits_elsewhere, 'forward', key='model-get_logits'),
            Case('Models', "a model returning (features, logits), without get_logits", _logits_elsewhere_no_option, 'forward',
                 'a clear error that points to `get_logits`', key='model-no_get_logits'),
            Case('Models', "vision_learner(dls, 'resnet10t', pretrained=False), learn.fine_tune(1)", _vision_learner_fine_tune, 'forward', key='model-vision_learner-fine_tune'),
            Case('Models', "learn.to_fp16()", _to_fp16('forward'), 'forward', key='model-to_fp16-forward'),
            Case('Models', "learn.to_fp16()", _to_fp16('cache'), 'cache', key='model-to_fp16-cache'),
            Case('Models', "a model with recurrent state (its output depends on its previous call)", _stateful_model, 'forward',
                 "trains; the anchors' logits are those of the model before the partner pass (no state carried from it)", key='model-stateful'),
            Case('Models', "learn.to_non_native_fp16()", _non_native_fp16, 'forward', 'partners run in half precision, like the anchors', key='model-non_native_fp16'),
            Case('Errors and state', "Learner(..., cbs=CSKD()).fit(1, cbs=CSKD())", _two_cskd_in_one_fit, 'forward',
                 'a clear error naming the CSKD already there; the learner is left as it was', key='error-two_cskd_in_fit'),
            Case('Errors and state', "Learner(..., cbs=[CSKD(), CSKD()])", _two_cskd_in_cbs, 'forward', 'a clear error', key='error-two_cskd_in_cbs'),
            Case('Errors and state', "multi-label targets: DataBlock(blocks=(ImageBlock, MultiCategoryBlock))", _not_single_label(MultiCategoryBlock, _two_labels), 'forward',
                 'a clear error: CS-KD needs single-label classes; the loader is put back', key='error-multi_label'),
            Case('Errors and state', "regression targets: DataBlock(blocks=(ImageBlock, RegressionBlock))", _not_single_label(RegressionBlock, _digit_value), 'forward',
                 'a clear error: CS-KD needs single-label classes; the loader is put back', key='error-regression'),
            Case('Errors and state', "one CSKD(partner='cache') given to a second learner with a fresh model", _cache_to_new_learner, 'cache',
                 "the new model's cache starts empty (first step's KD term is 0); if it is refused while on the first learner, after `remove_cb`", key='state-cache_new_model'),
            Case('Errors and state', "learn.model = a fresh model, then fit again with CSKD(partner='cache')", _cache_new_model_same_learner, 'cache',
                 "the new model's cache starts empty (first step's KD term is 0)", key='state-cache_new_model_same_learner'),
            Case('Errors and state', "the same CSKD given to two learners", _same_cskd_two_learners, 'forward',
                 'both train and log kd_loss, or a clear refusal and the first one still does', key='state-shared_cskd'),
            Case('Errors and state', "a learner without a Recorder (learn.remove_cb(learn.recorder))", _no_recorder, 'forward', key='state-no_recorder'),
            Case('Errors and state', "SaveModelCallback(monitor='kd_loss') with CSKD(lam=SchedLin(0, 1))", _monitor_kd_loss, 'forward',
                 'a warning that kd_loss is a training term', key='warn-monitor_kd_loss'),
            Case('Errors and state', "a class with one training image", _one_image_class, 'forward',
                 'trains; one warning naming the class', key='warn-one_item_class'),
            Case('Errors and state', "the same dataset relabelled at the same length, fit again", _relabelled, 'forward',
                 'partners follow the new labels', key='state-relabelled')])


def _message(e):
    "An exception's message without fastai's 'Exception occured in `X` when calling event `y`:' line"
    lines = [l.strip() for l in str(e).strip().splitlines() if l.strip() and not l.startswith('Exception occured in')]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"

def run_case(case, data) -> dict:
    "Run `case`; its outcome ('pass', 'fail' or 'skip'), a note or the error, and its time"
    t0 = time.time()
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            note, status = case.run(data), 'pass'
    except Skip as e: note, status = str(e), 'skip'
    except Exception as e: note, status = _message(e)[:240], 'fail'
    return dict(group=case.group, what=case.what, partner=case.partner, expect=case.expect, status=status, note=note,
                seconds=round(time.time()-t0, 1))


def run_all(root=None, cases=CASES, verbose=False):
    "Run every case in a fresh folder (a temporary one if `root` is None); a list of outcomes"
    with tempfile.TemporaryDirectory() as tmp:
        data = Data(root or tmp)
        res = []
        for c in cases:
            set_seed(0)                                   # as tests/test_compat.py does before each case
            res.append(run_case(c, data))
            if verbose: print(f"{res[-1]['status']:5} {res[-1]['seconds']:5.1f}s  {c.what} [{c.partner}]: {res[-1]['note']}", flush=True)
        return res


_ICON = {'pass': '✅ works', 'fail': '❌ fails', 'skip': '➖ not run here'}

def _tables(results):
    """The outcomes a group at a time, what both table formats show: the group, the expectation its cases share (None
    where they differ: then each row has an *expected* column), the column names and each row's cells as plain text"""
    for g in dict.fromkeys(r['group'] for r in results):
        rs = [r for r in results if r['group'] == g]
        same = len({r['expect'] for r in rs}) == 1
        cols = ['what you do', 'partner'] + ([] if same else ['expected']) + ['outcome', 'details']
        rows = [[r['what'], r['partner']] + ([] if same else [r['expect']]) + [_ICON[r['status']], r['note']] for r in rs]
        yield g, (rs[0]['expect'] if same else None), cols, rows


def markdown_table(results) -> str:
    "The outcomes as one markdown table per group (an *expected* column where the cases of a group expect different things)"
    out = []
    for g, expect, cols, rows in _tables(results):
        out += [f"### {g}", ''] + ([f"Expected of each: {expect}.", ''] if expect is not None else [])
        out += ['| ' + ' | '.join(cols) + ' |', '|' + '---|'*len(cols)]
        for cells in rows:
            if g == 'Data': cells = [f"`{cells[0]}`"] + cells[1:]
            out.append('| ' + ' | '.join(str(c).replace('|', '\\|') for c in cells) + ' |')
        out.append('')
    return '\n'.join(out)


def html_table(results) -> str:
    "The same tables as `markdown_table`, in HTML (what the docs site shows)"
    from html import escape
    out = []
    for g, expect, cols, rows in _tables(results):
        out += [f"<h3>{escape(g)}</h3>"] + ([f"<p>Expected of each: {escape(expect)}.</p>"] if expect is not None else [])
        out += ['<table>', '<thead><tr>' + ''.join(f'<th>{c}</th>' for c in cols) + '</tr></thead>', '<tbody>']
        for cells in rows:
            cells = [escape(c) for c in cells]
            if g == 'Data': cells[0] = f"<code>{cells[0]}</code>"
            out.append('<tr>' + ''.join(f'<td>{c}</td>' for c in cells) + '</tr>')
        out += ['</tbody>', '</table>']
    return '\n'.join(out)


class Outcomes:
    "The outcomes of a run, shown as tables: HTML for the docs site and Jupyter, markdown where that is what is asked for"
    def __init__(self, results, head=''): self.results, self.head = results, head
    def _repr_markdown_(self): return (f"{self.head}\n\n" if self.head else '') + markdown_table(self.results)
    def _repr_html_(self): return (f"<p>{self.head}</p>\n" if self.head else '') + html_table(self.results)


if __name__ == '__main__':
    if '--page' in sys.argv:
        from execnb.shell import CaptureShell
        nb = Path(__file__).resolve().parent.parent/'nbs'/'works_with.ipynb'
        os.chdir(nb.parent)
        CaptureShell().execute(nb, nb)
        import subprocess; subprocess.run(['nbdev-clean', '--fname', str(nb)], check=True)
    else:
        torch.set_num_threads(int(os.environ.get('CSKD_TEST_THREADS', 2)))
        res = run_all(verbose=True)
        print(markdown_table(res))
