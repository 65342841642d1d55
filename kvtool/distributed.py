"""Sharded tracing on torch.distributed: `torchrun --nproc-per-node N -m kvtool profile ...`.

Every rank loads the model and builds the same list of samples (they are deterministic in the seed), traces samples
rank, rank + N, rank + 2N, ..., and the ranks all-reduce their statistics field by field with each accumulator's
own merge rule (kvtool.stats: sums, min, max). That is the algebra `kvtool merge` uses, so the result equals the
single-process trace of all samples (exactly for counts, histograms, min and max; float64 sums up to summation
order). Rank 0 writes the profile; its calibration record says `world_size`.

Backend: gloo when the model is on the CPU, nccl on CUDA (each rank on cuda:LOCAL_RANK). Outside torchrun (no
WORLD_SIZE, or WORLD_SIZE 1) nothing here does anything.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import fields

import torch

from kvtool.errors import KvtoolError


def env_world_size() -> int:
    """The number of processes torchrun started (1 outside torchrun)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise KvtoolError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not a whole number") from None


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_device(device: str) -> str:
    """`cuda` under torchrun means this rank's GPU, cuda:LOCAL_RANK."""
    if env_world_size() > 1 and device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def rank_gpus() -> list[int]:
    """The GPUs of this rank when each rank splits its copy of the model with --device-map: the node's GPUs cut
    into LOCAL_WORLD_SIZE equal consecutive groups (8 GPUs, 2 ranks per node: rank 0 takes 0-3, rank 1 takes 4-7).
    Empty without CUDA."""
    if not torch.cuda.is_available():
        return []
    n, local = torch.cuda.device_count(), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    per = n // max(local, 1)
    if per == 0:
        raise KvtoolError(f"{local} ranks on this node but {n} GPUs: give --nproc-per-node at most {n}")
    first = int(os.environ.get("LOCAL_RANK", "0")) * per
    return list(range(first, first + per))


def rank_placement(placement: tuple) -> tuple:
    """(device_map, max_memory) for this rank: outside torchrun as given; under torchrun with a device map, the
    memory caps limited to this rank's GPUs (rank_gpus; a GPU's whole memory unless --max-memory says otherwise)
    and this node's CPU memory shared by its ranks. An explicit {module: device} map is used as written."""
    device_map, max_memory = placement
    if device_map is None or env_world_size() <= 1 or isinstance(device_map, dict):
        return placement
    gpus = rank_gpus()
    local = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    caps = {}
    for g in gpus:
        caps[g] = (max_memory or {}).get(g, torch.cuda.get_device_properties(g).total_memory)
    if max_memory and "cpu" in max_memory:
        caps["cpu"] = max_memory["cpu"]
    else:
        import psutil

        caps["cpu"] = psutil.virtual_memory().available // local
    return device_map, caps


def init(device: str = "cpu", device_map=None) -> bool:
    """Join torchrun's process group when WORLD_SIZE > 1 — gloo on the CPU, nccl on CUDA (the rank's GPU, or with
    a device map the first of its GPUs) — and return True when joined."""
    if env_world_size() <= 1:
        return False
    import torch.distributed as dist

    if not dist.is_available():
        raise KvtoolError("this torch build has no torch.distributed; run kvtool in one process")
    if not dist.is_initialized():
        gpus = rank_gpus() if device_map is not None else []
        cuda = str(device).startswith("cuda") or bool(gpus)
        if cuda:
            torch.cuda.set_device(gpus[0] if gpus else torch.device(local_device("cuda")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return active()


def finish() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class Shard(Sequence):
    """Samples rank, rank + world, ... of `samples` (a list or a kvtool.data.SampleStream; lengths stay readable
    without building a sample)."""

    def __init__(self, samples, rank_: int, world: int):
        self.samples, self.index = samples, list(range(rank_, len(samples), world))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        return self.samples[self.index[i]]

    def __iter__(self):
        for j in self.index:
            yield self.samples[j]


def shard(samples):
    """This rank's share of `samples` (all of them outside a process group)."""
    return Shard(samples, rank(), world_size()) if active() else samples


def all_reduce_stats(stats, device) -> None:
    """All-reduce every accumulator of a kvtool.trace.TraceStats in place, by its merge rule (sum / min / max)."""
    import torch.distributed as dist

    if not active():
        return
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    for acc in stats.acc.values():
        for f in fields(acc):
            t = getattr(acc, f.name)
            buf = t.to(device).contiguous()
            dist.all_reduce(buf, op=ops[acc.rules.get(f.name, "sum")])
            setattr(acc, f.name, buf.to(t.device))


def max_over_ranks(value: float, device) -> float:
    """The largest `value` over ranks (wall time of the slowest rank)."""
    import torch.distributed as dist

    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def trace(model, config, samples, on_sample=None):
    """kvtool.trace.Tracer over this rank's shard of `samples`, statistics all-reduced over the ranks."""
    from kvtool.trace import Tracer

    stats = Tracer(model, config).run(shard(samples), on_sample=on_sample)
    all_reduce_stats(stats, _collective_device(model))
    return stats


def _collective_device(model) -> torch.device:
    """Where the all-reduce buffers live: the rank's GPU for nccl, the CPU for gloo."""
    import torch.distributed as dist

    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
