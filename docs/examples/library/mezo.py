# docs/examples/library/mezo.py
"""MeZO as a torch optimizer: forward passes only, memory as in inference. On several ranks
every rank evaluates its own batch along the same perturbation, and the ranks exchange one
number per step (they stay identical)."""
import torch
import torch.nn.functional as F

from thinwire.optim import MeZO
from example_data import batch, make_model


def train(steps: int, lr: float = 1e-3):
    model = make_model().eval()  # eval: no dropout between the two evaluations of a step
    opt = MeZO(model.parameters(), lr=lr, eps=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    losses = []
    for step in range(steps):
        x, y = batch(step)
        loss = opt.step(lambda: F.cross_entropy(model(x), y))  # called twice, under no_grad
        sched.step()
        losses.append(float(loss))
    return model, losses, opt.meter.total()
