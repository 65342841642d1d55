"""`kvtool run` and `kvtool bench`: the runtime's commands, registered on the shared app of kvtool.cli_base."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Optional

import typer

from kvtool.cli_base import _Command, _progress, _quiet_libraries, _table, _writable_target, app, err, out
from kvtool.texts import FILLER_NAME, TEXT_SOURCES, check_text_source
from kvtool.errors import KvtoolError
from kvtool.sweep import default_text, read_rows, rows_setup, run_specs, samples_for
from kvtool.tasks import TASKS, takes_query_after
from kvtool.textsafe import shown

SHIPPED = {None: "smollm2-135m-instruct.kv.st"}     # model argument -> shipped profile file in profiles/
DEFAULT_BENCH_POLICIES = ["heads=0.5", "heads=all,k=4,v=4", "heads=0.5,k=4,v=4,krope=pre",    # heads=<f>: the
                          "heads=0.125,k=4,v=3,sink=4,recent=224,krope=pre,buffer=32"]        # profile's own method
DEFAULT_BASELINES = ["quanto:4", "quanto:2", "streaming:4:252"]
TASK_NAMES = ("passkey", "nll", *TASKS)            # --task: the two built in here, then kvtool.tasks.TASKS
TASK_HELP = "passkey, nll or " + ", ".join(TASKS) + " (kvtool.tasks; docs/runtime.md)"


def _known_task(task: Optional[str]) -> None:
    if task is not None and task not in TASK_NAMES:
        raise KvtoolError(f"unknown task {task!r} ({', '.join(TASK_NAMES)})")


def shipped_profile(model: Optional[str]) -> Path | None:
    """The profile kvtool ships for `model` (only the embedded default has one), or None."""
    name = SHIPPED.get(model)
    if name is None:
        return None
    path = Path(__file__).resolve().parent.parent / "profiles" / name
    return path if path.is_file() else None


def _load(model: Optional[str], profile: Optional[Path], dtype: str, need_profile: bool, device: str = "cpu",
          placement: tuple = (None, None)):
    from kvtool.models import load_model
    from kvtool.profile import Profile

    path = profile or shipped_profile(model)
    if path is None and need_profile:
        raise KvtoolError("no --profile given and kvtool ships none for this model; make one with "
                          "`kvtool profile MODEL -o model.kv.st` (and `kvtool calibrate`)")
    _quiet_libraries()
    with err.status("Loading model"):
        mdl, tok = load_model(model, dtype=dtype, device=device, device_map=placement[0], max_memory=placement[1])
        prof = Profile.load(path, model=mdl) if path is not None else None
    if path is not None and profile is None:
        err.print(f"Using the shipped profile {shown(path.name)}")
    return mdl, tok, prof


QUERY_HELP = ("passkey, passkey-chat: where the question is. inside: part of the prompt (what SnapKV and RocketKV are evaluated "
              "on: the observation window sees it); after: the context is prefilled and compressed first, then the "
              "question is appended (multi-turn reuse, SCBench arXiv 2412.10319). Same samples either way.")


def _check_query(query: str, task: Optional[str]) -> None:
    if query not in ("inside", "after"):
        raise KvtoolError(f"--query {query!r}: give inside or after")
    if query == "after" and not takes_query_after(task or ""):
        raise KvtoolError("--query after applies to --task passkey and passkey-chat")


TEXT_HELP = ("--task: the text it reads. nll: where the windows are cut; passkey: the haystack around the key. "
             + "; ".join(f"{name}: {what}" for name, (_, what) in TEXT_SOURCES.items())
             + f"; {FILLER_NAME}: repeated sentences (passkey only); or a .txt / .jsonl file. "
             + f"Default: pydoc for nll, {FILLER_NAME} for passkey; "
             + "; ".join(f"{t.default_text} for {name}" for name, t in TASKS.items()) + ".")


def _check_text(task: Optional[str], text: Optional[str], samples: int, context: int, continuation: int) -> str | None:
    """The text source the task reads (its default when --text is not given), refused before loading the model when
    it is unknown, unreadable, empty, filler for nll, or fewer bytes than the nll windows' tokens."""
    if task is None:
        if text is not None:
            raise KvtoolError("--text is read by --task passkey|nll only; leave it out with --prompt / --prompt-file")
        return None
    source = text if text is not None else default_text(task)
    need = samples * (context + continuation) if task == "nll" else 0
    check_text_source(source, passkey=task != "nll", need_tokens=need)
    return source


