"""Runs one docs/examples/library/ example at the ranks torchrun started, as a user script
would (the example's function, ``dist.destroy_process_group()``, a normal return), for
tools/exit_abort_drill.py. Run: ``torchrun --nproc-per-node 2 tools/exit_abort_example.py NAME``."""
import os
import sys
import tempfile

import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "docs", "examples", "library"))


def run(name: str) -> None:
    if name == "plain_loop":
        import plain_loop
        plain_loop.main()
    elif name == "ddp_hook":
        import ddp_hook
        with tempfile.TemporaryDirectory() as tmp:
            ddp_hook.train(8, tmp)
            dist.barrier()
    elif name == "local_sgd":
        import local_sgd
        local_sgd.train(8, "co2", comm={"name": "topk", "ratio": 0.05, "feedback": "ef"}, local_steps=4)
    elif name == "accelerate_loop":
        import accelerate_loop
        accelerate_loop.train(8)
    elif name == "mezo":
        import mezo
        mezo.train(6)
    elif name == "lora_ga":
        import lora_ga
        lora_ga.build()
    elif name == "lightning_fit":
        import lightning_fit
        from thinwire.integrations.lightning import ThinwireCommHook
        lightning_fit.fit(ThinwireCommHook("topk", ratio=0.05, feedback="ef"), devices=2, steps=8)
    else:
        raise SystemExit(f"unknown example {name!r}")


if __name__ == "__main__":
    if sys.argv[1] != "lightning_fit" and not dist.is_initialized():
        dist.init_process_group("gloo")
    run(sys.argv[1])
    if dist.is_initialized():
        dist.destroy_process_group()
