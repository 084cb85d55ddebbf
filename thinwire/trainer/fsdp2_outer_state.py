"""The outer loop's per-rank state under ``engine=fsdp2`` (``sync=local|diloco|co2``), as
named local shards that Distributed Checkpoint can reshard.

``thinwire.comm.local.OuterStrategy.state_dict`` holds this rank's local shards as flat
vectors: the anchor and the outer optimizer's buffers (one per piece), the error-feedback
residuals (by piece name), each fragment's in-flight snapshot Delta_i and mean, the last
anchor step per fragment (CO2's staleness gap) and eager's start s_i (concatenations of
pieces). :func:`pieces` names every such slice ``"<kind>/<parameter name>"`` with the
parameter it belongs to, so ``fsdp2_shards.as_dtensors`` can place it like that parameter and
a resume under another island size reads it back by global offsets; :func:`restore` is the
inverse on the resuming rank's own local shards. Everything else in the state (round, skip
and clip counters, the outer optimizer's step counts and hyperparameters) is the same on
every rank and comes from a rank file as saved. Residuals belong to a replica's own data:
with another replica count they are reset (``keep_feedback=False``), as are two-phase
owners' server-side residuals (sized by the old layout) in every case.
"""
from __future__ import annotations

import torch


def _concat_kinds(state: dict, fragments: list[list[int]]) -> dict:
    """``kind -> (flat vector, piece indices)`` of the concatenated vectors in ``state``."""
    out = {}
    for j, (snapshot, mean) in state["flights"].items():
        out[f"snapshot{j}"], out[f"mean{j}"] = (snapshot, fragments[j]), (mean, fragments[j])
    for j, steps in state["last_step"].items():
        out[f"last{j}"] = (torch.cat([x.reshape(-1) for x in steps]), fragments[j])
    if state["start"] is not None:
        out["start"] = (state["start"], list(range(sum(len(f) for f in fragments))))
    return out


def pieces(state: dict, names: list[str], sizes: list[int], fragments: list[list[int]]) -> dict:
    """``{"<kind>/<name>": (name, flat local shard)}`` of every per-piece tensor in ``state``
    (module doc); ``names``/``sizes``/``fragments``: the strategy's space and round."""
    out = {f"anchor/{n}": (n, a.reshape(-1)) for n, a in zip(names, state["anchor"])}
    for i, st in state["outer"]["optimizer"]["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0 and v.numel() == sizes[i]:
                out[f"outer:{k}/{names[i]}"] = (names[i], v.reshape(-1))
    size = dict(zip(names, sizes))
    for n, bufs in state["averager"].get("feedback", {}).items():
        for b, t in bufs.items():  # buffers not shaped like the piece (none of thinwire's rules) are reset
            if t.numel() == size[n]:
                out[f"feedback:{b}/{n}"] = (n, t.reshape(-1))
    for kind, (flat, idx) in _concat_kinds(state, fragments).items():
        for i, x in zip(idx, flat.split([sizes[i] for i in idx])):
            out[f"{kind}/{names[i]}"] = (names[i], x)
    return out


def restore(saved: dict, loaded: dict, names: list[str], fragments: list[list[int]], keep_feedback: bool) -> dict:
    """A state for ``OuterStrategy.load_state_dict`` on this rank's local shards: the tensors of
    ``loaded`` (``{"<kind>/<name>": flat}``, resharded) in the structure of ``saved`` (a rank
    file's state, any layout)."""
    optimizer = saved["outer"]["optimizer"]
    state = {i: {k: loaded.get(f"outer:{k}/{names[i]}", v) for k, v in st.items()}
             for i, st in optimizer["state"].items()}
    feedback: dict = {}
    for key, t in loaded.items():
        kind, name = key.split("/", 1)
        if kind.startswith("feedback:") and keep_feedback:
            feedback.setdefault(name, {})[kind.split(":", 1)[1]] = t
    averager = {"feedback": feedback, "server_errors": {}} if "feedback" in saved["averager"] else {}

    def cat(kind: str, idx: list[int]) -> torch.Tensor:
        return torch.cat([loaded[f"{kind}/{names[i]}"] for i in idx])

    def split(kind: str, idx: list[int]) -> list[torch.Tensor]:
        return [loaded[f"{kind}/{names[i]}"] for i in idx]

    everything = list(range(len(names)))
    return {**saved, "anchor": split("anchor", everything),
            "outer": {**saved["outer"], "optimizer": {**optimizer, "state": state}}, "averager": averager,
            "flights": {j: (cat(f"snapshot{j}", fragments[j]), cat(f"mean{j}", fragments[j]))
                        for j in saved["flights"]},
            "last_step": {j: split(f"last{j}", fragments[j]) for j in saved["last_step"]},
            "start": None if saved["start"] is None else cat("start", everything)}
