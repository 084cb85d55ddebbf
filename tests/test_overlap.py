"""Eager updates (``sync=co2 sync.overlap=eager``), streaming fragments (``sync.fragments``)
and inner-moment averaging (``sync.moment1_every``) against single-process simulations of p
workers written out with plain tensors, as tests/test_sync.py does for co2."""
import pytest
import torch

from thinwire.comm.accounting import collective_bytes

from conftest import run_ranks
from test_sync import batch, make_model, run_strategy, sync_cfg


def workers_of(p, lr, momentum):
    workers = [make_model() for _ in range(p)]
    opts = [torch.optim.SGD(w.parameters(), lr=lr, momentum=momentum) for w in workers]
    return workers, opts, [list(w.parameters()) for w in workers]


def inner_step(step, workers, opts):
    p = len(workers)
    for i in range(p):
        opts[i].zero_grad()
        workers[i](**batch(step, i, p)).backward()
        opts[i].step()


def nesterov(anchor, mom, d, lr, beta):
    """Outer SGD with Nesterov momentum on ``anchor`` (in place): m = beta m + d,
    a -= lr (d + beta m)."""
    for a, m, x in zip(anchor, mom, d):
        m.mul_(beta).add_(x)
        a.sub_(lr * (x + beta * m))


def eager_reference(p, steps, H, lr, momentum, outer_lr, beta):
    """Eager updates (Kale et al. 2025) with p workers, in the paper's form: worker m keeps
    its own anchor and applies Dtilde_m^t = Delta_m^t / p + sum_{j != m} Delta_j^{t-1} / p
    (own fresh, the others' one round old). With outer SGD lr 1 and no momentum (the only
    case where the paper's per-worker optimizer and the consensus form coincide) each
    contribution is applied once. The consensus c (means only) is the evaluated model; the
    end flushes the last mean into it."""
    assert outer_lr == 1.0 and beta == 0.0
    workers, opts, params = workers_of(p, lr, momentum)
    c = [x.detach().clone() for x in params[0]]
    start = [[x.detach().clone() for x in params[i]] for i in range(p)]
    prev = None  # the deltas of the round before
    for step in range(steps):
        inner_step(step, workers, opts)
        if (step + 1) % H:
            continue
        with torch.no_grad():
            deltas = [[s - w for s, w in zip(start[i], params[i])] for i in range(p)]
            for i in range(p):
                others = [sum(prev[j][k] for j in range(p) if j != i) / p if prev else 0 for k in range(len(c))]
                start[i] = [a - d / p - o for a, d, o in zip(start[i], deltas[i], others)]
                for w, x in zip(params[i], start[i]):
                    w.copy_(x)
            if prev is not None:
                c = [x - sum(d[k] for d in prev) / p for k, x in enumerate(c)]
            prev = deltas
    c = [x - sum(d[k] for d in prev) / p for k, x in enumerate(c)]
    names = [n for n, _ in workers[0].named_parameters()]
    return [{k: v.detach() for k, v in w.state_dict().items()} for w in workers], dict(zip(names, c))


def eager_momentum_reference(p, steps, H, lr, momentum, outer_lr, beta):
    """The consensus form with Nesterov outer SGD: c takes each mean one round late with its
    own momentum m; rank i restarts from a Nesterov step of (c, copy of m) with Delta_i / p."""
    workers, opts, params = workers_of(p, lr, momentum)
    c = [x.detach().clone() for x in params[0]]
    mom = [torch.zeros_like(x) for x in c]
    start = [[x.detach().clone() for x in params[i]] for i in range(p)]
    in_flight = None
    for step in range(steps):
        inner_step(step, workers, opts)
        if (step + 1) % H:
            continue
        with torch.no_grad():
            if in_flight is not None:
                nesterov(c, mom, in_flight, outer_lr, beta)
            deltas = [[s - w for s, w in zip(start[i], params[i])] for i in range(p)]
            in_flight = [sum(d[k] for d in deltas) / p for k in range(len(c))]
            for i in range(p):
                trial_c, trial_m = [x.clone() for x in c], [m.clone() for m in mom]
                nesterov(trial_c, trial_m, [x / p for x in deltas[i]], outer_lr, beta)
                start[i] = trial_c
                for w, x in zip(params[i], trial_c):
                    w.copy_(x)
    with torch.no_grad():
        nesterov(c, mom, in_flight, outer_lr, beta)
    names = [n for n, _ in workers[0].named_parameters()]
    return [{k: v.detach() for k, v in w.state_dict().items()} for w in workers], dict(zip(names, c))