PASSKEY_ANSWER = 16          # positions a passkey answer may take after its prompt (a 5-digit key + 4 spare steps)


def _check_task(task: Optional[str], lengths: str, depths: int, samples: int, context: int, continuation: int,
                chunk: int, seed: int, decode_steps: int) -> list[int]:
    """Refuse out-of-range task options before loading the model; the passkey lengths as a list."""
    from kvtool import checks

    lens = _int_list(lengths, "--lengths")
    checks.whole("--chunk", chunk)
    checks.seed(seed)
    if task == "passkey" or task in TASKS:
        checks.whole("--depths", depths, 1, 10_000)
    if task == "nll":
        checks.samples(samples)
        checks.whole("--context", context)
        checks.whole("--continuation", continuation, 2)                  # the first token is scored from the context
        checks.whole("--decode-steps", decode_steps)
        need = samples * (context + continuation)
        if need > checks.MAX_NLL_TOKENS:
            raise KvtoolError(f"nll: --samples x (--context + --continuation) = {need} tokens is more text than kvtool "
                              f"cuts from its built-in document (at most {checks.MAX_NLL_TOKENS})")
    return lens


def _check_task_context(limit: Optional[int], task: Optional[str], lens: list[int], context: int, continuation: int,
                        decode_steps: int) -> None:
    """Refuse a task whose sequences run past the model's context (limit None: not known yet)."""
    from kvtool.checks import context as within

    if task == "passkey":
        within(limit, max(lens) + PASSKEY_ANSWER, f"--lengths {max(lens)} plus up to {PASSKEY_ANSWER} answer tokens")
    elif task in TASKS:
        extra = TASKS[task].answer_tokens if TASKS[task].kind == "generate" else decode_steps
        within(limit, max(lens) + extra, f"--lengths {max(lens)} plus up to {extra} answer / decode tokens")
    elif task == "nll":
        within(limit, context + continuation + decode_steps,
               f"--context {context} + --continuation {continuation} + {decode_steps} decode steps")


def _limit(mdl) -> Optional[int]:
    return getattr(mdl.config.get_text_config(), "max_position_embeddings", None)


SHARE_HELP = ("Run the caches that hold the same state until the prompt ends (select=snapkv++ / snapkv with "
              "heads=all, same dtype) from one prefill per sample: each adopts it, then selects and decodes on its "
              "own, with the same results as without the flag. The others run as usual. Their rows say "
              "shared_prefill and count the shared prefill's time in full (prefill tok/s, seconds); they are "
              "appended to --rows when the whole group is done.")
REUSE_HELP = ("Passkey and generation tasks: a sample whose prompt starts like an earlier one's (the same template and "
              "filler up to the needle) resumes its chunked prefill from a saved copy of the cache at the last chunk "
              "boundary they share, with the same results as without the flag; fewer prefill tokens run (about a third "
              "on 40 passkey-chat samples of 1-4k). Rows say reused_tokens; prefill tok/s counts the tokens run.")
ROWS_HELP = ("Append each cache's row to this JSON-lines file as soon as it is done, with the run's setup (task, text, "
             "samples, seed, model, profile hash); a later run with the same setup reads the rows it finds there "
             "instead of re-running them (the full cache's row, which reads no profile, for any profile). A long sweep "
             "survives an interruption, and two processes given the same file share the work. Speeds are those of the run that made the row.")


SHORT = {"x_smaller_than_16bit": "x smaller", "read_MiB": "read MiB/step", "prefill_tok_s": "prefill tok/s", "decode_tok_s": "decode tok/s",
         "kv_MiB": "KV MiB", "seconds": "s"}


