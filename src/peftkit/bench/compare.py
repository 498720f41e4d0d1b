"""Train several methods on one model and task under the same budget: `peftkit compare`.

Each method runs as the command a user types, `peftkit train --method NAME --model M --task T ...`,
in its own subprocess, one after the other, so that every run's numbers are its own:

- peak memory: the child process's resident-set high-water mark from the kernel (``wait4``'s
  ``ru_maxrss``), in MiB. It is RSS: weights, activations, optimizer state, Python and torch
  themselves; not GPU memory (the run's metrics.json has ``peak_cuda_memory_mb`` for that);
- accuracy, trainable parameters and share, adapter file size, steps: the run's ``job.json``;
- time per step: the median over the run's optimizer steps (``median_step_time_s`` in its
  ``metrics.json``; forward, backward and optimizer, evaluation excluded);
- wall time: the whole child process, start to exit.

A method that cannot apply to the model is *skipped* with the reason, decided before launching:
the method's default config wraps a weightless (meta-device) copy of the model, and the
``PeftkitError`` that wrapping raises (no key/value cache for prefix tuning, no module matching the
targets, a bottleneck wider than the model, ...) is the reason. An unknown method name is skipped
with the list of known ones. A run that fails is *failed* with its last error line; the others go
on. A finished run leaves ``compare_row.json`` in its folder: running the same comparison again
keeps that row instead of training again (delete the run folder to measure it afresh); a run that
was interrupted is started over.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError

# The methods the README's comparison shows (one of each family); `--methods all` runs every method.
DEFAULT_METHODS = ("full", "lora", "dora", "ia3", "adapter", "prefix", "prompt", "bitfit", "sparse", "freeze")
ROW_FILENAME = "compare_row.json"
STATUSES = ("ok", "skipped", "failed")


@dataclasses.dataclass(frozen=True)
class Budget:
    """The same budget for every method: optimizer steps, minutes of training, or (neither) each
    method's default number of epochs (``peftkit.train.job.default_epochs``)."""

    max_steps: int | None = None
    max_minutes: float | None = None

    def __post_init__(self) -> None:
        if self.max_steps is not None and (isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int)
                                           or self.max_steps < 1):
            raise PeftkitError(f"--max-steps must be a whole number >= 1, got {self.max_steps!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise PeftkitError(f"--max-minutes must be > 0, got {self.max_minutes!r}")

    def train_arguments(self) -> list[str]:
        arguments = []
        if self.max_steps is not None:
            arguments += ["--max-steps", str(self.max_steps)]
        if self.max_minutes is not None:
            arguments += ["--max-minutes", f"{self.max_minutes:g}"]
        return arguments

    def describe(self, method: str | None = None) -> str:
        from peftkit.train.job import default_epochs

        parts = []
        if self.max_steps is not None:
            parts.append(f"{self.max_steps} steps")
        if self.max_minutes is not None:
            parts.append(f"{self.max_minutes:g} min of training")
        if not parts:
            if method is None:
                return "each method's default epochs"
            return f"{default_epochs(method):g} epochs (the method's default)"
        return " or ".join(parts) + (" (whichever comes first)" if len(parts) == 2 else "")


def peftkit_command() -> list[str]:
    """How to start `peftkit` as a child: the console script beside this Python (a venv's bin), else the module."""
    script = Path(sys.executable).parent / "peftkit"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "peftkit.cli"]


def run_measured(command: Sequence[str], log_path: str | os.PathLike, *, echo: bool = False,
                 cwd: str | os.PathLike | None = None) -> tuple[float, float, int]:
    """Run `command`, its output (stdout and stderr) into `log_path` and, with `echo`, also to our stderr.

    Returns (wall seconds, peak RSS of the child in MiB, exit code; negative: killed by that signal).
    """
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"} if echo else None
    with open(log_path, "wb") as log:
        started = time.perf_counter()
        process = subprocess.Popen(list(command), cwd=cwd, stdout=subprocess.PIPE if echo else log,
                                   stderr=subprocess.STDOUT, env=environment)
        if echo:
            # Bytes as they come (tqdm redraws its bar with carriage returns, not lines).
            terminal = getattr(sys.stderr, "buffer", None)
            for chunk in iter(lambda: os.read(process.stdout.fileno(), 4096), b""):
                log.write(chunk)
                if terminal is not None:
                    terminal.write(chunk)
                    terminal.flush()
            process.stdout.close()
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here; Popen must not wait again
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    peak_mib = usage.ru_maxrss / 2**20 if sys.platform == "darwin" else usage.ru_maxrss / 2**10
    return wall, peak_mib, process.returncode


