"""Running cache specs side by side on a task's samples: the Python API under `kvtool run` and `kvtool bench`
(kvtool/cli_run.py is the command layer over it).

* `samples_for`: the samples of a task (passkey, nll, or one of kvtool.tasks.TASKS);
* `run_specs`: each spec on the same samples, in order (with `share`, the specs that can share a prefill run as one
  group, kvtool/shared_prefill.py), optionally resuming from and appending to a rows file;
* rows files (`kvtool bench --rows`): `rows_setup` (what makes two rows comparable), `read_rows`, `append_row`.

A progress display is the caller's: `run_specs(..., progress=factory)` with a factory of rich-Progress-like context
managers (the CLI passes its own); none by default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from kvtool.errors import KvtoolError
from kvtool.tasks import TASKS
from kvtool.textsafe import shown


class _Quiet:
    """A progress display that shows nothing (the rich.progress.Progress methods run_specs calls)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *args, **kwargs):
        return 0

    def advance(self, *args, **kwargs):
        pass

    def update(self, *args, **kwargs):
        pass


def default_text(task: str) -> str:
    """The text source a task reads when none is given: the task's own (kvtool.tasks), pydoc for nll, the pass-key
    filler for passkey."""
    from kvtool.texts import FILLER_NAME

    return TASKS[task].default_text if task in TASKS else "pydoc" if task == "nll" else FILLER_NAME


def samples_for(task: str, tok, lengths=(1024, 2048, 3072, 4096), depths: int = 10, n_nll: int = 6,
                context: int = 2048, continuation: int = 128, seed: int = 0, text: str | None = None):
    """The samples of `task` (passkey, nll or a kvtool.tasks name): one per (length, depth) for passkey and the
    generation tasks (`depths` evenly spaced depths), `n_nll` windows of `context` + `continuation` tokens for nll;
    `text`: the source they read (None: the task's default, `default_text`)."""
    from kvtool.evaluate import default_depths, nll_samples, passkey_grid

    if text is None:
        text = default_text(task)

    if task == "passkey":
        return passkey_grid(tok, lengths, default_depths(depths), seed=seed, text=text)
    if task == "nll":
        return nll_samples(tok, n_nll, context, continuation, seed=seed, source=text)
    if task in TASKS:
        from kvtool.tasks import samples

        return samples(task, tok, lengths, default_depths(depths), seed=seed, text=text)
    raise KvtoolError(f"unknown task {task!r} (passkey or nll)")


def run_specs(mdl, tok, prof, task: str, samples, specs: list[str], chunk: int, backend: str,
               decode_steps: int = 16, text: str | None = None, rows: Optional[Path] = None,
               setup: Optional[dict] = None, query: str = "inside", share: bool = False, progress=None,
               reuse: bool = False) -> list:
    """Each spec on the same samples, in order. With `rows`, a spec whose row the file already holds for the same
    `setup` is read back instead of run (the file is re-read before each spec, so processes sharing it split the
    work), and each new row is appended as soon as it is done. With `share` (bench --share-prefill), the specs that
    can share a prefill (kvtool.shared_prefill.share_plan) run as one group, sample by sample, from one prefill per
    sample, when the group's first spec comes; their rows are appended when the group is done; the others run as
    without it. The results are the same either way (tests/test_share_prefill.py). With `reuse` (bench --reuse-prefix)
    the passkey and generation tasks resume each prefill from an earlier sample's saved state of the same start
    (kvtool.prefix_reuse): the same results again (tests/test_prefix_reuse.py); NLL contexts share no start."""
    from kvtool.baselines import make_cache

    for spec in specs:               # build every cache once first: one the model cannot take fails before any run
        make_cache(mdl, prof, spec, backend)
    if share:
        from kvtool.shared_prefill import share_plan

        groups = share_plan(mdl, prof, specs, backend)
    else:
        groups = [[i] for i in range(len(specs))]
    results: list = [None] * len(specs)
    with (progress() if progress is not None else _Quiet()) as bar:
        job = bar.add_task(f"{task}", total=len(specs), info="")
        for group in groups:
            saved = read_rows(rows, setup) if rows is not None else {}
            todo = []
            for i in group:
                if specs[i] in saved:
                    results[i] = saved[specs[i]]
                    bar.advance(job)
                else:
                    todo.append(i)
            if len(todo) > 1:
                from kvtool.shared_prefill import run_group

                bar.update(job, info=shown(f"{len(todo)} caches sharing a prefill: {'; '.join(specs[i] for i in todo)}"))
                got = run_group(mdl, tok, task, samples, [specs[i] for i in todo], prof, chunk=chunk,
                                backend=backend, query=query, decode_steps=decode_steps, reuse=reuse)
                now = read_rows(rows, setup) if rows is not None else {}
                for i, result in zip(todo, got):
                    result.text = text
                    results[i] = result
                    if rows is not None and specs[i] not in now:      # another process may have made it meanwhile
                        append_row(rows, setup, result)
                bar.advance(job, len(todo))
            elif todo:
                (i,) = todo
                bar.update(job, info=shown(specs[i]))
                results[i] = run_one(mdl, tok, prof, task, samples, specs[i], chunk, backend, decode_steps, query,
                                     reuse=reuse)
                results[i].text = text
                if rows is not None:
                    append_row(rows, setup, results[i])
                bar.advance(job)
    return results


