"""`CSKD` under fastai's `distrib_ctx` (Accelerate + DDP): fits on 2 CPU processes (gloo), checked on each rank.

`ddp_worker.py` is the script each process runs. Two launches serve every test here: `torchrun` runs two fits with
seed 0, `accelerate launch` one with seed 1, a loader worker per rank and training metrics. Not covered on CPU:
NCCL, `nn.SyncBatchNorm` (the worker passes `sync_bn=False`), and fastai's `.cuda()` broadcast of each epoch's
indices, which the worker replaces with a CPU one."""
import json, os, signal, socket, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow    # the slow tier (two launches of two processes each): `pytest --all` runs it

pytest.importorskip('accelerate')
if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip('needs torch.distributed with the gloo backend', allow_module_level=True)

HERE = Path(__file__).resolve().parent
TIMEOUT = 240          # seconds per launch: a hang fails the tests instead of blocking CI
N_PROC = 2
# The two ways users launch: each runs some of the worker's fits (`ddp_worker.RUNS`)
LAUNCHES = {'torchrun': (['-m', 'torch.distributed.run', '--nnodes', '1', '--nproc_per_node', str(N_PROC),
                          '--master_addr', '127.0.0.1', '--master_port', '{port}'], ['seed0', 'seed0_again']),
            'accelerate': (['-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', str(N_PROC),
                            '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
                            '--main_process_port', '{port}'], ['seed1_workers', 'cache'])}
RUNS = [r for _,runs in LAUNCHES.values() for r in runs if r != 'cache']


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _kill_tree(pid):
    "SIGKILL process `pid`, its process group and every process under it (loader workers may sit in other groups)"
    import psutil                                   # comes with accelerate
    try: under = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess: under = []
    try: os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError: pass
    for p in under:
        try: p.kill()
        except psutil.NoSuchProcess: pass


def _launch(args, runs, out):
    "Run the worker on `N_PROC` processes with the launcher `args`; the JSON each rank wrote"
    env = {**os.environ, 'ACCELERATE_USE_CPU': '1',  # what `accelerate launch --cpu` sets: gloo, no GPU
           'CUDA_VISIBLE_DEVICES': '', 'OMP_NUM_THREADS': '1', 'MPLBACKEND': 'Agg', 'PYTHONWARNINGS': 'ignore'}
    port = str(_free_port())
    cmd = [sys.executable] + [a.replace('{port}', port) for a in args] + [str(HERE/'ddp_worker.py'), str(out)] + runs
    # the output goes to a file, not a pipe: a process left holding a pipe (a loader worker) would block the reading
    with open(out/'launch.log', 'w') as f:
        proc = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try: proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)                       # the launcher, its ranks and their loader workers
            proc.wait(timeout=60)
            pytest.fail(f"{' '.join(cmd)}\ndid not finish in {TIMEOUT}s (a hang?). Its output:\n{(out/'launch.log').read_text()[-5000:]}")
    log = (out/'launch.log').read_text()
    assert proc.returncode == 0, f"{' '.join(cmd)}\nexited with {proc.returncode}:\n{log[-8000:]}"
    res = [json.loads((out/f'rank{r}.json').read_text()) for r in range(N_PROC)]
    assert [r['rank'] for r in res] == list(range(N_PROC)) and all(r['world_size'] == N_PROC for r in res)
    return res


@pytest.fixture(scope='module')
def fits(tmp_path_factory):
    "Every launch in `LAUNCHES`: for each fit's name, the list of what each rank saw"
    res = {}
    for name,(args,runs) in LAUNCHES.items():
        ranks = _launch(args, runs, tmp_path_factory.mktemp(name))
        res.update({run: [r['runs'][run] for r in ranks] for run in runs})
    return res


@pytest.fixture(scope='module')
def labels():
    from ddp_worker import make_data, N_TRAIN
    return make_data()[1][:N_TRAIN]


def _values(run):
    "Recorder values of the last epoch, by column name"
    return dict(zip(run['names'][1:-1], run['values'][-1]))


@pytest.mark.parametrize('run', RUNS)
def test_each_rank_trains_ddp_on_sharded_pairs(fits, run):
    for r in fits[run]:
        # CSKD pairs the plain loader, fastai's DistributedTrainer shards it and wraps the model
        assert r['loaders'] == ['DistributedDL', 'PairedDL', 'DistributedDataParallel']
        assert r['after'] == ['TfmdDL', 'TinyNet', 2]      # dls, model and metrics put back after the fit


