"""``optim=mtdao`` (thinwire/optim/mtdao.py): the quasi-hyperbolic Adam step of MT-DAO
(arXiv 2510.05361) against torch's AdamW and against the QHAdam formula unrolled by hand."""
import pytest
import torch

from thinwire.errors import ConfigError
from thinwire.optim.mtdao import MTDAOOptions, QHAdamW


def grads(steps, shape=(5, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(steps)]


def run(opt_cls, gs, **kw):
    p = torch.nn.Parameter(torch.linspace(-1, 1, gs[0].numel(), dtype=torch.float64).view_as(gs[0]))
    opt = opt_cls([p], **kw)
    for g in gs:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt


def test_omega_one_with_beta_slow_equal_beta1_is_torch_adamw():
    gs = grads(12)
    ours, _ = run(QHAdamW, gs, lr=0.01, beta_slow=0.9, beta2=0.95, omega=1.0, eps=1e-8, weight_decay=0.1)
    ref, _ = run(torch.optim.AdamW, gs, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_update_is_the_unrolled_qhadam_formula():
    """u_t = (1 - b) sum_k b^(t-k) g_k (the EMA written as a sum), the same for v; the step
    mixes omega u_t / (1 - b^t) with (1 - omega) g_t over sqrt(v_t / (1 - b2^t)) + eps."""
    gs, lr, b, b2, w, eps, wd = grads(9, seed=3), 0.02, 0.99, 0.95, 0.6, 1e-8, 0.05
    ours, opt = run(QHAdamW, gs, lr=lr, beta_slow=b, beta2=b2, omega=w, eps=eps, weight_decay=wd)
    p = torch.linspace(-1, 1, gs[0].numel(), dtype=torch.float64).view_as(gs[0])
    for t in range(1, len(gs) + 1):
        u = (1 - b) * sum(b ** (t - k) * gs[k - 1] for k in range(1, t + 1))
        v = (1 - b2) * sum(b2 ** (t - k) * gs[k - 1] ** 2 for k in range(1, t + 1))
        p = p * (1 - lr * wd) - lr * (w * u / (1 - b ** t) + (1 - w) * gs[t - 1]) / ((v / (1 - b2 ** t)).sqrt() + eps)
    torch.testing.assert_close(ours, p, rtol=1e-12, atol=1e-12)
    st = next(iter(opt.state.values()))
    assert set(st) == {"step", "exp_avg", "exp_avg_sq"}  # AdamW's keys: moment averaging and checkpoints


@pytest.mark.parametrize("key,value", [("omega", 1.5), ("beta_slow", 1.0), ("beta2", -0.1), ("eps", 0.0)])
def test_bad_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        MTDAOOptions(**{key: value}).check()
