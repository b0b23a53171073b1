"""Labels of every item source fastai builds, read without loading inputs, each checked against the labels written
out from the source (the DataFrame column, the file names, the tuples) through the loader's vocabulary; the class
index of a relabelled dataset; the single-item-class warning; the class-index benchmark"""
import os, subprocess, sys, warnings
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
import torch
from fastai.vision.all import *
from fastai.text.all import *
from fastai.tabular.all import *
from cskd_fastai.all import *
from cskd_fastai.data import item_labels, class_index
from conftest import digits_block, tiny_cnn, cnn_learner

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def files(digits_path):
    "Every digits image, with its class (parent folder) and split (grandparent folder)"
    return get_image_files(digits_path)


@pytest.fixture(scope='module')
def digits_df(digits_path, files):
    return pd.DataFrame({'fname': [str(f.relative_to(digits_path)) for f in files], 'label': [f.parent.name for f in files],
                         'is_valid': [f.parent.parent.name == 'valid' for f in files]})


def codes(vocab, ys): return [vocab.o2i[y] for y in ys]


def check_loader(dl, expected):
    "`item_labels` and `class_index` of training loader `dl` are `expected`; a paired batch pairs same-class items"
    assert item_labels(dl.dataset, dl.n_inp).tolist() == list(expected)
    assert class_index(dl).labels.tolist() == list(expected)
    y = PairedDL(dl).one_batch()[dl.n_inp]
    n = len(y)//2
    assert torch.equal(y[:n], y[n:])


# --- DataFrames -------------------------------------------------------------------------------------------

def test_image_from_df(digits_path, digits_df):
    df = digits_df
    dls = ImageDataLoaders.from_df(df, digits_path, valid_col='is_valid', item_tfms=Resize(16), bs=16, num_workers=0)
    check_loader(dls.train, codes(dls.vocab, df.label[~df.is_valid]))
    assert item_labels(dls.valid_ds).tolist() == codes(dls.vocab, df.label[df.is_valid])


def test_image_from_csv(digits_path, digits_df, tmp_path):
    df = digits_df.sample(frac=1., random_state=0)                         # rows not grouped by class
    df.to_csv(tmp_path/'labels.csv', index=False)
    dls = ImageDataLoaders.from_csv(tmp_path, 'labels.csv', folder=str(digits_path), valid_col='is_valid',
                                    item_tfms=Resize(16), bs=16, num_workers=0)
    raw = pd.read_csv(tmp_path/'labels.csv')                               # read back: labels are ints now
    check_loader(dls.train, codes(dls.vocab, raw.label[~raw.is_valid]))


def test_datablock_colreader(digits_path, digits_df):
    df = digits_df
    dls = DataBlock((ImageBlock, CategoryBlock), get_x=ColReader('fname', pref=digits_path), get_y=ColReader('label'),
                    splitter=ColSplitter('is_valid'), item_tfms=Resize(16)).dataloaders(df, bs=16, num_workers=0)
    check_loader(dls.train, codes(dls.vocab, df.label[~df.is_valid]))


def test_colreader_by_position_and_numeric_rows():
    "A row of an all-number frame is a float row: ColReader(0, pref='c') reads 'c1.0', and so must the labels"
    df = pd.DataFrame({'y': np.arange(30) % 4, 'x': np.linspace(0, 1, 30)})
    ds = Datasets(df, [[ColReader('x')], [ColReader(0, pref='c'), Categorize()]])
    assert 'c1.0' in ds.vocab
    assert item_labels(ds).tolist() == codes(ds.vocab, [f'c{float(v)}' for v in df.y])


@pytest.mark.parametrize('ys', [[1, 1.0, True, 2], [1, 1.0, True, '1', 2], [np.int64(1), 1, 1.0]])
def test_values_equal_but_read_differently_are_not_merged(ys):
    "1, 1.0 and True compare equal but read differently with a prefix: none may stand for another"
    ys = ys*4
    df = pd.DataFrame({'x': range(len(ys)), 'y': pd.Series(ys, dtype=object)})
    ds = Datasets(df, [[ColReader('x')], [ColReader('y', pref='c'), Categorize()]])
    assert item_labels(ds).tolist() == codes(ds.vocab, [f'c{v}' for v in ys])
    ds = Datasets(list(zip(range(len(ys)), ys)), [[ItemGetter(0)], [ItemGetter(1), lambda o: f'{type(o).__name__} {o}', Categorize()]])
    assert item_labels(ds).tolist() == codes(ds.vocab, [f'{type(o).__name__} {o}' for o in ys])


