"""State trees as JSON metadata plus raw tensors: what a healing replica receives over the
process group instead of a pickle (torchft's HTTP and PG transports unpickle; thinwire
never does). ``pack(tree)`` -> (schema, tensors); ``unpack(schema, tensors)`` inverts it.
Dict keys keep their type (optimizer state is keyed by int), tuples come back as lists.

A partial heal compares ``tensor_digests`` of two states with the same ``layout`` and sends
only the tensors that differ, as PCCL's shared-state sync fetches only the keys whose hash
differs (PrimeIntellect-ai/pccl, docs/md/3_CoreConcepts_and_Architecture.md).
"""
from __future__ import annotations

import hashlib
import json

import torch

DTYPES = {str(d): d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16,
                               torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool)}


def pack(tree) -> tuple[str, list[torch.Tensor]]:
    tensors: list[torch.Tensor] = []

    def enc(x):
        if torch.is_tensor(x):
            tensors.append(x.detach().contiguous().clone())
            return {"t": len(tensors) - 1, "dtype": str(x.dtype), "shape": list(x.shape)}
        if isinstance(x, dict):
            return {"d": [[k, enc(v)] for k, v in x.items()]}
        if isinstance(x, (list, tuple)):
            return {"l": [enc(v) for v in x]}
        if x is None or isinstance(x, (bool, int, float, str)):
            return {"v": x}
        raise TypeError(f"cannot pack {type(x).__name__}")

    return json.dumps(enc(tree)), tensors


def unpack(schema: str, tensors: list[torch.Tensor]):
    def dec(node):
        if "t" in node:
            return tensors[node["t"]]
        if "d" in node:
            return {k: dec(v) for k, v in node["d"]}
        if "l" in node:
            return [dec(v) for v in node["l"]]
        return node["v"]

    return dec(json.loads(schema))


def templates(schema: str) -> list[torch.Tensor]:
    """Empty tensors of the schema's dtypes and shapes, in order (the receive buffers)."""
    out = []

    def walk(node):
        if "t" in node:
            out.append((node["t"], torch.empty(node["shape"], dtype=DTYPES[node["dtype"]])))
        elif "d" in node:
            for _, v in node["d"]:
                walk(v)
        elif "l" in node:
            for v in node["l"]:
                walk(v)

    walk(json.loads(schema))
    return [t for _, t in sorted(out, key=lambda p: p[0])]


def digest(tensors: list[torch.Tensor], extra: str = "") -> str:
    """BLAKE2b (16 hex) of the tensors' dtypes, shapes and raw bytes, plus ``extra``."""
    h = hashlib.blake2b(extra.encode(), digest_size=8)
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(repr((str(t.dtype), tuple(t.shape))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def signed64(hexdigest: str) -> int:
    """A 64-bit hex digest as a signed int: an exact int64 element of a collective."""
    return int.from_bytes(bytes.fromhex(hexdigest), "big", signed=True)


def tensor_digests(tensors: list[torch.Tensor]) -> list[int]:
    """Each tensor's ``digest`` (dtype, shape, bytes) as ``signed64``."""
    return [signed64(digest([t])) for t in tensors]


def layout(schema: str) -> str:
    """The schema without its plain values (round counters, hyper-parameters): two states of
    one layout hold tensors of the same paths, dtypes and shapes in the same order."""
    def strip(node):
        if "d" in node:
            return {"d": [[k, strip(v)] for k, v in node["d"]]}
        if "l" in node:
            return {"l": [strip(v) for v in node["l"]]}
        return node if "t" in node else {"v": None}

    return json.dumps(strip(json.loads(schema)))
