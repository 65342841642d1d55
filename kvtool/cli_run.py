"""`kvtool run` and `kvtool bench`: the runtime's commands, registered on the app of kvtool.cli."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Optional

import typer

from kvtool.cli import _progress, _quiet_libraries, _table, _writable_target, app, err, out
from kvtool.errors import KvtoolError

SHIPPED = {None: "smollm2-135m-instruct.kv.st"}     # model argument -> shipped profile file in profiles/
DEFAULT_BENCH_POLICIES = ["heads=0.5", "heads=all,k=4,v=4", "heads=0.5,k=4,v=4,krope=pre",    # heads=<f>: the
                          "heads=0.125,k=4,v=3,sink=4,recent=224,krope=pre,buffer=32"]        # profile's own method
DEFAULT_BASELINES = ["quanto:4", "quanto:2", "streaming:4:252"]


def shipped_profile(model: Optional[str]) -> Path | None:
    """The profile kvtool ships for `model` (only the embedded default has one), or None."""
    name = SHIPPED.get(model)
    if name is None:
        return None
    path = Path(__file__).resolve().parent.parent / "profiles" / name
    return path if path.is_file() else None


def _load(model: Optional[str], profile: Optional[Path], dtype: str, need_profile: bool, device: str = "cpu"):
    from kvtool.models import load_model
    from kvtool.profile import Profile

    path = profile or shipped_profile(model)
    if path is None and need_profile:
        raise KvtoolError("no --profile given and kvtool ships none for this model; make one with "
                          "`kvtool profile MODEL -o model.kv.st` (and `kvtool calibrate`)")
    _quiet_libraries()
    with err.status("Loading model"):
        mdl, tok = load_model(model, dtype=dtype, device=device)
        prof = Profile.load(path, model=mdl) if path is not None else None
    if path is not None and profile is None:
        err.print(f"Using the shipped profile {path.name}")
    return mdl, tok, prof


def _samples(task: str, tok, lengths, depths, n_nll, context, continuation, seed):
    from kvtool.evaluate import default_depths, nll_samples, passkey_grid

    if task == "passkey":
        return passkey_grid(tok, lengths, default_depths(depths), seed=seed)
    if task == "nll":
        return nll_samples(tok, n_nll, context, continuation, seed=seed)
    raise KvtoolError(f"unknown task {task!r} (passkey or nll)")


def _run_specs(mdl, tok, prof, task: str, samples, specs: list[str], chunk: int, backend: str,
               decode_steps: int = 16) -> list:
    from kvtool.evaluate import run_nll, run_passkey

    results = []
    with _progress() as bar:
        job = bar.add_task(f"{task}", total=len(specs), info="")
        for spec in specs:
            bar.update(job, info=spec)
            if task == "passkey":
                results.append(run_passkey(mdl, tok, samples, spec, prof, chunk=chunk, backend=backend))
            else:
                results.append(run_nll(mdl, samples, spec, prof, chunk=chunk, backend=backend,
                                       decode_steps=decode_steps))
            bar.advance(job)
    return results


SHORT = {"x_smaller_than_16bit": "x smaller", "prefill_tok_s": "prefill tok/s", "decode_tok_s": "decode tok/s",
         "kv_MiB": "KV MiB", "seconds": "s"}


def _print(results, title: str, as_json: bool) -> list[dict]:
    rows = [r.row() for r in results]
    if as_json:
        print(json.dumps(rows, indent=2))
    elif rows:
        title += f" ({rows[0]['samples']} samples; KV MiB per sample; x smaller = vs a 16-bit full cache)"
        out.print(_table(title, [{SHORT.get(k, k): v for k, v in r.items() if k not in ("task", "samples")}
                                 for r in rows]))
    return rows


@app.command()
def run(
    model: Optional[str] = typer.Argument(None, help="Model (default: the embedded SmolLM2-135M-Instruct)."),
    profile: Optional[Path] = typer.Option(None, "--profile", "-p", help="Profile (default: the shipped one for the default model)."),
    policy: Optional[str] = typer.Option(None, "--policy", help="Compression policy, e.g. heads=duo:0.5,k=4,v=4,krope=pre (default: the profile's). Fields: see the kvtool.policy table (`python -m kvtool.policy`) / docs/runtime.md."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Generate from this prompt."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Generate from the text of this file."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Tokens to generate with --prompt."),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="Wrap --prompt in the model's chat template when it has one."),
    task: Optional[str] = typer.Option(None, "--task", help="passkey or nll: full cache vs compressed, side by side."),
    lengths: str = typer.Option("1024,2048,3072,4096", "--lengths", help="passkey: prompt lengths, comma-separated."),
    depths: int = typer.Option(2, "--depths", help="passkey: needle depths per length (evenly spaced in 0.1-0.9)."),
    samples: int = typer.Option(6, "--samples", "-n", help="nll: contexts."),
    context: int = typer.Option(2048, "--context", help="nll: context tokens compressed into the cache."),
    continuation: int = typer.Option(128, "--continuation", help="nll: teacher-forced tokens scored after the context."),
    chunk: int = typer.Option(512, "--chunk", help="Prefill chunk (tokens)."),
    seed: int = typer.Option(0, "--seed"),
    dtype: str = typer.Option("float32", "--dtype", help="Model dtype: float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    backend: str = typer.Option("auto", "--backend", help="Attention kernels: auto (cupy on CUDA when CuPy works), torch or cupy."),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON."),
) -> None:
    """Run the model with a compressed KV cache: generate from a prompt, or compare with the full cache on a task."""
    from kvtool.policy import Policy

    if sum(x is not None for x in (prompt, prompt_file, task)) != 1:
        raise KvtoolError("give exactly one of --prompt, --prompt-file or --task passkey|nll")
    if task is not None and task not in ("passkey", "nll"):
        raise KvtoolError(f"unknown task {task!r} (passkey or nll)")
    if prompt_file is not None and not prompt_file.is_file():
        raise KvtoolError(f"no such prompt file: {prompt_file}")
    if policy is not None:
        Policy.parse(policy, default_method="duo")                     # malformed: fail before loading anything
    _check_backend(backend, device)
    mdl, tok, prof = _load(model, profile, dtype, need_profile=False, device=device)
    spec = policy if policy is not None else (str(Policy.from_profile(prof.policy)) if prof is not None else "heads=all")
    if task is not None:
        lens = _int_list(lengths, "--lengths")
        data = _samples(task, tok, lens, depths, samples, context, continuation, seed)
        results = _run_specs(mdl, tok, prof, task, data, ["full", spec], chunk, backend)
        _print(results, f"kvtool run --task {task}: full cache vs {spec}", as_json)
        return
    text = prompt if prompt is not None else prompt_file.read_text(encoding="utf-8", errors="replace")
    result = generate(mdl, tok, prof, spec, text, max_new_tokens, chat, backend)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    out.print(result["text"])
    share = result["kv_bytes"] / max(result["full16_bytes"], 1)
    err.print(f"policy {spec}: {result['tokens_seen']} tokens seen; the KV cache holds {result['kv_bytes'] / 2**20:.3f} MiB "
              f"= {100 * share:.0f}% of a 16-bit full cache ({result['full16_bytes'] / 2**20:.3f} MiB); "
              f"{result['decode_tok_s']:.1f} tokens/s")
    if share >= 1:
        err.print("(short prompts fit in the 16-bit sink and buffer; the savings start past sink + buffer tokens)")


def generate(model, tok, profile, policy: str, text: str, max_new_tokens: int, chat: bool = True,
             backend: str = "auto") -> dict:
    """Generate from `text` with a CompressedCache; the text and the cache's bytes."""
    import time

    import torch

    from kvtool.cache import CompressedCache

    if chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(text, return_tensors="pt")["input_ids"]
    cache = CompressedCache(model, profile, policy, backend=backend)
    start = time.perf_counter()
    with torch.inference_mode():
        outp = model.generate(ids.to(next(model.parameters()).device), past_key_values=cache, do_sample=False,
                              max_new_tokens=max_new_tokens, attention_mask=torch.ones_like(ids))
    seconds = time.perf_counter() - start
    new = outp[0, ids.shape[1]:]
    full16 = cache.full_nbytes(torch.float16)
    return {"policy": policy, "text": tok.decode(new, skip_special_tokens=True), "prompt_tokens": ids.shape[1],
            "new_tokens": int(new.numel()), "tokens_seen": cache.get_seq_length(), "kv_bytes": cache.nbytes(),
            "full16_bytes": full16, "x_smaller_than_16bit": full16 / max(cache.nbytes(), 1),
            "decode_tok_s": new.numel() / seconds, "seconds": round(seconds, 2)}


