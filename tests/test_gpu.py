"""The GPU tier (``pytest -m gpu``): the CUDA and NCCL paths, skipped cleanly without CUDA.

One GPU cannot hold two NCCL ranks (NCCL refuses two ranks on one device), so the tier is:

- **NCCL, world size 1, in this process**: one NCCL default group (``init_world("nccl")``,
  the workers' own code path: ``device = cuda:LOCAL_RANK``) serves every comm x sync x optim
  mode of :data:`MODES` for 3 steps through ``thinwire.trainer.loop.train`` (no launch per
  mode). At world size 1 the collectives still run on NCCL (a group of one), the comm hook,
  the averager's async all-reduce, CO2's side stream and the ZeRO replica groups included.
- **2 ranks over gloo on CUDA tensors**, where NCCL cannot: the same trainer with
  ``World.device = cuda:0`` on both ranks (gloo moves CUDA tensors itself), for the modes
  whose exchange is multi-rank math (two-phase, sparse all-gather, contributors' mean,
  DeMo's gather, CO2), against the same 2-rank run on the CPU: the losses agree to float
  tolerance (an independent reference: different kernels, the same algebra).
- CO2's side stream, checked with ``torch.cuda`` streams (the compute stream is not held
  back by a collective in flight; the consumer waits for it), the ``_layer_squares``
  question (NCCL refuses CPU tensors), and a bitwise resume on the GPU.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

# cuBLAS is deterministic only with a fixed workspace, set before its first use (the bitwise resume)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the GPU tier)")]

TINY = ("experiment=tiny", "logger=none", "trainer.max_steps=3", "trainer.eval_every=3",
        "trainer.checkpoint_every=3", "trainer.sample_chars=0", "data.eval_batches=2", "dist.nproc=1")

LOSSY = ("bf16", "fp16", "int8", "sign1", "topk", "chunk_topk", "randk", "ternary", "dynamic8")

# every comm x sync x optim mode the trainer offers, each for 3 steps
MODES: dict[str, tuple[str, ...]] = {
    "ddp": (),
    **{f"ddp-{c}": (f"comm={c}",) for c in LOSSY},
    "ddp-int8-ef": ("comm=int8", "comm.feedback=ef"),
    "ddp-sign1-ef21-allgather": ("comm=sign1", "comm.feedback=ef21", "comm.collective=allgather"),
    "ddp-topk-econtrol": ("comm=topk", "comm.feedback=econtrol"),
    "ddp-topk-ef21m-sgd": ("comm=topk", "comm.feedback=ef21m", "optim=sgd", "optim.momentum=0"),
    "ddp-topk-dgc-sgd": ("comm=topk", "comm.feedback=dgc", "optim=sgd", "optim.momentum=0"),
    "ddp-sgd": ("optim=sgd",),
    "local": ("sync=local", "sync.local_steps=2"),
    "local-int8": ("sync=local", "sync.local_steps=2", "comm=int8"),
    "diloco": ("sync=diloco", "sync.local_steps=2"),
    "sparseloco": ("experiment=sparseloco", "sync.local_steps=2"),
    "streaming": ("sync=local", "sync.local_steps=2", "sync.fragments=2"),
    "moments": ("sync=local", "sync.local_steps=1", "sync.moment1_every=1", "sync.moment2_every=1"),
    "co2": ("sync=co2", "sync.local_steps=1"),
    "co2-sign1": ("sync=co2", "sync.local_steps=1", "comm=sign1"),
    "co2-eager": ("sync=co2", "sync.local_steps=1", "sync.overlap=eager"),
    "demo": ("optim=demo",),
    "distro": ("optim=distro",),
    "adam1bit": ("optim=adam1bit", "optim.freeze_step=2"),
    "adam1bit-int8": ("optim=adam1bit", "optim.freeze_step=2", "optim.compressor=int8"),
    "mezo": ("optim=mezo",),
    "zo_dist": ("optim=zo_dist",),
    "wsd": ("optim.schedule=wsd", "optim.warmup_steps=1", "optim.decay_start=2"),
}
DEEPSPEED_MODES: dict[str, tuple[str, ...]] = {
    "zero1": ("engine=deepspeed", "engine.deepspeed.zero_optimization.stage=1"),
    "zero2": ("engine=deepspeed",),
}
# the modes whose exchange is multi-rank math: 2 ranks over gloo on CUDA tensors vs the CPU
TWO_RANK_MODES = ("ddp", "ddp-int8-ef", "ddp-sign1", "ddp-topk", "ddp-chunk_topk", "local-int8",
                  "sparseloco", "co2", "co2-eager", "demo", "distro", "adam1bit", "zo_dist")


def _have_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:  # noqa: BLE001 - an import that fails for any reason: the modes skip
        return False
    return True


@pytest.fixture(scope="module")
def nccl_world():
    import torch.distributed as dist

    from thinwire.trainer.world import free_port, init_world

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WANDB_MODE="disabled")
    world = init_world("nccl", timeout_s=120.0)
    assert world.backend == "nccl" and world.device == torch.device("cuda", 0)
    yield world
    dist.destroy_process_group()


def train_here(world, tmp_path, *overrides):
    from thinwire.config import compose, validate
    from thinwire.trainer.loop import train

    cfg = compose([*TINY, *overrides, f"hydra.run.dir={tmp_path}"])
    validate(cfg)
    os.makedirs(cfg.run_dir, exist_ok=True)
    return train(cfg, world)


@pytest.mark.parametrize("mode", list(MODES) + list(DEEPSPEED_MODES))
def test_every_mode_runs_on_nccl(nccl_world, tmp_path, mode):
    if mode in DEEPSPEED_MODES and not _have_deepspeed():
        pytest.skip("deepspeed is not installed")
    record = train_here(nccl_world, tmp_path, *{**MODES, **DEEPSPEED_MODES}[mode])
    assert record["step"] == 3
    assert torch.isfinite(torch.tensor(record["val_loss"])), record
    assert all(torch.isfinite(v.float()).all() for v in saved_model(tmp_path, 3).values())


def saved_model(run_dir, step):
    """The model of rank 0's checkpoint at ``step`` (in its shard when ranks differ, else common)."""
    path = run_dir / "checkpoints" / f"step_{step:08d}"
    shard = torch.load(path / "rank00000.pt", weights_only=False)
    return shard["model"] if "model" in shard else torch.load(path / "common.pt", weights_only=False)["model"]