@pytest.mark.parametrize("p,outer_lr,beta", [(2, 0.7, 0.9), (3, 1.0, 0.0)])
def test_eager_equals_single_process_reference(tmp_path, p, outer_lr, beta):
    steps, H, lr, mom = 14, 3, 0.2, 0.5
    cfg = sync_cfg("co2", overlap="eager", local_steps=H, outer_lr=outer_lr, outer_momentum=beta,
                   nesterov=beta > 0)
    results = run_ranks(run_strategy, p, tmp_path, cfg, steps, lr, mom)
    ref, consensus = (eager_reference if beta == 0 else eager_momentum_reference)(p, steps, H, lr, mom, outer_lr, beta)
    for r in range(p):
        for k, v in ref[r].items():
            torch.testing.assert_close(results[r]["params"][k], v, rtol=1e-4, atol=1e-5)
    assert not all(torch.equal(results[0]["params"][k], results[1]["params"][k]) for k in ref[0])  # ranks differ
    # the evaluated model is the consensus after the last mean is flushed, identical on every rank
    for k, v in consensus.items():
        torch.testing.assert_close(results[0]["mean"][k], v, rtol=1e-4, atol=1e-5)
        assert torch.equal(results[0]["mean"][k], results[-1]["mean"][k])
    # every round's mean was sent, the last one included: 4 rounds of an fp32 ring all-reduce
    n = sum(x.numel() for x in make_model().parameters())
    assert results[0]["bytes"] == (steps // H) * collective_bytes("all_reduce", n, 4, p)


def fragment_of(name):
    """The strided split of the 2-block test GPT into 2 fragments, by hand."""
    if name.startswith("blocks."):
        return int(name.split(".")[1]) % 2
    return {"tok_emb.weight": 0, "pos_emb.weight": 1, "ln_f.weight": 0}[name]


def streaming_reference(p, steps, H, lr, momentum, outer_lr, beta, alpha, launch, consume, avg_momentum=False):
    """Streaming DiLoCo (Douillard et al. 2025, Alg. 1) with p workers: fragment j's pseudo-
    gradient is taken at step ``launch[j]`` of a round (1-based, mod H), its mean applied to
    its anchor at ``consume[j]``, and each worker merges alpha * own + (1 - alpha) * anchor.
    ``avg_momentum``: the workers' inner momentum buffers are averaged at each round's end."""
    workers, opts, params = workers_of(p, lr, momentum)
    names = [n for n, _ in workers[0].named_parameters()]
    frags = [[k for k, n in enumerate(names) if fragment_of(n) == j] for j in range(2)] if len(launch) == 2 \
        else [list(range(len(names)))]
    anchor = [x.detach().clone() for x in params[0]]
    mom = [torch.zeros_like(x) for x in anchor]
    pending = None
    for step in range(steps):
        inner_step(step, workers, opts)
        s = (step + 1) % H
        with torch.no_grad():
            for j in range(len(frags)):
                if launch[j] == s:
                    pending = (j, {k: sum(anchor[k] - params[i][k] for i in range(p)) / p for k in frags[j]})
                if consume[j] == s and pending is not None and pending[0] == j:
                    ks = frags[j]
                    a, m = [anchor[k] for k in ks], [mom[k] for k in ks]
                    nesterov(a, m, [pending[1][k] for k in ks], outer_lr, beta)
                    for i in range(p):
                        for k in ks:
                            params[i][k].copy_(alpha * params[i][k] + (1 - alpha) * anchor[k])
                    pending = None
            if avg_momentum and s == 0:
                for k in range(len(anchor)):
                    bufs = [opts[i].state[params[i][k]]["momentum_buffer"] for i in range(p)]
                    avg = sum(bufs) / p
                    for b in bufs:
                        b.copy_(avg)
    return [{k: v.detach() for k, v in w.state_dict().items()} for w in workers]


def test_streaming_fragments_equal_single_process_reference(tmp_path):
    """H=4, F=2, tau=1: fragment 0 is launched at step 1 of a round and merged at 2,
    fragment 1 launched at 3 and merged at 4 (= 0 mod H); merge alpha 0.5."""
    steps, H, lr, mom, outer_lr, beta, alpha = 14, 4, 0.2, 0.5, 0.8, 0.6, 0.5
    cfg = sync_cfg("local", local_steps=H, outer_lr=outer_lr, outer_momentum=beta, nesterov=True,
                   fragments=2, fragment_delay=1, fragment_alpha=alpha)
    results = run_ranks(run_strategy, 2, tmp_path, cfg, steps, lr, mom)
    ref = streaming_reference(2, steps, H, lr, mom, outer_lr, beta, alpha, launch=[1, 3], consume=[2, 0])
    for r in range(2):
        for k, v in ref[r].items():
            torch.testing.assert_close(results[r]["params"][k], v, rtol=1e-4, atol=1e-5)
    # a sync sends only its fragment: fragment 0 went at steps 1, 5, 9, 13, fragment 1 at 3, 7, 11
    sizes = [sum(x.numel() for k, x in make_model().named_parameters() if fragment_of(k) == j) for j in (0, 1)]
    assert results[0]["bytes"] == (4 * sizes[0] + 3 * sizes[1]) * 4  # fp32 ring all-reduce at p = 2: 4 B/element
    assert [m.get("fragment") for m in results[0]["metrics"][:4]] == [0, None, 1, None]


def test_local_averaging_inner_momentum_each_round_equals_reference(tmp_path):
    """sync.moment1_every=1 with inner SGD momentum: the momentum buffers are averaged after
    every outer step (DES-LOC's first-moment averaging, K_u = 1 round)."""
    steps, H, lr, mom = 12, 3, 0.2, 0.5
    cfg = sync_cfg("local", local_steps=H, outer_lr=0.7, outer_momentum=0.9, nesterov=True, moment1_every=1)
    results = run_ranks(run_strategy, 2, tmp_path, cfg, steps, lr, mom)
    ref = streaming_reference(2, steps, H, lr, mom, 0.7, 0.9, 0.0, launch=[0], consume=[0], avg_momentum=True)
    for r in range(2):
        for k, v in ref[r].items():
            torch.testing.assert_close(results[r]["params"][k], v, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(results[0]["momentum"], results[1]["momentum"]))
