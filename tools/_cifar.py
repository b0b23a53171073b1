"""The CIFAR data pieces the study scripts share (`tools/regime_study.py`, `tools/finetune_study.py`): images held
as one uint8 tensor, CIFAR-10's normalization statistics, and the batch transforms (pad-4 random crop + horizontal
flip, then normalize, for training; normalize only for evaluation)."""
import torch, torch.nn.functional as F
from fastai.torch_core import TensorCategory

__all__ = ['MEAN', 'STD', 'ImageTensors', 'pad_crop_flip', 'train_batch', 'eval_batch']

MEAN,STD = torch.tensor([0.4914, 0.4822, 0.4465]),torch.tensor([0.2470, 0.2435, 0.2616])

class ImageTensors(torch.utils.data.Dataset):
    "Images held as one uint8 tensor; `targets` lets `cskd_fastai` read the labels without loading images"
    def __init__(self, x, y): self.x,self.y,self.targets = x,y,y
    def __len__(self): return len(self.x)
    def __getitem__(self, i): return self.x[i], self.y[i]

def _normalize(x): return (x.float()/255 - MEAN[:,None,None]) / STD[:,None,None]

def pad_crop_flip(x, pad=4):
    "Each row its own random crop of the zero-padded (black-bordered) uint8 image and its own random horizontal flip"
    n,c,h,w = x.shape
    xp = F.pad(x, (pad,)*4)
    i = torch.randint(0, 2*pad+1, (n,)); j = torch.randint(0, 2*pad+1, (n,))
    rows = (i[:,None] + torch.arange(h))[:,None,:,None].expand(n,c,h,w+2*pad)
    x = xp.gather(2, rows)
    cols = (j[:,None] + torch.arange(w))[:,None,None,:].expand(n,c,h,w)
    x = x.gather(3, cols)
    flip = torch.rand(n) < 0.5
    x[flip] = x[flip].flip(3)
    return x

def train_batch(b): return (_normalize(pad_crop_flip(b[0])), TensorCategory(b[1]), *b[2:])   # RandomCrop(32, 4) + flip, then Normalize
def eval_batch(b):  return (_normalize(b[0]), TensorCategory(b[1]), *b[2:])
