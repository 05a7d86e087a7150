"""The torch tests run tiny tensors: one intra-op thread avoids thread hand-off costs that
dominate at these sizes on CI's 2 shared cores."""

import torch

torch.set_num_threads(1)