def last_error_line(log_text: str, exit_code: int) -> str:
    """The line of a failed run's output that says what went wrong, with the exit code."""
    lines = [line.strip() for line in re.split(r"[\r\n]", log_text) if line.strip()]
    chosen = next((line for line in reversed(lines) if line.startswith("peftkit: error:")), None)
    if chosen is None:  # a traceback ends with "SomeError: message"
        chosen = next((line for line in reversed(lines) if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", line)), None)
    if chosen is None:
        chosen = lines[-1] if lines else "(no output)"
    if exit_code < 0:
        import signal

        name = signal.Signals(-exit_code).name if -exit_code in signal.Signals._value2member_map_ else str(-exit_code)
        hint = " (out of memory?)" if -exit_code == signal.SIGKILL else ""
        return f"killed by {name}{hint}; last output: {chosen}"
    return f"{chosen} (exit code {exit_code})"


def skip_reason(method: str, model: str) -> str | None:
    """Why `method` cannot apply to `model`, or None when it can (or when only training can tell).

    Raises PeftkitError when the model itself cannot be found (then no method can run). The check
    wraps a meta-device copy of the model (no weights, no memory) with the method's default config:
    wrapping is where peftkit raises PeftkitError for a method that does not fit the model. Any
    other error of the weightless copy says nothing about the method, and the run decides.
    """
    from peftkit.train.job import list_methods, method_config

    if method not in list_methods():
        return f"unknown method {method!r}; methods: {', '.join(list_methods())}"
    import torch
    import transformers

    from peftkit import zoo
    from peftkit.model import get_peft_model

    if zoo.model_kind(model) == "image":
        return _image_skip_reason(method, model)
    folder = zoo.resolve_model(model)
    causal = zoo.model_kind(model) == "causal"
    try:
        if causal:
            from peftkit.train.instruct import causal_method_config

            config = causal_method_config(method)
            model_config = transformers.AutoConfig.from_pretrained(folder)
            auto = transformers.AutoModelForCausalLM
        else:
            config = method_config(method)
            model_config = transformers.AutoConfig.from_pretrained(folder, num_labels=2)
            auto = transformers.AutoModelForSequenceClassification
        with torch.device("meta"):
            weightless = auto.from_config(model_config)
    except Exception:  # noqa: BLE001 - the child run will report what is wrong, in full
        return None
    try:
        get_peft_model(weightless, config)
    except PeftkitError as error:
        return str(error)
    except Exception:  # noqa: BLE001 - e.g. an initialisation that reads weights, which meta tensors lack
        return None
    return None


def _image_skip_reason(method: str, model: str) -> str | None:
    """skip_reason for an image classifier: its meta-device copy wrapped with the image job's config."""
    import torch
    import transformers

    from peftkit import zoo
    from peftkit.model import get_peft_model
    from peftkit.train.image_job import image_method_config
    from peftkit.vision.efficientnet import EfficientNetLiteConfig, EfficientNetLiteForImageClassification
    from peftkit.vision.models import is_efficientnet_lite_folder

    try:
        with torch.device("meta"):
            if model in zoo.list_models() or is_efficientnet_lite_folder(Path(model)):
                weightless = EfficientNetLiteForImageClassification(EfficientNetLiteConfig(num_labels=2))
            else:
                config = transformers.AutoConfig.from_pretrained(model, num_labels=2)
                weightless = transformers.AutoModelForImageClassification.from_config(config)
        config = image_method_config(method, weightless)
    except Exception:  # noqa: BLE001 - the child run will report what is wrong, in full
        return None
    try:
        get_peft_model(weightless, config)
    except PeftkitError as error:
        return str(error)
    except Exception:  # noqa: BLE001 - e.g. an initialisation that reads weights, which meta tensors lack
        return None
    return None


def measurement_context() -> dict[str, Any]:
    """Where and with what a run is measured: hardware, software versions, peftkit's git commit."""
    import accelerate
    import torch
    import transformers

    import peftkit

    gpu = None
    if torch.cuda.is_available():
        gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "gpu": gpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "peftkit": peftkit.__version__,
        "git_commit": _git_commit(Path(peftkit.__file__).resolve().parent),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit(source: Path) -> str | None:
    """Short commit of the checkout peftkit runs from, "+ uncommitted changes" when it differs; None if not a checkout."""
    git = shutil.which("git")
    root = next((p for p in (source, *source.parents) if (p / ".git").exists()), None)
    if git is None or root is None:
        return None
    try:
        commit = subprocess.run([git, "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        changed = subprocess.run([git, "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "src"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit} + uncommitted changes" if changed else commit


def train_command(method: str, model: str, task: str, run_dir: Path, budget: Budget, seed: int,
                  train_args: Sequence[str] = ()) -> list[str]:
    """The `peftkit train` arguments of one method's run (without the executable and --no-progress)."""
    return ["train", "--method", method, "--model", model, "--task", task, "--output-dir", str(run_dir),
            "--seed", str(seed), *budget.train_arguments(), *train_args]


def _learning_rate(method: str, train_args: Sequence[str]) -> float:
    from peftkit.train.job import default_learning_rate

    arguments = list(train_args)
    if "--lr" in arguments and arguments.index("--lr") + 1 < len(arguments):
        return float(arguments[arguments.index("--lr") + 1])
    return default_learning_rate(method)


def saved_config(adapter_dir: Path) -> dict:
    """The config a run saved: adapter_config.json, or peftkit_full_finetune.json for full fine-tuning."""
    for name in ("adapter_config.json", "peftkit_full_finetune.json"):
        if (adapter_dir / name).is_file():
            return json.loads((adapter_dir / name).read_text(encoding="utf-8"))
    return {}


def _load_average() -> str | None:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return None


def _base_row(method: str, status: str, reason: str | None, seed: int, budget: Budget, context: dict) -> dict[str, Any]:
    return {"method": method, "status": status, "reason": reason, "seed": seed, "budget": budget.describe(
        method if status != "skipped" or reason is None or not reason.startswith("unknown") else None),
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "context": context}


def run_method(method: str, *, model: str, task: str, run_dir: Path, budget: Budget, seed: int = 0,
               train_args: Sequence[str] = (), progress: bool = False, echo: bool = False,
               context: dict | None = None) -> dict[str, Any]:
    """Train one method as a `peftkit train` child (or keep its finished row); return its row.

    The child's output goes to `<run_dir>.log`, with its progress bar when `progress`; `echo` also
    shows it on our stderr as it comes.
    """
    context = context if context is not None else measurement_context()
    arguments = train_command(method, model, task, run_dir, budget, seed, train_args)
    command_text = shlex.join(["peftkit", *arguments])
    row_file = run_dir / ROW_FILENAME
    if row_file.is_file():
        try:
            kept = json.loads(row_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            kept = None
        if kept and kept.get("command") == command_text and kept.get("status") == "ok":
            return {**kept, "kept_from_earlier_run": True}
    if run_dir.exists():  # an interrupted or different run: start over, so every number is from one run
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = run_dir.parent / f"{run_dir.name}.log"
    launched = peftkit_command() + arguments + ([] if progress else ["--no-progress"])
    load_before = _load_average()
    started_at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    wall, peak_mib, exit_code = run_measured(launched, log_path, echo=echo)
    row = _base_row(method, "ok", None, seed, budget, context)
    row.update(measured_at=started_at, command=command_text, run_dir=str(run_dir), log=str(log_path),
               exit_code=exit_code, wall_time_s=wall, peak_rss_mib=peak_mib, load_average_before=load_before,
               learning_rate=_learning_rate(method, train_args))
    job_file, metrics_file = run_dir / "job.json", run_dir / "metrics.json"
    if exit_code != 0 or not job_file.is_file():
        row.update(status="failed", reason=last_error_line(log_path.read_text(encoding="utf-8", errors="replace"), exit_code))
        return row
    job = json.loads(job_file.read_text(encoding="utf-8"))
    metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.is_file() else {}
    accuracy_key = "validation_accuracy" if "validation_accuracy" in job else "validation_token_accuracy"
    row.update(
        accuracy=job.get(accuracy_key), accuracy_metric=accuracy_key.replace("_", " "),
        trainable_parameters=job["trainable_parameters"], total_parameters=job["total_parameters"],
        trainable_share=job["trainable_share"], adapter_bytes=job["adapter_bytes"], steps=job["steps"],
        train_time_s=job["train_time_s"], median_step_time_s=metrics.get("median_step_time_s"),
        stopped_by_time_limit=metrics.get("stopped_by_time_limit", False), best_step=metrics.get("best_step"),
        peak_cuda_memory_mb=metrics.get("peak_cuda_memory_mb"), config=saved_config(Path(job["adapter_dir"])),
    )
    from peftkit.io import write_json

    write_json(row_file, row)
    return row


def parse_methods(text: str | Sequence[str]) -> list[str]:
    """'full,lora' or ['full', 'lora'] -> the names in order, once each; 'all' -> every method."""
    from peftkit.train.job import list_methods

    names = [part.strip() for part in (text.split(",") if isinstance(text, str) else text) if part.strip()]
    if not names:
        raise PeftkitError(f"--methods is empty; name methods, e.g. {','.join(DEFAULT_METHODS)} (or all)")
    expanded: list[str] = []
    for name in names:
        for method in (["full", *[m for m in list_methods() if m != "full"]] if name == "all" else [name]):
            if method not in expanded:
                expanded.append(method)
    return expanded


def compare(model: str, task: str, methods: Sequence[str], output_dir: str | os.PathLike, *,
            budget: Budget = Budget(), seed: int = 0, runs_dir: str | os.PathLike | None = None,
            train_args: Sequence[str] = (), progress: bool = False, echo: bool = False, command: str | None = None,
            log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train each of `methods` on `model` / `task` under `budget`; write the reports; return the rows.

    Runs go to `runs_dir` (default: `output_dir/runs`), one folder and one log per method. After
    every method the reports in `output_dir` are rewritten (results.md/.csv/.json, the plots,
    report.html), so an interrupted comparison keeps what it measured. `train_args` are further
    `peftkit train` options given to every run (e.g. ["--max-train-examples", "2000"]); `command`
    is the command line to record in the reports. `progress`: the runs' progress bars, in their
    logs and, with `echo`, on stderr.
    """
    from peftkit import zoo
    from peftkit.bench.report import write_reports

    methods = parse_methods(methods)
    if model in zoo.BUILTIN_MODELS and zoo.BUILTIN_MODELS[model].kind == "image":
        zoo.BUILTIN_MODELS[model].weights_file()  # its package must be installed
    else:
        zoo.resolve_model(model)  # an unknown model stops everything, with the built-in names
    _check_task(task)
    output_dir = Path(output_dir)
    runs = Path(runs_dir) if runs_dir is not None else output_dir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    if runs.resolve().is_relative_to(output_dir.resolve()) and not (runs / ".gitignore").exists():
        (runs / ".gitignore").write_text("# training runs of `peftkit compare` (weights, checkpoints, logs)\n*\n")
    context = measurement_context()
    settings = {"model": model, "task": task, "methods": methods, "budget": budget.describe(), "seed": seed,
                "train_args": list(train_args), "runs_dir": str(runs),
                "command": command or _python_call(model, task, methods, budget, seed)}
    rows: list[dict[str, Any]] = []
    for position, method in enumerate(methods, start=1):
        prefix = f"[{position}/{len(methods)}] {method}"
        reason = skip_reason(method, model)
        if reason is not None:
            row = _base_row(method, "skipped", reason, seed, budget, context)
        else:
            if echo:
                log(f"{prefix}: training ({budget.describe(method)})")
            row = run_method(method, model=model, task=task, run_dir=runs / method, budget=budget, seed=seed,
                             train_args=train_args, progress=progress, echo=echo, context=context)
        rows.append(row)
        log(f"{prefix}: {_status_line(row)}")
        write_reports(rows, settings, output_dir)
    return rows


def _status_line(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row['reason']}"
    accuracy = "n/a" if row.get("accuracy") is None else f"{100 * row['accuracy']:.2f}%"
    step = row.get("median_step_time_s")
    kept = " (finished earlier, kept)" if row.get("kept_from_earlier_run") else ""
    return (f"ok{kept}: {row['accuracy_metric']} {accuracy}, {100 * row['trainable_share']:.3g}% trainable, "
            f"{row['steps']} steps, {'' if step is None else f'{1000 * step:.0f} ms/step, '}"
            f"peak RSS {row['peak_rss_mib']:,.0f} MiB, {row['wall_time_s']:.0f} s")


def _check_task(task: str) -> None:
    from peftkit import zoo
    from peftkit.train.chat import list_instruct_tasks
    from peftkit.vision.data import list_image_tasks

    if task in zoo.list_tasks() or task in list_instruct_tasks() or task in list_image_tasks() or Path(task).expanduser().exists():
        return
    zoo.load_task(task)  # raises the error that names the built-in tasks and the accepted files


def _python_call(model: str, task: str, methods: Sequence[str], budget: Budget, seed: int) -> str:
    return (f"peftkit.bench.compare({model!r}, {task!r}, {list(methods)!r}, budget={budget!r}, seed={seed})")