def test_missing_values_in_the_label_column():
    "None and NaN compare alike to pandas, not to a label function"
    ys = ['a', None, 'b', np.nan, 'a', 'b']*3
    df = pd.DataFrame({'x': range(len(ys)), 'y': pd.Series(ys, dtype=object)})
    ds = Datasets(df, [[ColReader('x')], [ColReader('y'), lambda o: f'<{o}>', Categorize()]])
    assert len(ds.vocab) == 4
    assert item_labels(ds).tolist() == codes(ds.vocab, [f'<{v}>' for v in ys])


@pytest.mark.parametrize('split_idx', [0, 1])
def test_split_specific_label_steps(split_idx):
    "A step that runs on one split only (`split_idx`) is applied as the pipeline applies it"
    class Upper(Transform):
        split_idx = 0
        def encodes(self, o:str): return o.upper()
    items = [f'{c}/{i}' for i,c in enumerate('abcab'*4)]
    tl = TfmdLists(items, [lambda o: o.split('/')[0], Upper(), Categorize(vocab=['a', 'b', 'c', 'A', 'B', 'C'])],
                   split_idx=split_idx)
    ds = Datasets(tls=[TfmdLists(items, [noop]), tl])
    want = [o.split('/')[0] for o in items]
    assert item_labels(ds).tolist() == codes(tl.vocab, [o.upper() if split_idx == 0 else o for o in want])


def test_other_label_functions_on_rows(digits_df):
    df = digits_df
    ds = Datasets(df, [[ColReader('fname')], [lambda r: f"{r['label']}-{r['is_valid']}", Categorize()]])
    assert item_labels(ds).tolist() == codes(ds.vocab, [f'{l}-{v}' for l,v in zip(df.label, df.is_valid)])


def test_text_from_df():
    words = ['good', 'great', 'bad', 'awful', 'fine']
    rng = np.random.default_rng(0)
    ys = rng.choice(['neg', 'pos', 'meh'], 60)
    df = pd.DataFrame({'text': [' '.join(rng.choice(words, 6)) for _ in ys], 'label': ys, 'is_valid': np.arange(60) >= 45})
    dls = TextDataLoaders.from_df(df, text_col='text', label_col='label', valid_col='is_valid', bs=8, seq_len=16)
    rows = dls.train_ds.items.index                                     # the tokenised frame keeps the row labels
    assert sorted(rows) == list(df.index[~df.is_valid])
    assert item_labels(dls.train_ds).tolist() == codes(dls.vocab[1], df.label[rows])


def test_text_from_folder(tmp_path):
    rng = np.random.default_rng(1)
    truth = {}
    for split, n in (('train', 12), ('valid', 4)):
        for c in ('neg', 'pos'):
            (tmp_path/split/c).mkdir(parents=True)
            for i in range(n):
                f = tmp_path/split/c/f'{i}.txt'
                f.write_text(' '.join(rng.choice(['good', 'bad', 'fine'], 5)))
                truth[f] = c
    dls = TextDataLoaders.from_folder(tmp_path, bs=4, seq_len=8)
    check_loader(dls.train, codes(dls.vocab[1], [truth[Path(f)] for f in dls.train_ds.items]))


def test_tabular_from_df():
    rng = np.random.default_rng(2)
    df = pd.DataFrame({'a': rng.normal(size=80), 'b': rng.integers(0, 3, 80), 'y': rng.choice(['u', 'v', 'w'], 80)})
    dls = TabularDataLoaders.from_df(df, y_names='y', cont_names=['a'], cat_names=['b'], procs=[Categorify, Normalize],
                                     valid_idx=list(range(60, 80)), bs=8)
    rows = dls.train_ds.items.index
    assert sorted(rows) == list(range(60))
    check_loader(dls.train, codes(dls.vocab, df.y[rows]))
    cat, cont, y, pos = IndexedDL(dls.train).one_batch()              # positions survive `ReadTabBatch`
    pos = rows[pos.numpy()]
    assert y.squeeze(1).tolist() == codes(dls.vocab, df.y[pos])
    assert cat.squeeze(1).tolist() == codes(dls.classes['b'], df.b[pos])


# --- lists, tuples, L, arrays ----------------------------------------------------------------------------------

def test_image_from_folder(digits_path):
    dls = ImageDataLoaders.from_folder(digits_path, item_tfms=Resize(16), bs=16, num_workers=0)
    check_loader(dls.train, codes(dls.vocab, [Path(f).parent.name for f in dls.train_ds.items]))


def test_from_lists(digits_path, files):
    truth = {f: f.parent.name for f in files}
    dls = ImageDataLoaders.from_lists(digits_path, files, [truth[f] for f in files], item_tfms=Resize(16), bs=16,
                                      num_workers=0, seed=0)
    check_loader(dls.train, codes(dls.vocab, [truth[f] for f,_ in dls.train_ds.items]))


def even_odd(name): return 'even' if int(name[:4]) % 2 == 0 else 'odd'