def _vs_full(rows: list[dict]) -> list[dict]:
    """Rows as the table shows them: short column names and, beside each NLL, its change against the `full` row."""
    from kvtool.evaluate import paired_bootstrap

    full = next((r for r in rows if r["cache"] == "full"), None)
    table_rows = []
    for r in rows:
        row = {}
        for k, v in r.items():
            if k in ("task", "samples", "text", "hits", "sample_nll", "query", "shared_prefill"):
                continue
            row[SHORT.get(k, k)] = v
            if k == "nll" and full is not None and "nll" in full:
                row["vs full"] = "—" if r is full else f"{100 * (v / full['nll'] - 1):+.1f}%"
            if k in ("nll", "accuracy") and full is not None and r is not full:
                ci = paired_bootstrap(r, full)
                if ci is not None:
                    unit = "%" if k == "nll" else ""
                    row["95% CI"] = f"[{ci[0]:+.1f},{ci[1]:+.1f}]{unit}"
            elif k in ("nll", "accuracy") and full is not None:
                row["95% CI"] = "—"
        table_rows.append(row)
    if not any(r.get("read_MiB", r["kv_MiB"]) < r["kv_MiB"] for r in rows):   # every step read what its cache holds
        for row in table_rows:
            row.pop(SHORT["read_MiB"], None)
    return table_rows


def _print(results, title: str, as_json: bool) -> list[dict]:
    rows = [r.row() for r in results]
    if as_json:
        print(json.dumps(rows, indent=2))
    elif rows:
        text = f" on {rows[0]['text']}" if rows[0].get("text") else ""           # _table escapes the title
        if rows[0].get("query") == "after":
            text += ", question after compression"
        title += f"{text} ({rows[0]['samples']} samples; KV MiB per sample; x smaller = vs a 16-bit full cache)"
        shared = sum(bool(r.get("shared_prefill")) for r in rows)
        if shared:
            title += (f"; {shared} caches shared their prefills (--share-prefill; each counts the shared prefill's "
                      "time in full)")
        table_rows = _vs_full(rows)
        if _width(table_rows, exclude="cache") + 8 > out.width and any("95% CI" in r for r in table_rows):
            table_rows = [{k: v for k, v in r.items() if k != "95% CI"} for r in table_rows]
            title += "; 95% CIs: --json or a wider terminal"
        key = _keyed(table_rows, out.width)
        out.print(_table(title, table_rows))
        for label, spec in key:
            out.print(f"{label}  {shown(spec)}", soft_wrap=True)
    return rows


def _width(table_rows: list[dict], exclude: str) -> int:
    """Characters the table's columns other than `exclude` take (content + borders)."""
    return sum(max(len(str(col)), *(len(str(r.get(col, ""))) for r in table_rows)) + 3
               for col in table_rows[0] if col != exclude)


def _keyed(table_rows: list[dict], width: int) -> list[tuple[str, str]]:
    """When the cache names do not fit beside the numbers at this width (80 columns when piped), the table names
    each cache by a number and the full names follow under it, one a line: never cut, never ambiguous."""
    room = width - _width(table_rows, exclude="cache") - 4
    if max(len(r["cache"]) for r in table_rows) <= max(room, 0):
        return []
    key = []
    for i, r in enumerate(table_rows):
        if r["cache"] != "full":
            key.append((f"#{i}", r["cache"]))
            r["cache"] = f"#{i}"
    return key


