"""``leantune bench``: methods head to head on one base, one task and one budget, each job in a fresh process.

The untuned base is evaluated once, in this process. Per method: memory and FLOPs on the efficiency model in a
process that does nothing else (``efficiency``, so its peak RSS is the method's); one process times every
method's training steps and generation, interleaved (``timing``); then a quality run per seed on the pretrained
base (``quality``). Results: ``results.json``, ``results.md`` and plots in the output directory.
"""

from __future__ import annotations

import json
import os
import platform
import queue
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .effmodel import EfficiencyModel
from .timing import median

BENCH_VERSION = 1

# The bench's own settings per method, on top of each method's documented defaults. Options go to the method's
# config. A method whose capabilities say ``schedule_ends`` (Light-PEFT: estimate, then prune) is measured after
# its schedule has finished: the cost of the rest of the run.
BENCH_SETTINGS: dict[str, dict] = {
    "lora": {"options": {"r": 16, "alpha": 32.0, "targets": "all-linear"}},
}
# The default line-up: full FT, LoRA from leantune and from PEFT, BitFit, then the methods leantune adds
# (each only once it is registered).
DEFAULT_METHODS = ["full", "lora", "peft:lora", "bitfit", "s2ft", "lisa", "light_peft"]
# Learning rates the bench uses on its own shipped base. Methods' defaults (Method.default_lr) are set for
# models of billions of parameters and train a 3M-parameter base too slowly in a short budget; these were picked
# by the bench's own sweep (accuracy on 200 held-back training examples of builtin:world; docs/bench.md). Other
# bases get each method's default. ``--default-lrs`` uses the methods' defaults here too.
TUNED_LRS: dict[str, dict[str, float]] = {
    "builtin:base": {"full": 1e-3, "lora": 3e-3, "bitfit": 3e-2, "s2ft": 1e-2, "lisa": 1e-3, "light_peft": 1e-2,
                     # the module methods: two `leantune bench --quick --sweep` runs, around 3e-3 and 3e-2 (docs/bench.md)
                     "houlsby": 9e-3, "pfeiffer": 9e-3, "parallel": 3e-2, "scaled_parallel": 9e-3, "compacter": 3e-2,
                     "compacter_pp": 3e-2, "krona": 3e-2, "ia3": 9e-2,
                     # soft prompts and hybrids: two `--quick --sweep` runs each (docs/bench.md); mam's sweep was flat
                     "prompt_tuning": 9e-2, "prefix_tuning": 1e-3, "prefix_flat": 3.3e-2, "mam": 1e-2, "unipelt": 3e-3,
                     # LN tuning: two `--quick --sweep` runs, around 3e-2 and 9e-2 (docs/bench.md)
                     "ln_tuning": 9e-2},
}
SWEEP_FACTORS = (1 / 3, 1.0, 3.0)  # --sweep: the run's LR (tuned or the method's default) times these


@dataclass
class Budget:
    max_steps: int = 300
    batch_size: int = 16
    max_length: int = 128
    seeds: int = 3
    warmup_steps: int = 0
    lr_schedule: str = "linear"
    eval_samples: int | None = None  # per split; None: the whole split
    val_examples: int = 200  # --sweep: training examples held back to pick the LR (never the test split)


@dataclass
class TimingPlan:
    warmup_rounds: int = 1
    rounds: int = 8
    infer_warmup_rounds: int = 1
    infer_rounds: int = 5


@dataclass
class BenchConfig:
    base: str = "builtin:base"
    task: str = "builtin:world"
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    budget: Budget = field(default_factory=Budget)
    timing: TimingPlan = field(default_factory=TimingPlan)
    efficiency_model: EfficiencyModel = field(default_factory=EfficiencyModel)
    output_dir: str = "bench-results"
    sweep: bool = False
    keep_adapters: bool = False
    tuned_lrs: bool = True  # TUNED_LRS for the base where the bench has them; False: every method's default
    threads: int | None = None  # torch threads in every job (None: torch's default, all cores)
    # Quality runs train a few-M-parameter base on short examples: a second thread gains little there, and on a
    # shared machine OpenMP threads waiting on each other made steps 10x slower. Timing jobs use ``threads``.
    quality_threads: int | None = 1
    device: str | None = None
    quick: bool = False
    suite: str | None = None  # "survey": the line-up of measure/suite.py (its rows come as ``entries``)
    entries: list[dict] | None = None  # labelled runs (label, method, impl, options, lr_key) instead of ``methods``
    tasks: list[str] | None = None  # several tasks: costs measured once, quality per task (None: ``task`` alone)


