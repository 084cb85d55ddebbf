"""The fused compress passes (``thinwire.comm.compressors.fused``) against the eager
compressors and error feedback they replace. Here uncompiled (the same functions that
``torch.compile`` receives: compiling takes tens of seconds on the CPU); the GPU tier
(tests/test_gpu.py) checks the compiled ones on CUDA."""
from __future__ import annotations

import pytest
import torch

from thinwire.comm.compressors import build_compressor, fused
from thinwire.comm.feedback import build_feedback

BLOCK = 256


def data(n=8 * BLOCK):
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(n, generator=g), torch.randn(n, generator=g) * 0.1
    x[:BLOCK] = 0.0  # an all-zero block: scale 0, codes 0
    x[BLOCK] = -0.0  # sign(-0) = +1, as the eager packer's x >= 0
    return x, e


@pytest.mark.parametrize("name,key", [("int8", "codes"), ("sign1", "signs")])
def test_fused_codec_equals_the_eager_compressor(name, key):
    x, _ = data()
    comp = build_compressor(name, block_size=BLOCK)
    payload = comp.compress(x, step=1)
    encode, decode = fused.CODECS[name]
    codes, scales = encode(x, BLOCK)
    assert torch.equal(codes, payload.tensors[key])
    torch.testing.assert_close(scales, payload.tensors["scales"], rtol=1e-6, atol=0)
    torch.testing.assert_close(decode(codes, scales, BLOCK), comp.decompress(payload), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["int8", "sign1"])
def test_fused_ef_pass_equals_classic_error_feedback(name):
    g, e = data()
    comp, fb = build_compressor(name, block_size=BLOCK), build_feedback("ef")
    fb.store["w"] = {"e": e.clone()}
    q = fb.message("w", g)
    local = comp.decompress(comp.compress(q, step=1))
    _, staged = fb.result("w", g, q, local, local)
    codes, scales, e_new = fused.ef_pass(name, g, e, BLOCK)
    torch.testing.assert_close(e_new, staged["e"], rtol=0, atol=1e-6)
    torch.testing.assert_close(fused.CODECS[name][1](codes, scales, BLOCK), local, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["int8", "sign1"])
def test_compile_option_routes_whole_blocks_through_the_fused_codec(monkeypatch, name):
    """``comm.compile=true``: lengths that are a multiple of the block take the fused codec
    (here its uncompiled functions), a ragged length the eager path; both give the eager result."""
    calls = []

    def spy(which, device=None):
        encode, decode = fused.CODECS[which]
        return (lambda *a: calls.append("enc") or encode(*a), lambda *a: calls.append("dec") or decode(*a), None)
    monkeypatch.setattr(fused, "codec", spy)
    eager, comp = build_compressor(name, block_size=BLOCK), build_compressor(name, block_size=BLOCK, compile=True)
    for n in (4 * BLOCK, 4 * BLOCK + 8):
        x = data(n)[0]
        out = comp.decompress(comp.compress(x, step=1))
        torch.testing.assert_close(out, eager.decompress(eager.compress(x, step=1)), rtol=1e-6, atol=0)
    assert calls == ["enc", "dec"]


def test_compile_option_is_checked():
    with pytest.raises(ValueError, match="int8: compile='yes' must be true or false"):
        build_compressor("int8", compile="yes")


def test_compile_on_cuda_without_triton_is_a_one_line_config_error(monkeypatch):
    """No CUDA needed: the codec is chosen by device type before any kernel runs."""
    import sys

    from thinwire.errors import ConfigError

    monkeypatch.setitem(sys.modules, "thinwire.comm.compressors.fused_triton", None)  # import fails
    with pytest.raises(ConfigError, match="comm.compile=true needs triton"):
        fused.codec("int8", torch.device("cuda"))
