# docs/examples/library/local_sgd.py
"""Local updates in a loop of your own: every rank steps its own AdamW on its own batches,
and ``OuterLoop`` averages the pseudo-gradients every ``local_steps`` steps (compressed if
``comm`` says so). A rank whose gradients are not finite skips its optimizer step but still
calls ``outer.step`` so that it meets the others at the round boundary."""
import torch
import torch.nn.functional as F

from thinwire import OuterLoop
from example_data import batch, make_model


def grads_finite(model: torch.nn.Module) -> bool:
    return all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def train(steps: int, sync: str = "local", comm="none", batch_fn=batch, resume: dict | None = None, **options):
    model = make_model()  # the bare module: no DDP, nothing is all-reduced per step
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    start = 0
    with OuterLoop(model, sync, comm=comm, **options) as outer:
        if resume is not None:  # this rank's own checkpoint (ranks differ between rounds)
            model.load_state_dict(resume["model"])
            opt.load_state_dict(resume["opt"])
            outer.load_state_dict(resume["outer"])
            start = outer.steps
        for step in range(start, steps):
            x, y = batch_fn(step)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            skipped = not grads_finite(model)
            if not skipped:
                opt.step()
            outer.step(skipped=skipped)  # once per global step, on every rank
        with outer.eval_model() as averaged:  # the mean of the ranks' parameters
            x, y = batch(10_000)
            val = float(F.cross_entropy(averaged(x), y))
        ckpt = {"model": model.state_dict(), "opt": opt.state_dict(), "outer": outer.state_dict()}
    return model, val, outer.meter.total(), ckpt