def _schedule_ends(method: str, options: dict) -> bool:
    """Whether the method, so configured, has a schedule that finishes partway (its capabilities say so)."""
    from ..methods import get_method

    cls = get_method(method)
    return bool(cls(cls.config_cls.from_dict(options, method=method)).capabilities.schedule_ends)


def quick_config(**overrides) -> BenchConfig:
    """The README demo: one seed, a short budget, fewer timing rounds; about 10 minutes on 2 CPU cores."""
    cfg = BenchConfig(budget=Budget(max_steps=150, seeds=1, eval_samples=200),
                      timing=TimingPlan(warmup_rounds=1, rounds=7, infer_warmup_rounds=1, infer_rounds=3), quick=True)
    return replace(cfg, **overrides)


# -- which runs -------------------------------------------------------------------------------------------


def resolve_runs(names: list[str], strict: bool = True, lrs: dict[str, float] | None = None) -> tuple[list[dict], list[str]]:
    """``["full", "lora", "peft:lora", "peft:loha", ...]`` -> run dicts, and notes on names skipped (unregistered
    methods in the default line-up, PEFT not installed). With ``strict`` an unknown name is an error. ``lrs``: a
    learning rate per method name (None or missing: the method's default). ``peft:lora`` is the PEFT anchor
    (method ``lora``, impl ``peft``); ``peft:<type>`` any other PEFT type through the bridge (method ``peft``)."""
    entries = [entry_for_name(raw) for raw in names]
    runs, notes, _missing = resolve_entries(entries, strict=strict, lrs=lrs)
    return runs, notes


def entry_for_name(raw: str) -> dict:
    """One name of a ``--methods`` list -> a run entry: label (the name itself), method, impl, options."""
    impl, _, method = raw.rpartition(":") if ":" in raw else ("leantune", "", raw)
    if impl not in ("leantune", "peft"):
        raise ValueError(f"method {raw!r}: the part before ':' names an implementation, leantune or peft")
    method, _, quant = method.partition("+")  # "lora+nf4": on a quantized base
    if quant:
        _check_quantized_run(raw, impl, method, quant)
        settings = BENCH_SETTINGS.get(method, {})
        return {"label": raw, "method": method, "impl": impl, "options": dict(settings.get("options", {})),
                "lr_key": method, "quantize": quant}
    if impl == "peft" and method != "lora":  # any other PEFT type: the bridge, at PEFT's defaults for the type
        return {"label": raw, "method": "peft", "impl": "peft", "options": {"peft_type": method.upper()},
                "lr_key": "peft"}
    settings = BENCH_SETTINGS.get(method, {})
    return {"label": raw, "method": method, "impl": impl, "options": dict(settings.get("options", {})),
            "lr_key": method}


def run_key(label: str, method: str, impl: str) -> str:
    """The key of a run's jobs and files: ``method@impl`` where the label is the method's plain name (as before
    labels existed), else ``label@impl`` (``lora_qv@leantune``, ``peft_loha@peft``)."""
    plain = label in (method, f"{impl}:{method}")
    return f"{method if plain else label.replace(':', '_')}@{impl}"


