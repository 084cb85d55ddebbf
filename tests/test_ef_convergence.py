"""int8 with classic error feedback through the two-phase collective, the configuration
whose quality docs/comm.md reports: what it checks is the mechanism, not a quality bound.

Why not a bound: at 400 (1000) steps of the tiny char-GPT with SGD momentum 0.9, lr 0.3,
int8 + ef ended -0.5% (-0.3%) against dense on seed 0, but trainer.seed=1 / 2 gave -10.9% /
+7.7% (-7.3% / +9.7%): the seed moves this 2-rank run more than int8 does, so a bound
that holds over seeds 0-4 would be too loose to fail (docs/comm.md, "Which feedback should
I use?").

What is asserted instead, over seeds 0-4:

- nothing is lost, only delayed: on 2 ranks, 30 steps of heavy-tailed gradients, the sum
  over steps of what the collective returns plus the mean of the ranks' residuals equals
  the sum of the exact mean gradients (classic EF's invariant, Seide et al. 2014;
  Karimireddy et al. 2019): to fp32 rounding through the all-gather (measured 6e-8 of the
  sum's largest entry), and through the two-phase collective up to the owners'
  re-quantisation, which int8 does not feed back (round to nearest, <= absmax/254 per step;
  measured about a third of that bound); the residuals stay at a quantisation step's size;
- every step's result is the mean gradient to within int8's error;
- in the trainer, at a quarter of the bytes: a short run sends < 0.3x of the dense run's
  wire bytes and its loss falls as the dense run's does."""
import json

import pytest
import torch
import torch.distributed as dist

from conftest import run_ranks

SIZES = {"w1": 3000, "w2": 5001}  # one segment with an odd length: the last chunk is padded
STEPS = 30


def ef_ranks(rank, world_size, seed, collective):
    from thinwire.comm.accounting import WireMeter
    from thinwire.comm.aggregator import CompressedAggregator
    from thinwire.comm.collectives import chunk_numel

    agg = CompressedAggregator("int8", {"feedback": "ef", "collective": collective}, WireMeter(),
                               group2=dist.new_group())
    names = list(SIZES)
    out_sum = {n: torch.zeros(k, dtype=torch.float64) for n, k in SIZES.items()}
    true_sum = {n: torch.zeros(k, dtype=torch.float64) for n, k in SIZES.items()}
    worst_step_err, second_rounding = 0.0, {n: 0.0 for n in SIZES}
    for t in range(STEPS):
        g = torch.Generator().manual_seed(1000 * seed + 10 * t + rank)
        # heavy-tailed, scaled per step: int8's absmax blocks lose the small entries
        grads = [torch.randn(k, generator=g) ** 3 * (1 + t % 5) for k in SIZES.values()]
        outs = agg.launch(names, grads, t).wait()
        agg.commit()
        for n, gr, o in zip(names, grads, outs):
            mean = gr.double().clone()
            dist.all_reduce(mean)
            mean /= world_size
            out_sum[n] += o.double()
            true_sum[n] += mean
            worst_step_err = max(worst_step_err, float((o.double() - mean).abs().max() / mean.abs().max()))
            # two-phase: the owner re-quantises the mean, round to nearest: <= half a step of
            # absmax/127 (int8 keeps no server-side error; sign1 does)
            second_rounding[n] += float(o.abs().max()) / 254 * (1 + 1e-3)
    res = {"out_sum": out_sum, "true_sum": true_sum, "worst_step_err": worst_step_err, "e": {}, "s": {},
           "second_rounding": second_rounding}
    for n, k in SIZES.items():
        e = agg.feedback.store[n]["e"].double().reshape(-1)
        dist.all_reduce(e)
        res["e"][n] = e / world_size
        c = chunk_numel(k, world_size)
        s = torch.zeros(world_size * c, dtype=torch.float64)  # the owners' residuals, each its chunk
        if n in agg.server_errors:
            s[rank * c:(rank + 1) * c] = agg.server_errors[n].double()
        dist.all_reduce(s)
        res["s"][n] = s[:k]
    return res


@pytest.mark.parametrize("collective", ["allgather", "two_phase"])
@pytest.mark.parametrize("seed", range(5))
def test_int8_error_feedback_delays_and_loses_nothing(seed, collective, tmp_path):
    for res in run_ranks(ef_ranks, 2, tmp_path, seed, collective):
        for n in SIZES:
            total = res["out_sum"][n] + res["e"][n] + res["s"][n]
            scale = res["true_sum"][n].abs().max()
            lost = res["second_rounding"][n] if collective == "two_phase" else 0.0
            torch.testing.assert_close(total, res["true_sum"][n], rtol=0, atol=1e-6 * float(scale) + lost)
            # the residuals stay at a quantisation step's size, no drift (measured over seeds
            # 0-4: at most 0.0056 of the summed gradient's largest entry)
            assert res["e"][n].abs().max() + res["s"][n].abs().max() < 0.02 * scale, n
        # each step's result is the mean gradient up to int8's error: its roundings of
        # absmax/127 per 2048-block plus the released residual (measured: at most 0.060)
        assert res["worst_step_err"] < 0.12, res["worst_step_err"]


COMMON = ["experiment=tiny", "trainer.max_steps=40", "trainer.eval_every=40", "trainer.checkpoint_every=40",
          "data.eval_batches=8", "optim.warmup_steps=10", "optim=sgd", "optim.lr=0.3", "optim.momentum=0.9",
          "optim.grad_clip=0", "trainer.sample_chars=0"]
RUNS = {
    "dense": ["comm=none"],
    "int8_ef": ["comm=int8", "comm.feedback=ef"],
}


def test_int8_with_error_feedback_trains_at_a_quarter_of_the_bytes(pools, tmp_path):
    loss, wire = {}, {}
    for name, overrides in RUNS.items():
        pools.train(*COMMON, *overrides, f"hydra.run.dir={tmp_path / name}")
        rows = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
        train = [r["loss"] for r in rows if "loss" in r]
        loss[name] = (sum(train[:5]) / 5, sum(train[-5:]) / 5)
        wire[name] = sum(r["wire_bytes"] - r["control_bytes"] for r in rows[:-1]) / (len(rows) - 1)
    assert wire["int8_ef"] < 0.3 * wire["dense"], wire  # int8 two-phase: ~0.25x of fp32
    for first, last in loss.values():  # both learn: the last 5 steps' loss below the first 5's
        assert last < 0.9 * first, loss