def run_one(mdl, tok, prof, task: str, samples, spec: str, chunk: int, backend: str, decode_steps: int,
             query: str, reuse: bool = False):
    """One spec on the samples (its own prefill per sample; `reuse`: from an earlier sample's saved state of the same
    start where there is one, for the passkey and generation tasks)."""
    from kvtool.evaluate import run_nll, run_passkey

    if task == "passkey":
        return run_passkey(mdl, tok, samples, spec, prof, chunk=chunk, backend=backend, query=query, reuse=reuse)
    if task in TASKS and TASKS[task].kind == "generate":
        from kvtool.tasks import run_generate

        return run_generate(mdl, tok, samples, spec, task, prof, chunk=chunk, backend=backend, query=query,
                            reuse=reuse)
    result = run_nll(mdl, samples, spec, prof, chunk=chunk, backend=backend, decode_steps=decode_steps)
    result.task = task
    return result


PROFILE_FREE = ("full",)        # specs whose cache reads nothing of the profile: their rows hold for any profile
_PROFILE_KEYS = ("profile_tensors_sha256", "profile_method", "profile_sha256")


def _without_profile(setup: dict) -> dict:
    return {k: v for k, v in setup.items() if k not in _PROFILE_KEYS}


def read_rows(path: Path, setup: dict) -> dict:
    """spec -> TaskResult of the rows in `path` made under `setup` (the first of each spec). The full cache (a
    DynamicCache, `PROFILE_FREE`) reads nothing of the profile, so its row is also taken from a setup that differs
    only in the profile; a row of the exact setup comes first. A missing file holds none; a line that is not a row
    refuses the file."""
    from kvtool.evaluate import TaskResult

    found, loose = {}, {}
    if not path.exists():
        return found
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            ok = isinstance(item, dict) and isinstance(item.get("setup"), dict) and isinstance(item.get("result"), dict)
            result = TaskResult(**item["result"]) if ok else None
        except (ValueError, TypeError):
            result = None
        if result is None:
            raise KvtoolError(f"--rows {path}: line {n} is not a row written by kvtool bench --rows; "
                              "give another file")
        if item["setup"] == setup:
            found.setdefault(result.spec, result)
        elif result.spec in PROFILE_FREE and _without_profile(item["setup"]) == _without_profile(setup):
            loose.setdefault(result.spec, result)
    return {**loose, **found}


def append_row(path: Path, setup: dict, result) -> None:
    """One JSON line {"setup", "result"}, flushed to disk before the next cache starts."""
    import dataclasses
    import os

    item = dataclasses.asdict(result)
    if not item.get("shared_prefill"):
        item.pop("shared_prefill", None)     # a row that shared nothing reads as before (older kvtool reads it too)
    line = json.dumps({"setup": setup, "result": item}) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def rows_setup(model: Optional[str], prof, task: str, **options) -> dict:
    """What makes two rows comparable: the model, the loaded profile's tensors and the method `heads=<f>` names
    (`Profile.rows_fingerprint`), the task and every option that picks or scores its samples."""
    fingerprint = prof.rows_fingerprint() if prof is not None else {"profile_tensors_sha256": None}
    return {"model": model or "embedded", **fingerprint, "task": task, **options}