def resolve_entries(entries: list[dict], strict: bool = True, lrs: dict[str, float] | None = None,
                    ) -> tuple[list[dict], list[str], list[dict]]:
    """Run entries (label, method, impl, options, lr_key) -> (run dicts, notes, entries not available in this
    install, each with a ``reason``). With ``strict`` an unavailable one is an error instead."""
    from ..methods import get_method

    runs, notes, missing = [], [], []
    for entry in entries:
        label, method, impl = entry["label"], entry["method"], entry["impl"]
        reason = entry.get("unavailable")  # a suite's quantized row whose method refuses a quantized base
        if impl == "peft":
            try:
                import peft  # noqa: F401
            except ImportError:
                if strict:
                    raise ValueError(f"{label} needs Hugging Face peft: pip install 'leantune[interop]'") from None
                reason = "peft is not installed"
        if impl == "peft" and method not in ("lora", "peft"):
            raise ValueError(f"method {label!r}: the PEFT anchor is LoRA only ('peft:lora')")
        if impl == "leantune" or method == "peft":
            try:
                get_method(method)
            except KeyError as e:
                if strict:
                    raise ValueError(e.args[0]) from None
                reason = reason or "not registered in this install"
        if reason is not None:
            notes.append(f"{label} skipped: {reason}")
            missing.append({**entry, "reason": reason})
            continue
        options = dict(entry.get("options", {}))
        if method == "peft":
            try:
                get_method("peft").config_cls.from_dict(options, method="peft")
            except ValueError as e:
                raise ValueError(f"method {label!r}: {e}") from None
        runs.append({"key": run_key(label, method, impl), "label": label, "method": method, "impl": impl,
                     "lr": (lrs or {}).get(entry.get("lr_key", method)), "options": options,
                     "quantize": entry.get("quantize"),
                     "settle": impl == "leantune" and _schedule_ends(method, options)})
    for what in ("key", "label"):
        seen = [r[what] for r in runs]
        dup = sorted({k for k in seen if seen.count(k) > 1})
        if dup:
            raise ValueError(f"methods listed twice: {dup}")
    if not runs and not missing:
        raise ValueError(f"no method to run from {[e['label'] for e in entries]!r}; see `leantune methods`")
    return runs, notes, missing


def _check_quantized_run(raw: str, impl: str, method: str, quant: str) -> None:
    from ..methods import get_method
    from ..quant import QUANT_TYPES

    if quant not in QUANT_TYPES:
        raise ValueError(f"method {raw!r}: after '+' comes a quantization, one of {', '.join(QUANT_TYPES)}")
    if impl != "leantune":
        raise ValueError(f"method {raw!r}: quantized rows run leantune's methods only")
    caps = get_method(method)().capabilities
    if not caps.quantized_base:
        raise ValueError(f"method {raw!r}: {method} does not train on a quantized base: {caps.quantized_refusal}")


def quantized_names(names: list[str], quant: str) -> list[str]:
    """``--quantize nf4``: after each leantune method that trains on a quantized base, its ``+nf4`` row."""
    from ..methods import get_method

    out = []
    for raw in names:
        out.append(raw)
        impl, _, method = raw.rpartition(":") if ":" in raw else ("leantune", "", raw)
        try:
            supported = impl == "leantune" and "+" not in method and get_method(method)().capabilities.quantized_base
        except KeyError:  # not registered: resolve_runs says so
            supported = False
        if supported:
            out.append(f"{raw}+{quant}")
    return out


def quantized_entries(entries: list[dict], quant: str) -> list[dict]:
    """``--quantize nf4`` on a suite (measure/suite.py): after each row, its ``LABEL+nf4`` row on the quantized base; a row whose method
    does not train on a quantized base (or is not leantune's) still comes, with the reason it is not run (a row
    saying so in the report, as rows whose method this install lacks)."""
    from ..methods import get_method
    from ..quant import QUANT_TYPES

    quant = quant.strip().lower()
    if quant not in QUANT_TYPES:
        raise ValueError(f"--quantize {quant!r} is not one of {', '.join(QUANT_TYPES)}")
    out = []
    for e in entries:
        out.append(e)
        q = {**e, "options": dict(e["options"]), "label": f"{e['label']}+{quant}", "quantize": quant}
        if e["impl"] != "leantune":
            q["unavailable"] = f"not run on a {quant} base: quantized rows run leantune's methods only"
        else:
            try:
                cls = get_method(e["method"])
            except KeyError:
                out.append(q)  # the bench says the method is not registered
                continue
            caps = cls(cls.config_cls.from_dict(e["options"], method=e["method"])).capabilities
            if not caps.quantized_base:
                q["unavailable"] = f"does not train on a {quant}-quantized base: {caps.quantized_refusal}"
        out.append(q)
    return out


def method_class(run: dict):
    if run["impl"] == "peft" and run["method"] == "lora":
        from .peft_anchor import PeftLora

        return PeftLora
    from ..methods import get_method

    return get_method(run["method"])


def full_config(run: dict) -> dict:
    cls = method_class(run)
    cfg = cls.config_cls.from_dict(run["options"], method=run["method"]).to_dict()
    cfg.pop("format_version", None)
    return cfg


# -- jobs in subprocesses -----------------------------------------------------------------------------------


class JobFailed(RuntimeError):
    pass


