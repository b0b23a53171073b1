"""Time reading every training item's class (`item_labels`) and building the class index (`class_index`) for
large item sources, without loading any input. Prints the figures; nothing is asserted about time.

    python benchmarks/class_index_bench.py                      # 10^6 rows, 10 and 1,000 classes
    python benchmarks/class_index_bench.py --rows 100000 --classes 10

Sources timed: a DataFrame read by `ColReader` (what `ImageDataLoaders.from_df`, `from_csv`, a `DataBlock`
with `ColReader` and `TextDataLoaders.from_df` build), a list of `(path, label)` tuples read by `ItemGetter`
(`from_lists`, a `DataBlock` over tuples), and label functions that must run on each item (a lambda on
DataFrame rows, `parent_label` on paths: `from_folder`), timed on `--sample` items and scaled to `--rows`.
Each figure is the best of `--repeat` runs, as wall time and as this process's CPU time (the
second is what to compare on a busy machine). The fastai `Datasets` are built with a given vocabulary: fastai's own
`Categorize` setup walks every row once, which is not what is measured here.
"""
import argparse, os, platform, time
from pathlib import Path

def best_of(f, repeat):
    "Smallest wall time and smallest CPU time of `repeat` calls of `f`, and its last result"
    ts,cs = [],[]
    for _ in range(repeat):
        t0,c0 = time.perf_counter(),time.process_time(); res = f()
        ts.append(time.perf_counter() - t0); cs.append(time.process_time() - c0)
    return min(ts), min(cs), res

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--rows', type=int, default=1_000_000, help='items in the training set')
    p.add_argument('--classes', type=int, nargs='+', default=[10, 1000], help='numbers of classes to time')
    p.add_argument('--sample', type=int, default=20_000, help='items timed on the row-by-row paths (scaled to --rows)')
    p.add_argument('--repeat', type=int, default=3, help='runs per figure (the best is printed)')
    p.add_argument('--threads', type=int, default=1, help='torch threads')
    a = p.parse_args()

    import numpy as np, pandas as pd, torch, fastai
    torch.set_num_threads(a.threads)
    from fastai.data.core import Datasets, TfmdDL
    from fastai.data.transforms import ColReader, ItemGetter, Categorize, parent_label
    from cskd_fastai.data import item_labels, class_index

    print(f"python {platform.python_version()}, numpy {np.__version__}, pandas {pd.__version__}, fastai {fastai.__version__}, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), torch threads {a.threads}")
    n, rng = a.rows, np.random.default_rng(0)
    for k in a.classes:
        vocab = [f'class_{i:04d}' for i in range(k)]
        y = rng.integers(0, k, n)
        names = np.array(vocab, dtype=object)[y]
        df = pd.DataFrame({'fname': [f'train/{c}/{i:07d}.png' for i,c in enumerate(names)], 'label': names})
        expected = pd.Categorical(df.label, categories=vocab).codes.astype(np.int64)   # independent of the library
        print(f"\n{n:,} items, {k:,} classes")

        ds = Datasets(df, [[ColReader('fname')], [ColReader('label'), Categorize(vocab=vocab)]])
        t, c, labels = best_of(lambda: item_labels(ds), a.repeat)
        assert (labels == expected).all(), "labels from the DataFrame differ from the column's codes"
        print(f"  DataFrame, ColReader('label'):        item_labels {t:6.3f} s (CPU {c:6.3f} s)", end='')
        dl = TfmdDL(ds, bs=64, num_workers=0)
        t, c, ci = best_of(lambda: class_index(dl), a.repeat)
        assert (ci.labels == expected).all()
        print(f", class_index {t:6.3f} s (CPU {c:6.3f} s)")

        tuples = list(zip(df.fname, df.label))
        ds = Datasets(tuples, [[ItemGetter(0)], [ItemGetter(1), Categorize(vocab=vocab)]])
        t, c, labels = best_of(lambda: item_labels(ds), a.repeat)
        assert (labels == expected).all(), "labels from the tuples differ from the column's codes"
        print(f"  (path, label) tuples, ItemGetter(1):  item_labels {t:6.3f} s (CPU {c:6.3f} s)")

        m = min(a.sample, n)
        sub = df.iloc[:m]
        ds = Datasets(sub, [[ColReader('fname')], [lambda r: r['label'], Categorize(vocab=vocab)]])
        t, c, labels = best_of(lambda: item_labels(ds), a.repeat)
        assert (labels == expected[:m]).all()
        print(f"  DataFrame, a lambda on each row:      {t/m*1e6:6.1f} us/item (CPU {c/m*1e6:6.1f}), {c/m*n:6.1f} CPU s for {n:,} (get_y on each item)")

        paths = [Path(o) for o in sub.fname]
        ds = Datasets(paths, [[lambda o: o], [parent_label, Categorize(vocab=vocab)]])
        t, c, labels = best_of(lambda: item_labels(ds), a.repeat)
        assert (labels == expected[:m]).all()
        print(f"  paths, parent_label:                  {t/m*1e6:6.1f} us/item (CPU {c/m*1e6:6.1f}), {c/m*n:6.1f} CPU s for {n:,} (get_y on each item)")

if __name__ == '__main__': main()
