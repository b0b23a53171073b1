"""GPU-only checks (`@pytest.mark.gpu`: skipped without CUDA). Run them on a machine with a CUDA GPU:
`python -m pytest -m gpu tests/test_gpu.py`.

- the partner forward under `MixedPrecision` (fp16 and bf16) runs inside autocast, as the anchors' does;
- the partner cache lives on the GPU, in fp16, with logits clamped to fp16's range;
- channels-last models train with `CSKD`;
- under `to_non_native_fp16()` the partner forward runs in half precision, like the anchors';
- `CSKD`'s per-step code makes no host-device synchronisation."""
import pytest
import torch
import torch.nn.functional as F
from fastai.vision.all import *
from cskd_fastai.all import *
from reference import tiny_cnn, FormulaCheck

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_partner_forward_runs_under_autocast(small_dls, dtype):
    dtypes = []
    class Spy(Callback):
        order, run_valid = CSKD.order + 1, False        # right after CSKD's before_batch: the partner logits are ready
        def before_batch(self): dtypes.append(self.learn.cskd.source.logits.dtype)
    small_dls.to(torch.device('cuda'))
    mode = {torch.float16: 'fp16', torch.bfloat16: 'bf16'}[dtype]
    learn = Learner(small_dls, tiny_cnn(), metrics=accuracy, cbs=[CSKD(), Spy()]).to_fp16(amp_mode=mode)
    learn.fit(1)
    assert dtypes and all(d == dtype for d in dtypes), dtypes     # computed in autocast, like the anchors
    assert learn.recorder.values[-1][-1] > 0


def test_cache_on_gpu_in_half_precision_and_range(small_dls):
    small_dls.to(torch.device('cuda'))
    learn = Learner(small_dls, tiny_cnn(), metrics=accuracy, cbs=CSKD(partner='cache')).to_fp16()
    learn.fit(2)
    src = learn.cskd.source
    assert src.cache.is_cuda and src.cache.dtype == torch.float16 and src.seen.is_cuda
    assert torch.isfinite(src.cache.float()).all()
    # huge logits are clamped into fp16's range, not stored as inf
    learn.pred = torch.full((4, 10), 1e6, device='cuda')
    src.pos = torch.arange(4, device='cuda')
    src.update(learn)
    assert torch.isfinite(src.cache[:4].float()).all() and src.cache[:4].float().max() == pytest.approx(6e4, rel=1e-3)


def test_channels_last(small_dls):
    small_dls.to(torch.device('cuda'))
    learn = Learner(small_dls, tiny_cnn(), metrics=accuracy, cbs=[CSKD(), ChannelsLast(), FormulaCheck(tol=1e-3)])
    learn.fit(1)
    assert learn.formula_check.checked == len(small_dls.train)


@pytest.mark.parametrize('partner', ['forward', 'cache'])
def test_no_host_device_sync_in_cskd_per_step_code(small_dls, partner):
    "CSKD's before_batch and after_loss, and the KD term, under `set_sync_debug_mode('error')`"
    small_dls.to(torch.device('cuda'))
    learn = Learner(small_dls, tiny_cnn(), cbs=CSKD(partner=partner))
    learn.fit(1)                                          # warm: the cache table exists, the loader is built
    cb = learn.cskd
    learn.dl = cb.source.loader(learn.dls.train, class_index(learn.dls.train))
    learn.training, learn.pct_train = True, 0.5
    learn.model.cuda().train()
    for b in learn.dl:
        learn.xb, learn.yb = b[:1], b[1:]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode('error')
        try:
            cb.before_batch()
            learn.pred = learn.model(*learn.xb)
            learn.loss_grad = F.cross_entropy(learn.pred, learn.yb[0]); learn.loss = learn.loss_grad.detach()
            cb.after_loss()
        finally: torch.cuda.set_sync_debug_mode('default')
        break


def test_non_native_fp16_partners_in_half_precision(small_dls):
    "`NonNativeMixedPrecision` casts the anchors to half after `CSKD` split off the partners: the partners are cast too"
    small_dls.to(torch.device('cuda'))
    learn = Learner(small_dls, tiny_cnn(), metrics=accuracy, cbs=CSKD()).to_non_native_fp16()
    seen = []
    h = learn.model.register_forward_pre_hook(lambda m, i: seen.append((m.training, i[0].dtype)) if learn.training else None)
    try: learn.fit(1)
    finally: h.remove()
    train = [d for t, d in seen if t]
    assert len(train) == 2*len(small_dls.train) and all(d == torch.float16 for d in train), train
    assert np.isfinite(learn.recorder.values[-1][0]) and learn.recorder.values[-1][-1] > 0