def test_nccl_refuses_cpu_tensors_so_layer_squares_lives_on_the_device(nccl_world):
    """The question the ZeRO replica groups' norm raised: NCCL cannot reduce a CPU tensor,
    so ``zero_replicas._layer_squares`` sums on the pieces' device."""
    import torch.distributed as dist

    from thinwire.comm.accounting import WireMeter
    from thinwire.trainer import zero_replicas

    with pytest.raises(Exception):
        dist.all_reduce(torch.zeros(2, dtype=torch.float64))
    shards = zero_replicas.ZeroShards.__new__(zero_replicas.ZeroShards)  # only what the norms read
    shards.meter, shards.n_layers, shards.layer_of = WireMeter(), 2, [0, 1, 1]
    shards.groups = type("G", (), {"zero_group": dist.group.WORLD})()
    pieces = [torch.full((3,), 2.0, device="cuda"), torch.ones(2, device="cuda"), torch.ones(1, device="cuda")]
    assert shards.global_norm(pieces) == pytest.approx((12.0 + 3.0) ** 0.5)
    assert shards.layer_norms(pieces) == pytest.approx([12.0 ** 0.5, 3.0 ** 0.5, 3.0 ** 0.5])


RESUME_CASES = {"ddp-int8-ef": ("comm=int8", "comm.feedback=ef"),
                "local-int8-ef": ("sync=local", "sync.local_steps=2", "comm=int8"),
                "co2-sign1": ("sync=co2", "sync.local_steps=2", "comm=sign1"),
                "adam1bit": ("optim=adam1bit", "optim.freeze_step=2")}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_on_the_gpu_is_bitwise(nccl_world, tmp_path, case):
    """With torch's deterministic algorithms (the embedding's backward otherwise adds with
    atomics, in no fixed order), a run stopped at step 3 and resumed equals the uninterrupted
    one; the per-rank state read back from the CPU (error feedback, server errors, the outer
    round in flight) lands on the GPU."""
    args = ("trainer.max_steps=6", "trainer.checkpoint_every=3", *RESUME_CASES[case])
    torch.use_deterministic_algorithms(True)
    try:
        full = train_here(nccl_world, tmp_path / "full", *args)
        train_here(nccl_world, tmp_path / "split", *args, "trainer.stop_after=3")
        split = train_here(nccl_world, tmp_path / "split", *args, "trainer.resume=auto")
    finally:
        torch.use_deterministic_algorithms(False)
    assert full["loss"] == split["loss"] and full["val_loss"] == split["val_loss"]
    a, b = saved_model(tmp_path / "full", 6), saved_model(tmp_path / "split", 6)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_co2_collective_in_flight_does_not_hold_back_the_compute_stream(nccl_world):
    """CO2 launches round t's all-reduce from its side stream: the next round's compute (on
    the compute stream) finishes while the side stream is still busy (a slow link, simulated
    by a sleep kernel queued on the side stream before the collective), and the consumer of
    the mean waits for it. Timed with CUDA events on both streams, after one warm-up round:
    a first round allocates, and ``cudaMalloc`` can block the host until the device is idle,
    which serialises the streams whatever their dependencies (seen here on an H200)."""
    from thinwire.comm.accounting import WireMeter
    from thinwire.comm.outer import CO2
    from thinwire.config import compose

    model = torch.nn.Linear(256, 256, device="cuda")
    strategy = CO2(compose(["sync=co2", "sync.local_steps=1"]).sync, nccl_world, WireMeter(), model)
    launch, x0 = strategy.launch, torch.randn(1024, 1024, device="cuda") / 32
    side_done = torch.cuda.Event(enable_timing=True)

    def slow_link(delta):                        # runs on the side stream, inside CO2's launch
        torch.cuda._sleep(400_000_000)           # ~0.2 s of GPU clock, no SM contention
        side_done.record()
        return launch(delta)

    def compute():                               # a round of compute, on the compute stream
        x = x0
        for _ in range(8):
            x = torch.tanh(x @ x)
        with torch.no_grad():
            model.weight.add_(x[:256, :256])
    strategy.launch = slow_link
    for step in range(2):                        # warm-up: round 0 launched, consumed at 1
        compute()
        strategy.after_step(step)
    torch.cuda.synchronize()
    start, compute_done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    compute()
    strategy.after_step(2)                       # consumes round 1's mean, launches round 2's
    compute()                                    # round 3's compute, round 2's mean in flight
    compute_done.record()
    strategy.launch = launch
    strategy.after_step(3)                       # consumes round 2's mean
    torch.cuda.synchronize()
    compute_ms, side_ms = start.elapsed_time(compute_done), start.elapsed_time(side_done)
    assert compute_ms < side_ms / 2, f"compute ended at {compute_ms:.2f} ms, the side stream at {side_ms:.2f} ms"
    assert strategy.round == 4