def test_from_name_func(digits_path, files):
    dls = ImageDataLoaders.from_name_func(digits_path, files, even_odd, item_tfms=Resize(16), bs=16, num_workers=0, seed=0)
    check_loader(dls.train, codes(dls.vocab, [even_odd(Path(f).name) for f in dls.train_ds.items]))


def test_from_path_re(digits_path, files):
    dls = ImageDataLoaders.from_path_re(digits_path, files, r'/(\d)/\d+\.png$', item_tfms=Resize(16), bs=16,
                                        num_workers=0, seed=0)
    check_loader(dls.train, codes(dls.vocab, [Path(f).parent.name for f in dls.train_ds.items]))


def test_datablock_over_tuples(files):
    items = [(f, f.parent.name) for f in files]
    truth = dict(items)
    dls = DataBlock((ImageBlock, CategoryBlock), get_x=ItemGetter(0), get_y=ItemGetter(1), splitter=RandomSplitter(seed=0),
                    item_tfms=Resize(16)).dataloaders(items, bs=16, num_workers=0)
    check_loader(dls.train, codes(dls.vocab, [truth[f] for f,_ in dls.train_ds.items]))


@pytest.mark.parametrize('kind', ['list', 'tuple', 'L', 'array'])
def test_sequences_of_items(kind):
    rows = [(i, 'abc'[i % 3] if i % 5 else 'd') for i in range(40)]
    items = {'list': rows, 'tuple': tuple(rows), 'L': L(rows), 'array': np.array(rows, dtype=object)}[kind]
    ds = Datasets(items, [[ItemGetter(0)], [ItemGetter(1), Categorize()]])
    assert item_labels(ds).tolist() == codes(ds.vocab, [y for _,y in rows])


def test_paths_first_step_per_item_then_per_value(files):
    "`parent_label` on each path, `Categorize` once per class"
    ds = Datasets(files, [[noop], [parent_label, Categorize()]])
    assert item_labels(ds).tolist() == codes(ds.vocab, [f.parent.name for f in files])