class Progress:
    """One status line: the job, its progress and loss, and an ETA from per-kind estimates that are rescaled
    by how long finished jobs of the same kind really took."""

    def __init__(self, jobs: list[tuple[str, float]], stream=None):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.pending = list(jobs)  # (kind, estimated seconds)
        self.scale: dict[str, list[float]] = {}
        self.t0 = time.perf_counter()
        self.n_total, self.n_done = len(jobs), 0
        self.kind, self.label, self.job_t0, self.estimate = "", "", 0.0, 0.0
        self.last_print = 0.0

    def _factor(self, kind: str) -> float:
        xs = self.scale.get(kind)
        return sum(xs) / len(xs) if xs else 1.0

    def start(self, kind: str, label: str) -> None:
        idx = next((i for i, (k, _) in enumerate(self.pending) if k == kind), None)
        self.kind, self.estimate = kind, (self.pending.pop(idx)[1] if idx is not None else 0.0)
        self.label, self.job_t0 = label, time.perf_counter()
        self._line(f"[{self.n_done + 1}/{self.n_total}] {label}", force=True, newline=not self.tty)

    def update(self, done: int | None = None, total: int | None = None, loss: float | None = None,
               what: str = "") -> None:
        elapsed = time.perf_counter() - self.job_t0
        if done and total:
            left_here = elapsed * (total - done) / done
        else:
            left_here = max(0.0, self.estimate * self._factor(self.kind) - elapsed)
        eta = left_here + sum(s * self._factor(k) for k, s in self.pending)
        parts = [f"[{self.n_done + 1}/{self.n_total}] {self.label}"]
        if what:
            parts.append(what)
        if done and total:
            parts.append(f"{done}/{total}")
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        parts.append(f"ETA {_fmt_s(eta)}")
        self._line(" · ".join(parts))

    def finish(self, note: str = "") -> None:
        took = time.perf_counter() - self.job_t0
        if self.estimate > 0:
            self.scale.setdefault(self.kind, []).append(took / self.estimate)
        self.n_done += 1
        self._line(f"[{self.n_done}/{self.n_total}] {self.label} · done in {_fmt_s(took)}{note}", force=True,
                   newline=True)

    def _line(self, text: str, force: bool = False, newline: bool = False) -> None:
        now = time.perf_counter()
        if not force and (now - self.last_print) < (0.5 if self.tty else 30.0):
            return
        self.last_print = now
        if self.tty:
            width = shutil.get_terminal_size((120, 20)).columns - 1
            self.stream.write("\r" + text[:width].ljust(width) + ("\n" if newline else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _tail_metrics(path: Path, offset: int) -> tuple[int, dict | None]:
    """New complete lines of a training run's metrics.jsonl after ``offset``: (new offset, last row)."""
    try:
        with open(path) as f:
            f.seek(offset)
            chunk = f.read()
    except FileNotFoundError:
        return offset, None
    end = chunk.rfind("\n")
    if end < 0:
        return offset, None
    rows = [json.loads(ln) for ln in chunk[:end].splitlines() if ln.strip()]
    return offset + end + 1, (rows[-1] if rows else None)


def run_job(job: str, spec: dict, work: Path, name: str, progress: Progress, total_steps: int | None = None) -> dict:
    """Run one job in a fresh Python process; its stdout events drive the progress line; stderr goes to a log."""
    work.mkdir(parents=True, exist_ok=True)
    spec_path, out_path, log_path = work / f"{name}.spec.json", work / f"{name}.out.json", work / f"{name}.log"
    spec_path.write_text(json.dumps(spec, indent=1))
    out_path.unlink(missing_ok=True)
    env = {**os.environ, "LEANTUNE_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "leantune.measure.run", job, str(spec_path), str(out_path)]
    lines: queue.Queue = queue.Queue()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        reader = threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True)
        reader.start()
        metrics = Path(spec["train_dir"]) / "metrics.jsonl" if "train_dir" in spec else None
        offset = 0
        while True:
            finished = proc.poll() is not None
            try:
                while True:
                    ln = lines.get_nowait()
                    try:
                        ev = json.loads(ln)
                    except json.JSONDecodeError:
                        log.write(ln)
                        continue
                    progress.update(ev.get("done"), ev.get("total"), ev.get("loss"), ev.get("what", ""))
            except queue.Empty:
                pass
            if metrics is not None:
                offset, row = _tail_metrics(metrics, offset)
                if row is not None and "loss" in row:
                    progress.update(row["step"], total_steps, row["loss"], "training")
            if finished:
                reader.join(timeout=5)
                break
            time.sleep(0.25)
    if proc.returncode != 0 or not out_path.exists():
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        raise JobFailed(f"{job} job {name} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return json.loads(out_path.read_text())


# -- the bench ----------------------------------------------------------------------------------------------


def _estimates(cfg: BenchConfig, runs: list[dict], n_tasks: int = 1) -> list[tuple[str, float]]:
    """Rough seconds per job on a 2-core CPU; rescaled as jobs finish."""
    b = cfg.budget
    n_lr = len(SWEEP_FACTORS) if cfg.sweep else 1
    jobs = [("base", 20.0)] * n_tasks
    for run in runs:
        jobs.append(("efficiency", 15.0 + (40.0 if run["settle"] else 0.0)))
    t = cfg.timing
    turns, infer_turns = t.warmup_rounds + t.rounds, t.infer_warmup_rounds + t.infer_rounds
    jobs.append(("timing", 10.0 + len(runs) * (2 * 1.3 * turns + 2 * 0.8 * infer_turns)))  # two runs per turn
    for _run in runs * n_tasks:
        for _ in range(b.seeds - 1 + n_lr):
            jobs.append(("quality", 15.0 + 0.12 * b.max_steps))
    return jobs


def run_bench(cfg: BenchConfig, stream=None) -> tuple[dict, dict[str, str]]:
    """Run the whole bench; write results.json, results.md and plots into ``cfg.output_dir``. Returns the
    results and the failed jobs ({run key: error}); a failed job leaves its method out and the rest goes on.
    With several ``tasks`` the costs are measured once and each task's quality, report and plots go to a folder of
    its own; the top folder gets the ranking per task and by mean accuracy (report.write_suite_summary), and the
    returned results are ``{task: results}``."""
    out = Path(cfg.output_dir)
    work = out / "work"
    out.mkdir(parents=True, exist_ok=True)
    lrs = TUNED_LRS.get(cfg.base) if cfg.tuned_lrs else None
    if cfg.entries is not None:  # labelled rows (a suite): one not available in this install is a row saying so
        runs, notes, missing = resolve_entries(cfg.entries, strict=False, lrs=lrs)
    else:
        runs, notes = resolve_runs(cfg.methods, strict=cfg.methods != DEFAULT_METHODS, lrs=lrs)
        missing = []
    tasks = list(cfg.tasks or [cfg.task])
    b = cfg.budget
    if b.seeds < 1 or b.max_steps < 1:
        raise ValueError(f"bench: seeds and max_steps must be >= 1 (got seeds={b.seeds}, max_steps={b.max_steps})")
    stream = stream or sys.stdout
    progress = Progress(_estimates(cfg, runs, len(tasks)), stream)
    common = {"threads": cfg.threads, "device": cfg.device}
    quality_common = {**common, "threads": cfg.threads or cfg.quality_threads}
    t_start = time.perf_counter()
    failed: dict[str, str] = {}

    def attempt(key, fn):
        try:
            return fn()
        except JobFailed as e:
            failed[key] = str(e)
            progress.finish(" · FAILED (see results.md)")
            return None

    # 1. the untuned base on each task (in this process: it measures nothing but accuracy and loss)
    from .run import job_base

    bases = {}
    for task in tasks:
        progress.start("base", f"base {cfg.base} on {task}")
        bases[task] = job_base({**quality_common, "base": cfg.base, "task": task, "eval_samples": b.eval_samples})
        progress.finish(f" · accuracy {bases[task]['accuracy']:.3f}")

    # 2. efficiency: one fresh process per method
    eff_spec = asdict(cfg.efficiency_model)
    eff: dict[str, dict] = {}
    for run in runs:
        key = run["key"]
        progress.start("efficiency", f"efficiency {_label(run)}")
        spec = {**common, "run": run, "efficiency_model": eff_spec, "max_steps": b.max_steps,
                "adapter_dir": str(work / "efficiency" / key)}
        res = attempt(key, lambda spec=spec, key=key: run_job("efficiency", spec, work, f"efficiency-{key}", progress))
        if res is not None:
            eff[key] = res
            progress.finish(f" · peak {res['memory']['peak'] / 2**20:.0f} MiB, "
                            f"{res['train_flops_per_step'] / 1e9:.2f} GFLOP/step")

    # 3. timing: every measured method in one process, steps and generation interleaved
    timed = {r["key"]: {**r, "adapter_dir": eff[r["key"]]["adapter_dir"] if eff[r["key"]]["settle_steps"] else None}
             for r in runs if r["key"] in eff}
    timing = None
    if timed:
        progress.start("timing", f"timing {len(timed)} methods, interleaved")
        spec = {**common, "runs": timed, "efficiency_model": eff_spec, "max_steps": b.max_steps, **asdict(cfg.timing)}
        timing = attempt("timing", lambda: run_job("timing", spec, work, "timing", progress))
        if timing is not None:
            progress.finish()
    if not cfg.keep_adapters:
        shutil.rmtree(work / "efficiency", ignore_errors=True)

    # 4. quality: one fresh process per method, task and seed (and LR, with --sweep)
    per_task, dirs = {}, {}
    for task in tasks:
        task_out = out if len(tasks) == 1 else out / task.removeprefix("builtin:").replace(":", "_").replace("/", "_")
        task_out.mkdir(parents=True, exist_ok=True)
        sub = "" if len(tasks) == 1 else f"{task_out.name}-"
        quality = _quality_runs(cfg, runs, task, quality_common, work, task_out, sub, progress, failed, attempt)
        task_cfg = replace(cfg, task=task)
        results = assemble(task_cfg, runs, bases[task], eff, timing, quality, missing)
        (task_out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        from .report import write_plots, write_report

        plots = write_plots(results, task_out)
        write_report(results, task_out, plots=plots, notes=notes, failed=failed,
                     wall_s=(time.perf_counter() - t_start) if len(tasks) == 1 else None)
        per_task[task], dirs[task] = results, task_out.relative_to(out).as_posix()
    if not cfg.keep_adapters:
        shutil.rmtree(work / "train", ignore_errors=True)
    wall = time.perf_counter() - t_start
    if len(tasks) > 1:
        from .report import write_suite_summary

        write_suite_summary(cfg.suite or "bench", per_task, dirs, out, missing, wall_s=wall)
    stream.write(f"\nbench finished in {_fmt_s(wall)}: {out / 'results.json'}, {out / 'results.md'}"
                 + (f" ({len(tasks)} tasks, one folder each)" if len(tasks) > 1 else "") + "\n")
    if failed:
        stream.write(f"{len(failed)} job(s) failed: {', '.join(sorted(failed))} (details in results.md)\n")
    if missing:
        stream.write(f"{len(missing)} row(s) not available in this build: "
                     f"{', '.join(m['label'] for m in missing)}\n")
    stream.flush()
    return (per_task[tasks[0]] if len(tasks) == 1 else per_task), failed


def _quality_runs(cfg, runs, task, quality_common, work, task_out, sub, progress, failed, attempt) -> dict:
    """Quality runs of every method on one task: {(key, seed): result}."""
    b = cfg.budget
    quality: dict[tuple[str, int], dict] = {}
    for run in runs:
        key = run["key"]
        if key in failed:  # no efficiency figures: the run cannot make a row
            continue
        run_lr = run["lr"] if run["lr"] is not None else method_class(run).default_lr
        lrs = [run_lr * f for f in SWEEP_FACTORS] if cfg.sweep else [run_lr]
        val = b.val_examples if cfg.sweep else 0
        chosen, sweep_log = run_lr, []  # seeds after the first train at the LR the sweep picked (or the run's)
        for seed in range(b.seeds):
            for lr in (lrs if seed == 0 else [chosen]):
                label = f"quality {_label(run)}{' on ' + task if sub else ''} seed {seed} lr {lr:.2g}"
                progress.start("quality", label)
                train_dir = work / "train" / f"{sub}{key}-s{seed}" / f"lr{lr:.3g}"
                spec = {**quality_common, "run": run, "base": cfg.base, "task": task, "seed": seed, "lr": lr,
                        "budget": asdict(b), "eval_samples": b.eval_samples, "val_examples": val,
                        "train_dir": str(train_dir)}
                res = attempt(key, lambda spec=spec, name=train_dir.relative_to(work).as_posix().replace("/", "-"):
                              run_job("quality", spec, work, name, progress, b.max_steps))
                if res is None:
                    break
                progress.finish(f" · loss {res['final_loss']:.4f}, accuracy {res['accuracy']:.3f}")
                if seed == 0 and cfg.sweep:
                    sweep_log.append({"lr": res["lr"], "val_accuracy": res.get("val_accuracy"),
                                      "final_loss": res["final_loss"], "result": res})
                else:
                    quality[(key, seed)] = res
            if key in failed:
                break
            if seed == 0 and cfg.sweep:
                best = max(sweep_log, key=lambda s: (s["val_accuracy"], -s["final_loss"]))
                chosen = best["lr"]
                quality[(key, 0)] = best["result"]
                (task_out / "sweep").mkdir(exist_ok=True)
                (task_out / "sweep" / f"{key}.json").write_text(json.dumps(
                    [{k: v for k, v in s.items() if k != "result"} for s in sweep_log], indent=1))
    return quality


def _label(run: dict) -> str:
    plain = run.get("label", run["method"]) in (run["method"], f"{run['impl']}:{run['method']}")
    return f"{run['method']} ({run['impl']})" if plain else f"{run['label']} ({run['impl']})"


def assemble(cfg: BenchConfig, runs, base, eff, timing, quality, missing: list[dict] | None = None) -> dict:
    """results.json in the schema of issue 4, with a ``label`` per run (issue 14); a suite's results also say
    which suite and which of its rows are not available in this install (``unavailable``)."""
    b = cfg.budget
    tokens = timing["tokens_per_step"] if timing else cfg.efficiency_model.batch_size * cfg.efficiency_model.seq_len
    base_lat = median(timing["base_latency_s"]) if timing else None
    out_runs = []
    for run in runs:
        key = run["key"]
        e = eff.get(key)
        if e is None:
            continue
        step = median(timing["step_time_s"].get(key, [])) if timing else None
        lat = median(timing["latency_s"].get(key, [])) if timing else None
        lat_m = median(timing["latency_merged_s"].get(key, [])) if timing else None
        for seed in range(b.seeds):
            q = quality.get((key, seed))
            if q is None:
                continue
            forgetting = (q["heldout_loss"] - base["heldout_loss"]
                          if q.get("heldout_loss") is not None and base.get("heldout_loss") is not None else None)
            quant = run.get("quantize")
            out_runs.append({  # a quantized row: label "lora+nf4", and its quantization
                "method": run["method"], "impl": run["impl"], "label": run["label"], "config": full_config(run),
                **({"quantize": quant} if quant else {}),
                "trainable_params": e["trainable_params"], "changed_params": e["changed_params"],
                "adapter_bytes": e["adapter_bytes"], "memory": e["memory"],
                "train_flops_per_step": e["train_flops_per_step"], "train_flops": e["train_flops"],
                "seed": seed, "lr": q["lr"],
                "step_time_s": step, "tokens_per_s": (tokens / step) if step else None,
                "infer": {"latency_s": lat, "latency_merged_s": lat_m,
                          "overhead": (lat / base_lat) if (lat and base_lat) else None},
                "quality": {"accuracy": q["accuracy"], "accuracy_shifted": q["accuracy_shifted"],
                            "forgetting": forgetting},
            })
    eff_model = cfg.efficiency_model.describe()
    eff_model.update(_param_counts(cfg.efficiency_model))
    eff_model["measured_on"] = (timing or next(iter(eff.values()), {})).get("device")
    if timing:
        eff_model.update({"threads": timing["threads"], "tokens_per_step": tokens, "base_latency_s": base_lat,
                          "base_latency_merged_s": median(timing["base_latency_merged_s"]), "timing": asdict(cfg.timing)})
    eff_model["settle_steps"] = {k: v["settle_steps"] for k, v in eff.items() if v.get("settle_steps")}
    eff_model["peak_before_model"] = {k: v["peak_before_model"] for k, v in eff.items()}
    results = {
        "bench_version": BENCH_VERSION,
        "machine": machine_info(),
        "versions": versions(),
        "git_commit": git_commit(),
        "base": {"name": base["name"], "params": base["params"], "accuracy": base["accuracy"]},
        "efficiency_model": eff_model,
        "task": cfg.task,
        "budget": {**asdict(b), "seeds": list(range(b.seeds)), "quick": cfg.quick,
                   "quality_threads": cfg.threads or cfg.quality_threads,
                   "lrs": _lr_source(cfg, runs),
                   "sweep": list(SWEEP_FACTORS) if cfg.sweep else None},
        "runs": out_runs,
    }
    if cfg.suite:
        results["suite"] = cfg.suite
        results["unavailable"] = [{k: m[k] for k in ("label", "method", "impl", "reason", "quantize") if m.get(k)}
                                  for m in missing or []]
    return results


def _lr_source(cfg: BenchConfig, runs: list[dict]) -> str:
    tuned = [r["lr"] is not None for r in runs]
    if not any(tuned):
        return "method defaults"
    return f"tuned for {cfg.base}" + ("" if all(tuned) else " where the bench has them, else method defaults")


def _param_counts(spec: EfficiencyModel) -> dict:
    """Parameter counts of the efficiency model, built on the meta device (no memory, no time)."""
    import torch

    with torch.device("meta"):
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(spec.config())
    blocks = sum(p.numel() for p in model.model.layers.parameters())
    return {"params": sum(p.numel() for p in model.parameters()), "block_params": blocks}


def machine_info() -> dict:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version()}
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("leantune", "torch", "transformers", "accelerate", "peft", "safetensors", "tokenizers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def git_commit() -> str | None:
    """The commit of the leantune checkout this runs from ("+dirty" with local changes), None outside git."""
    root = Path(__file__).resolve().parents[3]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


# -- from the command line ----------------------------------------------------------------------------------


def parse_efficiency_model(text: str | None, start: EfficiencyModel | None = None) -> EfficiencyModel:
    """``"hidden=256,layers=4"`` -> an EfficiencyModel with those fields changed."""
    spec = start or EfficiencyModel()
    if not text:
        return spec
    known = set(asdict(spec))
    changes = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise ValueError(f"--efficiency-model: {item!r} must be key=integer with key one of {sorted(known)}")
        try:
            changes[key] = int(value)
        except ValueError:
            raise ValueError(f"--efficiency-model: {key}={value!r} is not an integer") from None
    return replace(spec, **changes)


def config_from_options(*, quick: bool = False, base: str | None = None, task: str | None = None,
                        methods: str | None = None, max_steps: int | None = None, seeds: int | None = None,
                        batch_size: int | None = None, eval_samples: int | None = None,
                        output_dir: str | None = None, sweep: bool = False, efficiency_model: str | None = None,
                        timing_rounds: int | None = None, keep_adapters: bool = False, threads: int | None = None,
                        default_lrs: bool = False, device: str | None = None,
                        preset: BenchConfig | None = None, quantize: str | None = None) -> BenchConfig:
    """The CLI's flags -> a BenchConfig (``--quick`` picks the demo preset, ``preset`` another one, e.g. a suite's
    from measure/suite.py; flags override it)."""
    cfg = preset or (quick_config() if quick else BenchConfig())
    if cfg.entries is not None:  # a suite: its own line-up, and --task narrows its tasks to one
        if methods:
            raise ValueError(f"--suite {cfg.suite} runs its own line-up; leave out --methods ({methods!r})")
        if task:
            cfg = replace(cfg, tasks=[task])
    budget, timing = cfg.budget, cfg.timing
    budget = replace(budget, **{k: v for k, v in (("max_steps", max_steps), ("seeds", seeds),
                                                  ("batch_size", batch_size), ("eval_samples", eval_samples))
                                if v is not None})
    if timing_rounds is not None:
        if timing_rounds < 1:
            raise ValueError(f"--timing-rounds must be >= 1, got {timing_rounds}")
        timing = replace(timing, rounds=timing_rounds, infer_rounds=timing_rounds)
    names = [m.strip() for m in methods.split(",") if m.strip()] if methods else cfg.methods
    if quantize:
        names = quantized_names(names, quantize.strip().lower())
        if cfg.entries is not None:  # a suite: each row and its quantized row
            cfg = replace(cfg, entries=quantized_entries(cfg.entries, quantize))
            names = [e["label"] for e in cfg.entries]
    return replace(cfg, base=base or cfg.base, task=task or cfg.task, methods=names, budget=budget, timing=timing,
                   efficiency_model=parse_efficiency_model(efficiency_model, cfg.efficiency_model),
                   output_dir=output_dir or ("bench-quick" if quick and preset is None else cfg.output_dir), sweep=sweep,
                   keep_adapters=keep_adapters, tuned_lrs=not default_lrs, threads=threads, device=device)