def _train_modes(rank, world_size, cfg_yamls, cwd, device):
    """One rank of a 2-rank gloo job with its tensors on ``device``: every config of
    ``cfg_yamls`` in turn (one spawn for all modes); {mode: the run's last record}."""
    import torch.distributed as dist

    from thinwire.config import from_yaml
    from thinwire.trainer.loop import train
    from thinwire.trainer.world import current_world

    if device == "cuda":
        torch.cuda.set_device(0)
    world = current_world(torch.device(device, 0) if device == "cuda" else torch.device(device), timeout_s=120.0)
    os.chdir(cwd)
    records = {}
    for mode, cfg_yaml in cfg_yamls.items():
        records[mode] = train(from_yaml(cfg_yaml), world)
        dist.barrier()
    return records


@pytest.fixture(scope="module")
def two_rank_records(tmp_path_factory):
    """{device: {mode: rank 0's last record}} of :data:`TWO_RANK_MODES` on 2 gloo ranks."""
    from conftest import run_fresh_ranks

    from thinwire.config import compose, to_yaml, validate

    tmp = tmp_path_factory.mktemp("two_ranks")
    out = {}
    for device in ("cuda", "cpu"):
        cfgs = {}
        for mode in TWO_RANK_MODES:
            cfg = compose([*TINY, "dist.nproc=2", *MODES[mode], f"hydra.run.dir={tmp / device / mode}"])
            validate(cfg)
            os.makedirs(cfg.run_dir, exist_ok=True)
            cfgs[mode] = to_yaml(cfg)
        os.makedirs(tmp / f"out_{device}")
        out[device] = run_fresh_ranks(_train_modes, 2, tmp / f"out_{device}", cfgs, str(tmp), device)[0]
    return out