@pytest.mark.parametrize('run', RUNS)
def test_partners_same_class_drawn_from_whole_training_set(fits, labels, run):
    for e in range(2):
        for r in fits[run]:
            ep = r['epochs'][e]
            a, p = np.array(ep['anchors']), np.array(ep['partners'])
            assert ep['same_class'] and len(a) == len(p)
            np.testing.assert_array_equal(labels[a], labels[p])
        a0, a1 = (set(r['epochs'][e]['anchors']) for r in fits[run])
        # partners come from the other rank's shard too
        assert set(fits[run][0]['epochs'][e]['partners']) & a1
        assert set(fits[run][1]['epochs'][e]['partners']) & a0


@pytest.mark.parametrize('run', RUNS)
def test_anchors_are_disjoint_shards_of_the_epoch(fits, labels, run):
    epochs = []
    for e in range(2):
        a0, a1 = (r['epochs'][e]['anchors'] for r in fits[run])
        assert len(a0) == len(a1) == len(labels)//N_PROC
        assert len(set(a0)) == len(a0) and not set(a0) & set(a1)
        assert set(a0) | set(a1) == set(range(len(labels)))
        epochs.append(a0)
    assert epochs[0] != epochs[1]          # reshuffled every epoch


@pytest.mark.parametrize('run', RUNS)
def test_loss_is_formula_and_finite(fits, run):
    for r in fits[run]:
        assert r['checked'] == len(r['losses'])   # every step's loss == CE + lam*T^2*KL recomputed (tests/reference.py's FormulaCheck)
        assert len(r['losses']) == 2*4 and np.isfinite(r['losses']).all()      # 2 epochs of 4 steps per rank
        assert np.isfinite(r['values']).all()


@pytest.mark.parametrize('run', RUNS)
def test_kd_loss_is_mean_over_ranks(fits, run):
    col = [n for n in fits[run][0]['names'] if n.endswith('kd_loss')][0]
    i = fits[run][0]['names'][1:-1].index(col)
    for e in range(2):
        local = [r['kd_local'][e] for r in fits[run]]
        mean = sum(s for s,_ in local)/sum(n for _,n in local)
        assert abs(local[0][0]/local[0][1] - local[1][0]/local[1][1]) > 1e-6    # the ranks differ, the log does not
        for r in fits[run]: assert r['values'][e][i] == pytest.approx(mean, rel=1e-5)
    # so is every column: fastai averages the losses over the ranks and gathers the predictions for metrics
    np.testing.assert_allclose(fits[run][0]['values'], fits[run][1]['values'], rtol=1e-6)


@pytest.mark.parametrize('run', RUNS)
def test_ranks_stay_in_sync(fits, run):
    "DDP averaged the gradients (same weights); BatchNorm buffers broadcast from rank 0 as in a plain DDP fit"
    p0, p1 = (np.array(r['params']) for r in fits[run])
    np.testing.assert_allclose(p0, p1, rtol=0, atol=1e-6)
    b0, b1 = (np.array(r['buffers']) for r in fits[run])
    np.testing.assert_allclose(b0, b1, rtol=0, atol=1e-6)


def test_seeded_runs_reproduce_per_rank(fits):
    for a, b, c in zip(fits['seed0'], fits['seed0_again'], fits['seed1_workers']):
        for key in ['epochs', 'params', 'buffers', 'values', 'losses']: assert a[key] == b[key], key
        assert a['epochs'] != c['epochs']      # another seed: other shards and partners


def test_metrics_gather_anchors_only(fits, labels):
    "fastai gathers predictions over the ranks and drops its padding: every anchor once, no partner"
    for r in fits['seed0']:
        v = _values(r)
        assert v['n_rows'] == 64 and 'train_n_rows' not in v
    for r in fits['seed1_workers']:                        # train_metrics=True
        v = _values(r)
        assert v['train_n_rows'] == len(labels) and v['valid_n_rows'] == 64
        assert v['kd_loss'] > 0 and 'valid_kd_loss' not in v and 'train_kd_loss' not in v   # one column, a training value


def test_partner_cache_is_shared_across_ranks(fits):
    "`CSKD(partner='cache')`: positions travel with the batches, and each step's logits are gathered into every rank's cache"
    a, b = fits['cache']
    for r in (a, b):
        assert r['loaders'] == ['DistributedDL', 'IndexedDL', 'DistributedDataParallel']
        assert r['positions_match']                      # the positions CSKD took off are the rows' own
        assert r['names'][-2] == 'kd_loss' and all(vs[-1] > 0 for vs in r['values'])
    assert np.array_equal(a['params'], b['params'])
    assert np.array_equal(a['cache'], b['cache']) and a['seen'] == b['seen']   # one cache, the same on both ranks
    # every item either rank trained on is cached on both (DistributedDL pads with repeats, so compare sets)
    assert np.flatnonzero(a['seen']).tolist() == sorted(set(a['anchors']) | set(b['anchors']))
