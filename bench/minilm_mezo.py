"""Why ``experiment=minilm_mezo`` stayed at chance, and what a forward-only run can reach on
the pretrained all-MiniLM-L6-v2's comedy-vs-tragedy lines on a CPU (docs/presets.md).

    python bench/minilm_mezo.py head            # the head alone on frozen features (minutes)
    python bench/minilm_mezo.py mezo --trained lora --head-init class_means --lr 1e-4 --eps 1e-2 --steps 2000
                                                # MeZO on the real model, one process (0.2-0.6 s a step)

``head``: the mean-pooled features of 16,384 training lines and of the 1,024 lines of the 64
fixed validation batches of 16, computed once; then, on them, the head alone (770 weights):

- ZO-SGD, exactly MeZO's update restricted to the head (with the encoder frozen the features
  do not change, so perturbing the head and running the model is the same as perturbing the
  head on the features), batches of 32 (2 ranks x 16), from the model's random head;
- plain SGD on the true gradient, the same batches: what the head can reach;
- the class-means head (``peft.head_init=class_means``, ``thinwire.optim.head_init``) from
  256..4,096 lines, with and without the correction of the temperature for noisy means.

``mezo``: ``thinwire.optim.MeZO`` stepping the real model (batches of ``--batch`` lines, the
data set's own training batches, eval mode, one thread) with ``--trained`` full | lora (r 8
adapters + the head) and the head started ``random`` or from ``class_means`` (2,048 lines);
prints the loss on 32 fixed validation batches of 16 every ``--every`` steps.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def build(batch: int, eval_batches: int):
    from hydra.utils import instantiate

    from thinwire.config import compose

    cfg = compose(["experiment=minilm_genre", f"data.batch_size={batch}", f"data.eval_batches={eval_batches}"])
    data = instantiate(cfg.data, seed=0, rank=0, world_size=1)
    torch.manual_seed(0)  # the trainer's seed 0: the same random head
    return cfg, data, instantiate(cfg.model, info=data.info).eval()


@torch.no_grad()
def features(n_train: int = 16384):
    _, data, model = build(16, 64)
    xv, yv = zip(*[(model.features(b["input_ids"], b["attention_mask"]), b["y"])
                   for b in data.eval_batches_for_rank()])
    idx = torch.randperm(len(data.train_lines), generator=torch.Generator().manual_seed(1))[:n_train].tolist()
    xt, yt = zip(*[(model.features(b["input_ids"], b["attention_mask"]), b["y"]) for b in
                   (data._batch(data.train_lines, data.train_labels, idx[i:i + 64]) for i in range(0, n_train, 64))])
    head = (model.head.weight.detach().clone(), model.head.bias.detach().clone())
    return (torch.cat(xt), torch.cat(yt)), (torch.cat(xv), torch.cat(yv)), head


def evaluate(val, w, b) -> tuple[float, float]:
    x, y = val
    logits = x @ w.T + b
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def zo_head(train, val, head, lr: float, steps: int, eps: float = 1e-3, exact: bool = False, batch: int = 32):
    """MeZO's update (or SGD's with ``exact``) on the head alone; (step, val loss, acc) rows."""
    (x, y), gen = train, torch.Generator().manual_seed(0)
    w, b = head[0].clone(), head[1].clone()
    rows = []
    for s in range(1, steps + 1):
        i = torch.randint(0, len(x), (batch,), generator=gen)
        xb, yb = x[i], y[i]
        if exact:
            wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
            gw, gb = torch.autograd.grad(F.cross_entropy(xb @ wg.T + bg, yb), (wg, bg))
        else:
            zw, zb = torch.randn(w.shape, generator=gen), torch.randn(b.shape, generator=gen)
            lp = F.cross_entropy(xb @ (w + eps * zw).T + b + eps * zb, yb)
            lm = F.cross_entropy(xb @ (w - eps * zw).T + b - eps * zb, yb)
            g = (lp - lm) / (2 * eps)
            gw, gb = g * zw, g * zb
        w, b = w - lr * gw, b - lr * gb
        if s in (20, 200, 2000, 5000):
            rows.append((s, *evaluate(val, w, b)))
    return rows


class OneHead(torch.nn.Module):
    new_modules = ("head",)

    def __init__(self, dim: int):
        super().__init__()
        self.head = torch.nn.Linear(dim, 2)

    def forward(self, x, y):
        return F.cross_entropy(self.head(x), y)


def class_means(train, lines: int, draw: int, correct: bool):
    """The class-means head on lines [draw * lines, (draw + 1) * lines) of the training features."""
    from thinwire.optim import head_init

    x, y = train
    sl = slice(draw * lines, (draw + 1) * lines)
    model = OneHead(x.shape[1])
    head_init.class_means_head(model, [{"x": x[sl], "y": y[sl]}], 2, correct_noise=correct)
    return model.head.weight.detach(), model.head.bias.detach()


def head_only() -> None:
    t = time.time()
    train, val, head = features()
    print(f"features of {len(train[1])} + {len(val[1])} lines: {time.time() - t:.0f} s; random head: "
          "val loss %.4f acc %.3f; zero head: %.4f" % (*evaluate(val, *head), evaluate(val, head[0] * 0, head[1] * 0)[0]))
    print("\n| head alone, from the random head | lr | step 20 | step 200 | step 2000 |\n|---|---|---|---|---|")
    for exact, lrs in ((False, (1e-5, 1e-4, 1e-3, 3e-3, 1e-2)), (True, (0.03, 0.1))):
        for lr in lrs:
            rows = zo_head(train, val, head, lr, 2000, exact=exact)
            print(f"| {'SGD, true gradient' if exact else 'ZO-SGD (MeZO)'} | {lr:g} | "
                  + " | ".join(f"{lo:.4f} ({acc:.3f})" for _, lo, acc in rows) + " |", flush=True)
    print("\n| class-means head | lines | 4 draws: val loss (acc) |\n|---|---|---|")
    for lines in (256, 512, 1024, 2048, 4096):
        for correct in (False, True):
            got = [evaluate(val, *class_means(train, lines, d, correct)) for d in range(4)]
            print(f"| {'corrected' if correct else 'uncorrected'} | {lines} | "
                  + ", ".join(f"{lo:.4f} ({acc:.3f})" for lo, acc in got) + " |", flush=True)
    cm = class_means(train, 2048, 0, True)
    print("\n| head alone, from the class-means head (2,048 lines) | lr | step 20 | step 200 | step 2000 |\n"
          "|---|---|---|---|---|")
    for lr in (1e-4, 1e-3, 3e-3):
        rows = zo_head(train, val, cm, lr, 2000)
        print(f"| ZO-SGD (MeZO) | {lr:g} | " + " | ".join(f"{lo:.4f} ({acc:.3f})" for _, lo, acc in rows) + " |",
              flush=True)


def mezo(a) -> None:
    from thinwire.optim import MeZO
    from thinwire.optim.head_init import class_means_head

    torch.set_num_threads(1)
    _, data, model = build(a.batch, 32)
    t = time.time()
    if a.head_init == "class_means":
        class_means_head(model, (data.train_batch(-(i + 1)) for i in range(2048 // a.batch)), 2)
    t_init = time.time() - t
    if a.trained == "lora":
        from thinwire.optim.lora import LoraOptions, inject, lora_config

        model.requires_grad_(False)
        o = LoraOptions(r=8)
        model = inject(o, model, lora_config(o, model, ga=False))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = MeZO(params, lr=a.lr, eps=a.eps, samples=a.samples)

    @torch.no_grad()
    def val():
        losses, hits, n = [], 0, 0
        for b in data.eval_batches_for_rank():
            losses.append(float(model(**b)))
            hits += int((model.logits(b["input_ids"], b["attention_mask"]).argmax(-1) == b["y"]).sum())
            n += len(b["y"])
        return sum(losses) / len(losses), hits / n

    print(f"trained {a.trained}: {sum(p.numel() for p in params)} parameters; head {a.head_init} ({t_init:.0f} s)")
    print("step 0: val loss %.4f acc %.3f" % val(), flush=True)
    t, train = time.time(), []
    for s in range(1, a.steps + 1):
        b = data.train_batch(s)
        train.append(float(opt.step(lambda: model(**b))))
        if s % a.every == 0:
            print("step %d: val loss %.4f acc %.3f; training loss (last %d) %.4f; %.2f s/step"
                  % (s, *val(), a.every, sum(train[-a.every:]) / a.every, (time.time() - t) / s), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    sub.add_parser("head", help="the head alone on frozen features")
    m = sub.add_parser("mezo", help="MeZO on the real model, one process")
    m.add_argument("--trained", choices=("full", "lora"), default="lora")
    m.add_argument("--head-init", choices=("random", "class_means"), default="class_means")
    m.add_argument("--lr", type=float, default=1e-4)
    m.add_argument("--eps", type=float, default=1e-2)
    m.add_argument("--samples", type=int, default=1)
    m.add_argument("--steps", type=int, default=1000)
    m.add_argument("--every", type=int, default=250)
    m.add_argument("--batch", type=int, default=16)
    a = ap.parse_args()
    head_only() if a.what == "head" else mezo(a)


if __name__ == "__main__":
    main()