@pytest.mark.parametrize("mode", TWO_RANK_MODES)
def test_two_ranks_over_gloo_on_cuda_tensors_match_the_cpu(two_rank_records, mode):
    gpu, cpu = two_rank_records["cuda"][mode], two_rank_records["cpu"][mode]
    assert gpu["step"] == cpu["step"] == 3
    assert gpu["val_loss"] == pytest.approx(cpu["val_loss"], rel=2e-3), (mode, gpu, cpu)
    assert gpu["wire_bytes"] == cpu["wire_bytes"], json.dumps([gpu, cpu])


@pytest.mark.parametrize("name,key", [("int8", "codes"), ("sign1", "signs")])
def test_compiled_codecs_on_cuda_agree_with_the_eager_ones(name, key):
    """``comm.compile=true`` on CUDA (the Triton kernels of ``fused_triton``), and the same
    math through ``torch.compile`` (Inductor), against the eager kernels. Not bitwise:
    Inductor's reciprocal can differ from the eager one by an ulp, which moves a value that
    sits on a rounding boundary to the neighbouring int8 code (1 in 10^6 seen on an H200);
    each result meets the quantiser's bound |x - x'| <= s / 2."""
    from thinwire.comm.compressors import build_compressor, fused

    g = torch.Generator(device="cuda").manual_seed(0)
    x, e = torch.randn(1 << 20, device="cuda", generator=g), torch.randn(1 << 20, device="cuda", generator=g)
    x[:2048] = 0.0                                   # a zero block: scale 0
    eager, comp = build_compressor(name), build_compressor(name, compile=True)
    a, b = eager.compress(x, step=1), comp.compress(x, step=1)
    differ = a.tensors[key] != b.tensors[key]
    assert differ.float().mean().item() <= 1e-5, f"{name}: {differ.float().mean().item():.2e} of the codes differ"
    if name == "int8":
        assert (a.tensors[key].int() - b.tensors[key].int()).abs().max().item() <= 1
    torch.testing.assert_close(b.tensors["scales"], a.tensors["scales"], rtol=1e-6, atol=0)
    out = comp.decompress(b)
    s = b.tensors["scales"].repeat_interleave(2048)
    bound = s / 2 if name == "int8" else (x.abs() + s)  # sign: |x - s sign(x)| <= |x| + s
    assert ((x - out).abs() <= bound * (1 + 1e-5) + 1e-7).all()
    for encode, decode, ef_pass in (fused.codec(name, x.device), fused.compiled(name)):
        codes, scales, e_new = ef_pass(x, e, 2048)
        ref_codes, ref_scales = encode(x + e, 2048)
        assert (codes != ref_codes).float().mean().item() <= 1e-5
        torch.testing.assert_close(e_new, (x + e) - decode(codes, scales, 2048), rtol=1e-5, atol=1e-6)
