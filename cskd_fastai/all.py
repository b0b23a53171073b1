"`from cskd_fastai.all import *`: fastai's vision API plus everything CS-KD, like `from fastai.vision.all import *`"
from fastai.vision.all import *
from .data import *
from .datasets import *
from .partners import *
from .callback import *
from .metrics import *
from .interpret import *
from .calibrate import *