def test_array_of_integer_labels():
    "An int array of items, a label function on each: the row-by-row path"
    items = np.arange(50)
    ds = Datasets(items, [[noop], [lambda o: int(o) % 7 // 3, Categorize()]])
    assert item_labels(ds).tolist() == codes(ds.vocab, [int(o) % 7 // 3 for o in items])


# --- a relabelled dataset, the single-item warning ------------------------------------------------------------

class RecordIndex(Callback):
    "The class labels of the loader `CSKD` trains on, in each epoch"
    order, run_valid = 10, False
    def before_fit(self): self.labels = []
    def before_epoch(self): self.recorded = False
    def before_batch(self):
        if not self.recorded: self.labels.append(self.learn.dl.index.labels.copy()); self.recorded = True


def df_dls(df, path, bs=16):
    return ImageDataLoaders.from_df(df, path, valid_col='is_valid', item_tfms=Resize(16), bs=bs, num_workers=0)


def test_relabelled_dataset_gets_fresh_labels(digits_path, digits_df):
    df = digits_df.copy()
    df = pd.concat([df[~df.is_valid].groupby('label').head(12), df[df.is_valid]])
    dls = df_dls(df, digits_path)
    trn = dls.train_ds.tls[1].items                                     # the rows the target pipeline reads
    learn = cnn_learner(dls, cbs=[CSKD(), RecordIndex()])
    learn.fit(1, 1e-3)
    assert learn.record_index.labels[0].tolist() == codes(dls.vocab, trn.label)
    new = np.random.default_rng(0).permutation(trn.label.values)       # same length, same classes, other labelling
    assert (new != trn.label.values).any()
    trn['label'] = new
    learn.fit(1, 1e-3)
    assert learn.record_index.labels[0].tolist() == codes(dls.vocab, new)
    assert class_index(dls.train).labels.tolist() == codes(dls.vocab, new)


def test_relabelled_in_place_gets_fresh_labels():
    "Same dataset object, same length, other labels: the index follows (a cache keyed on the dataset would not)"
    items = [(i, 'abc'[i % 3]) for i in range(30)]
    ds = Datasets(items, [[ItemGetter(0)], [ItemGetter(1), Categorize()]])
    dl = TfmdDL(ds, bs=4, num_workers=0)
    assert class_index(dl).labels.tolist() == codes(ds.vocab, [y for _,y in items])
    new = [(i, 'abc'[(i // 3) % 3]) for i in range(30)]
    ds.tls[1].items[:] = new                                           # in place: the loader's dataset is unchanged
    assert class_index(dl).labels.tolist() == codes(ds.vocab, [y for _,y in new])
    assert PairedDL(dl).index.labels.tolist() == codes(ds.vocab, [y for _,y in new])


def single_item_warnings(f):
    "Messages of the single-item-class warnings `f()` issues"
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        f()
    return [str(o.message) for o in w if 'single training item' in str(o.message)]


def test_single_item_class_warns_once_per_index(digits_path, digits_df):
    df = digits_df
    trn = df[~df.is_valid]
    lone = trn[trn.label == '7'].index[1:]                               # keep one training 7
    dls = df_dls(df.drop(index=lone), digits_path, bs=32)
    warns = single_item_warnings
    w = warns(lambda: PairedDL(dls.train))
    assert len(w) == 1 and "'7'" in w[0] and "'3'" not in w[0]
    pdl = PairedDL(dls.train)
    assert warns(lambda: [None for _ in range(2) for _ in pdl]) == []  # iterating epochs does not warn again
    assert warns(lambda: PairedDL(dls.train, index=pdl.index)) == []


@pytest.mark.parametrize('partner', ['forward', 'cache'])
def test_single_item_class_warns_once_per_fit(digits_path, digits_df, partner):
    df = digits_df
    trn = df[~df.is_valid].groupby('label').head(12)
    trn = trn.drop(index=trn[trn.label == '7'].index[1:])               # one training 7
    dls = df_dls(pd.concat([trn, df[df.is_valid].head(40)]), digits_path, bs=32)
    learn = cnn_learner(dls, cbs=CSKD(partner=partner))
    assert len(single_item_warnings(lambda: learn.fit(3, 1e-3))) == 1
    assert len(single_item_warnings(lambda: learn.fit(1, 1e-3))) == 1   # the next fit warns again, once


def test_single_item_warning_names_text_and_table_classes():
    rng = np.random.default_rng(3)
    ys = ['pos', 'neg']*20 + ['rare']
    df = pd.DataFrame({'text': [' '.join(rng.choice(['good', 'bad'], 4)) for _ in ys], 'label': ys})
    dls = TextDataLoaders.from_df(df, text_col='text', label_col='label', valid_pct=0., bs=8, seq_len=8)
    w = single_item_warnings(lambda: class_index(dls.train))
    assert len(w) == 1 and "'rare'" in w[0] and "'pos'" not in w[0], w
    tab = pd.DataFrame({'a': rng.normal(size=41), 'y': ys})
    dls = TabularDataLoaders.from_df(tab, y_names='y', cont_names=['a'], procs=[Normalize], valid_idx=[0, 1], bs=8)
    w = single_item_warnings(lambda: class_index(dls.train))
    assert len(w) == 1 and "'rare'" in w[0] and "'pos'" not in w[0], w


def test_no_warning_without_single_item_classes(small_dls):
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        class_index(small_dls.train)


# --- the benchmark ------------------------------------------------------------------------------------------

@pytest.mark.slow     # a command-line run of the benchmark
def test_class_index_benchmark_runs():
    r = subprocess.run([sys.executable, str(ROOT/'benchmarks'/'class_index_bench.py'), '--rows', '3000', '--classes', '4',
                        '--sample', '300', '--repeat', '1'], capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "3,000 items, 4 classes" in r.stdout and "item_labels" in r.stdout and "class_index" in r.stdout


def test_digits_folder_written_once_by_processes_at_the_same_time(tmp_path):
    "Four processes asking for the same new folder at once: each gets the whole folder, and no partial copy is left"
    code = ("import sys; from cskd_fastai.datasets import digits_folder\n"
            "from PIL import Image\n"
            "p = digits_folder(sys.argv[1]); fs = list(p.rglob('*.png'))\n"
            "for f in fs: Image.open(f).load()      # every file whole\n"
            "print(len(fs))")
    procs = [subprocess.Popen([sys.executable, '-c', code, str(tmp_path/'digits')], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs) and outs == ['1797']*4, outs
    assert sorted(o.name for o in tmp_path.iterdir()) == ['digits'] and (tmp_path/'digits'/'.complete').exists()
    own = tmp_path/'mine'; own.mkdir(); (own/'notes.txt').write_text('kept')      # a folder of the caller's, with a file
    assert len(get_image_files(digits_folder(own))) == 1797 and (own/'notes.txt').read_text() == 'kept'


def test_written_files_have_the_users_default_permissions(tmp_path):
    "What the library writes through temporary files (the digits, compare's results) gets the permissions `open` would give"
    import stat
    from cskd_fastai.compare_store import _atomic_write
    umask = os.umask(0o022); os.umask(umask)                     # read the umask back, unchanged
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)
    d = digits_folder(tmp_path/'digits')
    assert mode(d) == 0o777 & ~umask and mode(d/'train') == 0o777 & ~umask
    _atomic_write(tmp_path/'res'/'results.json', lambda f: f.write(b'{}'))
    plain = tmp_path/'plain.json'; plain.write_bytes(b'{}')
    assert mode(tmp_path/'res'/'results.json') == mode(plain) == 0o666 & ~umask
