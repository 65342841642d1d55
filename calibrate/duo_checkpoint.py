"""DuoAttention's training checkpoints (calibrate.duo; arXiv 2410.10819 trains its gates for hours, so a run must
survive being stopped): one safetensors file, never a pickle, written atomically, read back only when every field is
present and of the right type, shape and range, and only by a run with the same settings (`fingerprint`)."""

from __future__ import annotations

from dataclasses import asdict

import torch

from kvtool.errors import KvtoolError

RUN_CONTROL = ("checkpoint", "resume", "stop_after")    # how a run is driven, not what it computes
FORMAT = "2"                                            # 1 was a torch.save pickle; never read


def check_path(duo) -> None:
    """A checkpoint path that cannot be written fails now, not after the first `checkpoint_every` steps."""
    import os

    path = os.path.abspath(duo.checkpoint)
    if os.path.isdir(path):
        raise KvtoolError(f"--checkpoint {duo.checkpoint} is a directory; give a file name")
    if not os.path.isdir(os.path.dirname(path)):
        raise KvtoolError(f"--checkpoint {duo.checkpoint}: directory {os.path.dirname(path)} does not exist")


def fingerprint(duo) -> dict:
    """The settings a checkpoint must share with the run that resumes it."""
    out = {k: v for k, v in asdict(duo).items() if k not in RUN_CONTROL + ("checkpoint_every",)}
    if out["data"] == "passkey":
        del out["data"]                  # checkpoints from before `data` existed stay resumable
    if out["student"] == "all":
        del out["student"]               # nor `student`
    if out["reuse"] == 1:
        del out["reuse"]                 # nor `reuse`
    if not out["average"]:
        del out["average"]               # nor `average`
    return out

def save(duo, gates, opt, step: int, history: list, total: torch.Tensor, pull: torch.Tensor) -> None:
    """A safetensors file (no pickle): gates, AdamW's per-gate state, the loss history, the summed pull (the loss's
    own gradient, heads.duo.pull) and (when averaging) the sum of the averaged iterates as tensors; step and settings
    as JSON metadata. Written atomically."""
    import json

    from safetensors.torch import save

    from kvtool.fileio import atomic_write, write_bytes

    state = opt.state_dict()["state"].get(0, {})
    tensors = {"gates": gates.detach().clone().contiguous(),
               "history": torch.tensor(history, dtype=torch.float64).reshape(-1, 2),
               "pull_sum": pull.detach().clone().contiguous()}
    if duo.average:
        tensors["average_sum"] = total.detach().clone().contiguous()
    for key, value in state.items():
        tensors[f"optimizer.{key}"] = torch.as_tensor(value).detach().clone().contiguous()
    meta = {"kvtool.duo_checkpoint": FORMAT, "step": json.dumps(step),
            "config": json.dumps(fingerprint(duo))}
    atomic_write(duo.checkpoint, lambda tmp: write_bytes(save(tensors, metadata=meta))(tmp))

def load(duo, gates, opt, total: torch.Tensor, pull: torch.Tensor) -> tuple[int, list]:
    """Read and validate a checkpoint written by `_save`. Never unpickles anything: a file that is not a
    safetensors duo checkpoint with every field present and of the right type, shape and range is refused."""
    import json
    import os

    from safetensors import safe_open

    path = duo.checkpoint
    where = f"checkpoint {path}"
    if not os.path.exists(path):
        raise KvtoolError(f"{where} does not exist")
    if not os.path.isfile(path):
        raise KvtoolError(f"{where} is not a file")
    try:
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k).clone() for k in fh.keys()}
    except Exception:
        raise KvtoolError(f"{where} is not a kvtool duo checkpoint (a safetensors file; checkpoints of older "
                          "kvtool versions, pickles, are not read): start without --resume") from None
    if meta.get("kvtool.duo_checkpoint") != FORMAT:
        raise KvtoolError(f"{where} is not a kvtool duo checkpoint (format {FORMAT})")
    try:
        step = json.loads(meta["step"])
        config = json.loads(meta["config"])
    except KeyError as exc:
        raise KvtoolError(f"{where}: field {exc.args[0]!r} is missing") from None
    except (ValueError, RecursionError):
        raise KvtoolError(f"{where}: step or config is not valid JSON") from None
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= duo.steps:
        raise KvtoolError(f"{where}: step must be an integer in [0, {duo.steps}] (got {step!r})")
    if config != fingerprint(duo):
        raise KvtoolError(f"{where} was made with other duo settings; "
                          "resume with the same options or start without --resume")
    if "pull_sum" not in tensors and "gates" in tensors:
        raise KvtoolError(f"{where} was written before duo recorded heads.duo.pull: start without --resume")
    expect = {"gates": (tuple(gates.shape), torch.float32), "history": ((step, 2), torch.float64),
              "pull_sum": (tuple(gates.shape), torch.float64),
              "optimizer.step": ((), torch.float32), "optimizer.exp_avg": (tuple(gates.shape), torch.float32),
              "optimizer.exp_avg_sq": (tuple(gates.shape), torch.float32)}
    if step == 0:
        expect = {k: v for k, v in expect.items() if not k.startswith("optimizer.")}
    if duo.average:
        expect["average_sum"] = (tuple(gates.shape), torch.float64)
    missing = sorted(set(expect) - set(tensors))
    extra = sorted(set(tensors) - set(expect))
    if missing or extra:
        raise KvtoolError(f"{where}: " + (f"tensor {missing[0]!r} is missing" if missing
                                            else f"unexpected tensor {extra[0]!r}"))
    for name, (shape, dtype) in expect.items():
        t = tensors[name]
        if name == "gates" and tuple(t.shape) != shape:
            raise KvtoolError(f"{where} is for another model (gate shape {list(t.shape)}, expected {list(shape)})")
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise KvtoolError(f"{where}: {name} is {str(t.dtype).replace('torch.', '')} {list(t.shape)}, "
                              f"expected {str(dtype).replace('torch.', '')} {list(shape)}")
        if not torch.isfinite(t).all():
            raise KvtoolError(f"{where}: {name} contains NaN or inf")
    if ((tensors["gates"] < 0) | (tensors["gates"] > 1)).any():
        raise KvtoolError(f"{where}: gates must lie in [0, 1]")
    if duo.average:
        n = max(0, step - duo.average_from())
        if ((tensors["average_sum"] < 0) | (tensors["average_sum"] > n + 1e-6)).any():
            raise KvtoolError(f"{where}: average_sum must lie in [0, {n}] after step {step}")
    if step > 0 and (tensors["optimizer.step"].item() != step or (tensors["optimizer.exp_avg_sq"] < 0).any()):
        raise KvtoolError(f"{where}: the optimizer state does not match step {step}")
    with torch.no_grad():
        gates.copy_(tensors["gates"])
        pull.copy_(tensors["pull_sum"])
        if duo.average:
            total.copy_(tensors["average_sum"])
    if step > 0:
        state = opt.state_dict()
        state["state"] = {0: {k[len("optimizer."):]: v for k, v in tensors.items() if k.startswith("optimizer.")}}
        opt.load_state_dict(state)
    return step, tensors["history"].tolist()