def _has_quanto() -> bool:
    try:
        return importlib.util.find_spec("optimum.quanto") is not None
    except ModuleNotFoundError:
        return False


def _check_backend(backend: str, device: str) -> None:
    """Refuse an impossible --backend / --device before loading anything."""
    import cupy_kernels

    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise KvtoolError(f"--device {device!r}: give cpu or cuda")
    if device != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise KvtoolError(f"--device {device}: torch sees no CUDA GPU here")
    cupy_kernels.select_backend(backend, device)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KvtoolError(f"{flag}: {text!r} is not a comma-separated list of whole numbers") from None
    if not values or min(values) < 1:
        raise KvtoolError(f"{flag}: give positive whole numbers, e.g. 1024,2048")
    return values


@app.command()
def bench(
    model: Optional[str] = typer.Argument(None, help="Model (default: the embedded SmolLM2-135M-Instruct)."),
    profile: Optional[Path] = typer.Option(None, "--profile", "-p", help="Profile (default: the shipped one for the default model)."),
    task: str = typer.Option("nll", "--task", help="passkey or nll."),
    policies: Optional[str] = typer.Option(None, "--policies", help="kvtool policies to sweep, separated by ';' (default: a sweep of head split and 2/4-bit)."),
    baselines: Optional[str] = typer.Option(None, "--baselines", help="Baselines, ';'-separated: quanto:<2|4>, streaming:<sink>:<recent>, press:<name>:<ratio> (kvpress), or 'none'."),
    lengths: str = typer.Option("1024,2048,3072,4096", "--lengths", help="passkey: prompt lengths, comma-separated."),
    depths: int = typer.Option(10, "--depths", help="passkey: needle depths per length."),
    samples: int = typer.Option(6, "--samples", "-n", help="nll: contexts."),
    context: int = typer.Option(2048, "--context", help="nll: context tokens."),
    continuation: int = typer.Option(128, "--continuation", help="nll: scored continuation tokens."),
    chunk: int = typer.Option(512, "--chunk", help="Prefill chunk (tokens)."),
    decode_steps: int = typer.Option(16, "--decode-steps", help="nll: greedy decode steps timed after each context."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: torch's choice)."),
    seed: int = typer.Option(0, "--seed"),
    dtype: str = typer.Option("float32", "--dtype"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    backend: str = typer.Option("auto", "--backend", help="Attention kernels: auto, torch or cupy."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw memory vs accuracy / NLL to this PNG."),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON."),
) -> None:
    """Sweep policies and baselines on the same inputs: accuracy or NLL against KV bytes, speed; table and plot."""
    if task not in ("passkey", "nll"):
        raise KvtoolError(f"unknown task {task!r} (passkey or nll)")
    pols = [p.strip() for p in (policies.split(";") if policies else DEFAULT_BENCH_POLICIES) if p.strip()]
    base = [] if baselines == "none" else \
        [b.strip() for b in (baselines.split(";") if baselines else DEFAULT_BASELINES) if b.strip()]
    if baselines is None and not _has_quanto():
        base = [b for b in base if not b.startswith("quanto:")]
        err.print("Note: optimum-quanto is not installed (pip install 'kvtool[bench]'); skipping the quanto baselines")
    from kvtool.baselines import check_spec

    for spec in base + pols:
        check_spec(spec)
    if plot is not None:
        _writable_target(plot)
        if plot.suffix.lower() != ".png":
            raise KvtoolError(f"--plot {plot}: give a .png file name")
    _check_backend(backend, device)
    if threads:
        import torch

        torch.set_num_threads(threads)
    mdl, tok, prof = _load(model, profile, dtype, need_profile=False, device=device)
    lens = _int_list(lengths, "--lengths")
    data = _samples(task, tok, lens, depths, samples, context, continuation, seed)
    results = _run_specs(mdl, tok, prof, task, data, ["full"] + base + pols, chunk, backend, decode_steps)
    _print(results, f"kvtool bench --task {task}", as_json)
    if plot is not None:
        from kvtool.plots import memory_vs_quality

        memory_vs_quality(results, plot, task)
        if not as_json:
            out.print(f"Plot written to [bold]{plot}[/]")