@app.command(cls=_Command)
def run(
    model: Optional[str] = typer.Argument(None, help="Model (default: the embedded SmolLM2-135M-Instruct)."),
    profile: Optional[Path] = typer.Option(None, "--profile", "-p", help="Profile (default: the shipped one for the default model)."),
    policy: Optional[str] = typer.Option(None, "--policy", help="Compression policy, e.g. heads=duo:0.5,k=4,v=4,krope=pre (default: the profile's). Fields: see the kvtool.policy table (`python -m kvtool.policy`) / docs/runtime.md."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Generate from this prompt."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Generate from the text of this file."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Tokens to generate with --prompt."),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="Wrap --prompt in the model's chat template when it has one."),
    task: Optional[str] = typer.Option(None, "--task", help=TASK_HELP + ": full cache vs compressed, side by side."),
    lengths: str = typer.Option("1024,2048,3072,4096", "--lengths", help="passkey: prompt lengths, comma-separated."),
    depths: int = typer.Option(2, "--depths", help="passkey: needle depths per length (evenly spaced in 0.1-0.9)."),
    samples: int = typer.Option(6, "--samples", "-n", help="nll: contexts."),
    context: int = typer.Option(2048, "--context", help="nll: context tokens compressed into the cache."),
    continuation: int = typer.Option(128, "--continuation", help="nll: teacher-forced tokens scored after the context."),
    chunk: int = typer.Option(512, "--chunk", help="Prefill chunk (tokens)."),
    seed: int = typer.Option(0, "--seed", help="--task: random seed of the passkey keys / the NLL text windows."),
    text_source: Optional[str] = typer.Option(None, "--text", help=TEXT_HELP),
    dtype: str = typer.Option("float32", "--dtype", help="Model dtype: float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="Split the model over devices with accelerate: auto, balanced, sequential or a .json {module: device} (instead of --device)."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="With --device-map: memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB."),
    backend: str = typer.Option("auto", "--backend", help="Attention kernels: auto (cupy on CUDA when CuPy works), torch or cupy."),
    query: str = typer.Option("inside", "--query", help=QUERY_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON."),
) -> None:
    """Run the model with a compressed KV cache: generate from a prompt, or compare with the full cache on a task."""
    from kvtool import checks
    from kvtool.models import _as_dtype
    from kvtool.policy import Policy

    if sum(x is not None for x in (prompt, prompt_file, task)) != 1:
        raise KvtoolError("give exactly one of --prompt, --prompt-file or --task passkey|nll")
    _known_task(task)
    text = prompt if prompt is not None else _prompt_text(prompt_file) if prompt_file is not None else None
    if text is not None:
        if not text.strip():
            raise KvtoolError("--prompt is empty; give some text to generate from" if prompt is not None
                              else f"prompt file {prompt_file} has no text")
        checks.whole("--max-new-tokens", max_new_tokens)
    lens = _check_task(task, lengths, depths, samples, context, continuation, chunk, seed, 16)
    _check_query(query, task)
    if policy is not None:
        _check_policy(policy, "--policy")                               # malformed: fail before loading anything
    if profile is not None:
        checks.profile_file(profile)
    _as_dtype(dtype)
    _check_backend(backend, device)
    placement = checks.device_map(device_map, device, max_memory)
    _check_task_context(checks.model_context(model), task, lens, context, continuation, 16)
    source = _check_text(task, text_source, samples, context, continuation)
    mdl, tok, prof = _load(model, profile, dtype, need_profile=False, device=device, placement=placement)
    spec = policy if policy is not None else (str(Policy.from_profile(prof.policy)) if prof is not None else "heads=all")
    if task is not None:
        _check_task_context(_limit(mdl), task, lens, context, continuation, 16)
        data = samples_for(task, tok, lens, depths, samples, context, continuation, seed, source)
        results = run_specs(mdl, tok, prof, task, data, ["full", spec], chunk, backend, text=source, query=query,
                            progress=_progress)
        _print(results, f"kvtool run --task {task}: full cache vs {spec}", as_json)
        return
    result = generate(mdl, tok, prof, spec, text, max_new_tokens, chat, backend, chunk=chunk)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    out.print(shown(result["text"], newlines=True))
    share = result["kv_bytes"] / max(result["full16_bytes"], 1)
    err.print(f"policy {shown(spec)}: {result['tokens_seen']} tokens seen; the KV cache holds "
              f"{result['kv_bytes'] / 2**20:.3f} MiB = {100 * share:.0f}% of a 16-bit full cache "
              f"({result['full16_bytes'] / 2**20:.3f} MiB); prefill {result['prompt_tokens']} tokens in "
              f"{result['prefill_seconds']:.2f} s ({result['prefill_tok_s']:.1f} tok/s), decode "
              f"{result['new_tokens']} tokens at {result['decode_tok_s']:.1f} tok/s", soft_wrap=True)
    if share >= 1:
        err.print(_why_no_saving(Policy.parse(spec, default_method="duo"), result["tokens_seen"]), soft_wrap=True)


def _why_no_saving(p, seen: int) -> str:
    """One plain sentence on why a cache holds as much as a 16-bit full cache."""
    starts = ([p.sink + p.recent] if p.heads != "all" else []) + ([p.sink + p.buffer] if p.quantized else [])
    if not starts:
        return ("Nothing is saved: this policy keeps every head's whole context in 16 bits (no streaming heads, "
                "k=16, v=16).")
    return (f"Nothing is saved yet: all {seen} tokens fit in what every head keeps in 16 bits (sink {p.sink} + "
            f"recent {p.recent} for streaming heads, sink {p.sink} + buffer {p.buffer} for retrieval heads); the "
            f"cache starts to shrink past {min(starts)} tokens. `kvtool run --task nll` shows bytes and quality side "
            "by side on long contexts.")


def generate(model, tok, profile, policy: str, text: str, max_new_tokens: int, chat: bool = True,
             backend: str = "auto", chunk: int = 512) -> dict:
    """Generate greedily from `text` with a CompressedCache; the text, the cache's bytes and the two speeds.

    Prefill (every prompt token but the last, in chunks of `chunk`) and decode (`model.generate` from the prefilled
    cache: the last prompt token, then each new token) are timed apart, so decode tokens/s is not diluted by a long
    prompt."""
    import torch

    from kvtool.cache import CompressedCache, prefill, with_cache
    from kvtool.evaluate import Timer

    if chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(text, return_tensors="pt")["input_ids"]
    if ids.numel() == 0:
        raise KvtoolError("the prompt gives no tokens; give some text to generate from")
    limit = _limit(model)
    if limit is not None and ids.shape[1] + max_new_tokens > limit:
        raise KvtoolError(f"the prompt has {ids.shape[1]} tokens; with --max-new-tokens {max_new_tokens} that is "
                          f"beyond the model's context of {limit} tokens")
    from kvtool.models import input_device

    ids = ids.to(input_device(model))                                  # [1, T]
    cache = CompressedCache(model, profile, policy, backend=backend)
    with torch.inference_mode():
        with Timer() as pre:
            if ids.shape[1] > 1:
                prefill(model, ids[:, :-1], cache, chunk)
        with Timer() as dec:
            outp = model.generate(ids, **with_cache(model, cache), do_sample=False, max_new_tokens=max_new_tokens,
                                  attention_mask=torch.ones_like(ids))
    new = outp[0, ids.shape[1]:]
    full16 = cache.full_nbytes(torch.float16)
    return {"policy": policy, "text": tok.decode(new, skip_special_tokens=True), "prompt_tokens": ids.shape[1],
            "new_tokens": int(new.numel()), "tokens_seen": cache.get_seq_length(), "kv_bytes": cache.nbytes(),
            "full16_bytes": full16, "x_smaller_than_16bit": full16 / max(cache.nbytes(), 1),
            "shared_bytes": cache.shared_nbytes(),       # the model-wide RoPE table pre-RoPE stores read; not in kv_bytes
            "prefill_seconds": round(pre.seconds, 3), "prefill_tok_s": (ids.shape[1] - 1) / max(pre.seconds, 1e-9),
            "decode_seconds": round(dec.seconds, 3), "decode_tok_s": new.numel() / max(dec.seconds, 1e-9),
            "seconds": round(pre.seconds + dec.seconds, 2)}


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


def _prompt_text(path: Path) -> str:
    if not path.is_file():
        raise KvtoolError(f"no such prompt file: {path}" if not path.exists() else f"prompt file {path} is not a file")
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise KvtoolError(f"cannot read prompt file {path}: {exc.strerror or exc}") from None


def _check_policy(text: str, flag: str) -> None:
    """Refuse an empty or malformed policy, or heads=<name> naming no calibration method, before any loading."""
    import calibrate
    from kvtool.policy import Policy

    if not text.strip():
        raise KvtoolError(f"{flag} is empty; give a policy such as heads=all,k=4,v=4 (or leave {flag} out)")
    heads = Policy.parse(text, default_method="duo").heads
    if heads not in ("all", "none", "random") and heads not in calibrate.names():
        raise KvtoolError(f"{flag} {text!r}: heads={heads} names no calibration method "
                          f"(known: {', '.join(calibrate.names())}; or all, none, random:<fraction>)")


def _spec_list(text: Optional[str], default: list[str], flag: str) -> list[str]:
    """';'-separated specs; an option given but holding none is refused (not read as the default)."""
    if text is None:
        return list(default)
    specs = [p.strip() for p in text.split(";") if p.strip()]
    if not specs:
        raise KvtoolError(f"{flag} {text!r} names nothing; give specs separated by ';'"
                          + (" or 'none'" if flag == "--baselines" else ""))
    return specs


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KvtoolError(f"{flag}: {text!r} is not a comma-separated list of whole numbers") from None
    if not values or min(values) < 1:
        raise KvtoolError(f"{flag}: give positive whole numbers, e.g. 1024,2048")
    return values


@app.command(cls=_Command)
def bench(
    model: Optional[str] = typer.Argument(None, help="Model (default: the embedded SmolLM2-135M-Instruct)."),
    profile: Optional[Path] = typer.Option(None, "--profile", "-p", help="Profile (default: the shipped one for the default model)."),
    task: str = typer.Option("nll", "--task", help=TASK_HELP + "."),
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
    seed: int = typer.Option(0, "--seed", help="Random seed of the passkey keys / the NLL text windows."),
    text_source: Optional[str] = typer.Option(None, "--text", help=TEXT_HELP),
    dtype: str = typer.Option("float32", "--dtype", help="Model dtype: float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    backend: str = typer.Option("auto", "--backend", help="Attention kernels: auto, torch or cupy."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw memory vs accuracy / NLL to this PNG."),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON."),
    rows_file: Optional[Path] = typer.Option(None, "--rows", help=ROWS_HELP),
    query: str = typer.Option("inside", "--query", help=QUERY_HELP),
    share_prefill: bool = typer.Option(False, "--share-prefill", help=SHARE_HELP),
    reuse_prefix: bool = typer.Option(False, "--reuse-prefix", help=REUSE_HELP),
) -> None:
    """Sweep policies and baselines on the same inputs: accuracy or NLL against KV bytes, speed; table and plot."""
    from kvtool import checks
    from kvtool.models import _as_dtype

    _known_task(task)
    lens = _check_task(task, lengths, depths, samples, context, continuation, chunk, seed, decode_steps)
    _check_query(query, task)
    if threads is not None:
        checks.whole("--threads", threads, 1, checks.MAX_THREADS)
    pols = _spec_list(policies, DEFAULT_BENCH_POLICIES, "--policies")
    base = [] if baselines is not None and baselines.strip() == "none" else \
        _spec_list(baselines, DEFAULT_BASELINES, "--baselines")
    skip_quanto = baselines is None and not _has_quanto()
    if skip_quanto:
        base = [b for b in base if not b.startswith("quanto:")]
    from kvtool.baselines import check_spec

    for spec in base + pols:
        check_spec(spec)
        if spec != "full" and not spec.startswith(("quanto:", "streaming:", "press:")):
            _check_policy(spec, "--policies")
    if plot is not None:
        _writable_target(plot)
        if plot.suffix.lower() != ".png":
            raise KvtoolError(f"--plot {plot}: give a .png file name")
    if rows_file is not None:
        _writable_target(rows_file)
        read_rows(rows_file, {})     # a file that is not ours is refused before the model loads
    if profile is not None:
        checks.profile_file(profile)
    _as_dtype(dtype)
    _check_backend(backend, device)
    _check_task_context(checks.model_context(model), task, lens, context, continuation, decode_steps)
    source = _check_text(task, text_source, samples, context, continuation)
    if skip_quanto:    # a note, not an error: only once every option is known to be good
        err.print(shown("Note: optimum-quanto is not installed (pip install 'kvtool[bench]'); "
                        "skipping the quanto baselines"), soft_wrap=True)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    mdl, tok, prof = _load(model, profile, dtype, need_profile=False, device=device)
    _check_task_context(_limit(mdl), task, lens, context, continuation, decode_steps)
    data = samples_for(task, tok, lens, depths, samples, context, continuation, seed, source)
    setup = None
    if rows_file is not None:
        picks = dict(lengths=lens, depths=depths, **({"query": query} if query != "inside" else {})) \
            if task != "nll" else \
            dict(samples=samples, context=context, continuation=continuation, decode_steps=decode_steps)
        setup = rows_setup(model, prof, task, text=source, seed=seed, chunk=chunk,
                            dtype=dtype, device=device, backend=backend, **picks)
    specs = list(dict.fromkeys(["full"] + base + pols))      # the full cache always leads; a spec named twice runs once
    results = run_specs(mdl, tok, prof, task, data, specs, chunk, backend, decode_steps, source,
                         rows=rows_file, setup=setup, query=query, share=share_prefill, progress=_progress,
                         reuse=reuse_prefix)
    _print(results, f"kvtool bench --task {task}", as_json)
    if plot is not None:
        from kvtool.plots import memory_vs_quality

        memory_vs_quality(results, plot, task)
        if not as_json:
            out.print(f"Plot written to [bold]{shown(plot)}[/]")
