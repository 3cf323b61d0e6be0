"""Shared helpers of the benchmark scripts (imported by them; not a benchmark itself).

* random Llama-architecture models with PEFT LoRA, and token batches;
* interleaved timing with per-call peak memory;
* worker subprocesses (a fresh process per measured group, with an allocator set up so that
  resident memory follows the live tensors);
* JSON results and the markdown tables of ``docs/benchmarks.md``.

Peak memory on CPU is the rise of the resident set during one call: ``/proc/self/clear_refs``
resets the high-water mark ``VmHWM`` to the current ``VmRSS`` just before the call and ``VmHWM``
is read just after it. glibc keeps freed memory for reuse, which would hide a call's allocations
behind memory freed by an earlier one, so memory is measured in its own worker process, started
with ``MALLOC_MMAP_THRESHOLD_=65536`` and ``MALLOC_TRIM_THRESHOLD_=0``: every allocation of 64 KiB
or more is then a fresh ``mmap`` returned to the system when freed, and the resident set follows
the live tensors. Those settings slow allocation down (page faults), which is why times come
from a separate worker with glibc's defaults. On CUDA, ``torch.cuda.max_memory_allocated``
over a timed call is used instead.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS_PAGE = ROOT / "docs" / "benchmarks.md"
for _folder in (ROOT, ROOT / "tests"):  # flaplace from the checkout; the shared tiny models
    if str(_folder) not in sys.path:
        sys.path.append(str(_folder))

from tiny_models import llama_lora_model  # noqa: E402,F401  (re-exported for the benchmarks)

#: Environment of the memory workers (see the module docstring).
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}

#: Token ids whose last-position logits are the classes (a 4-way multiple choice).
ANSWER_IDS = (3, 5, 7, 11)


# ------------------------------------------------------------------------------------------------
# Models and batches
# ------------------------------------------------------------------------------------------------


def quiet() -> None:
    """Silence the warnings that Hugging Face and functorch print on every call."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a bench dependency
        pass


def token_batch(
    batch: int, seq: int, *, vocab: int = 1024, seed: int = 1, device: str = "cpu", mask: bool = True
) -> dict[str, torch.Tensor]:
    """Random token ids without padding, labels in ``0..len(ANSWER_IDS)-1``; optionally an all-ones mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    out = {"input_ids": ids.to(device)}
    if mask:
        out["attention_mask"] = torch.ones_like(out["input_ids"])
    out["labels"] = torch.randint(0, len(ANSWER_IDS), (batch,), generator=g).to(device)
    return out


def lora_module_names(model: torch.nn.Module) -> list[str]:
    """Names of the LoRA ``nn.Linear`` modules (``...q_proj.lora_A.default`` etc.), in model order."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".lora_" in name
    ]


# ------------------------------------------------------------------------------------------------
# Timing and memory
# ------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    if match is None:
        raise OSError(f"{field} not in /proc/self/status")
    return int(match.group(1))


class PeakMemory:
    """Peak memory of one call in MiB: resident-set rise on CPU, allocator peak on CUDA."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.available = True
        if not self.cuda:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                _status_kib("VmHWM")
            except OSError:
                self.available = False
        self.start = 0.0

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated() / 2**20
        elif self.available:
            Path("/proc/self/clear_refs").write_text("5")
            self.start = _status_kib("VmRSS") / 1024

    def peak(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20 - self.start
        if not self.available:
            return float("nan")
        return _status_kib("VmHWM") / 1024 - self.start


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(
    cases: dict[Hashable, Callable[[], object]],
    *,
    repeats: int,
    warmup: int = 1,
    device: str = "cpu",
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[Hashable, dict[str, Any]]:
    """Time every case ``repeats`` times, interleaved: each round calls all cases in a new random order.

    Other jobs on the machine slow all cases of a round alike, so ratios between cases stay
    meaningful under background load. Returns, per case, ``median_s``, ``times`` and ``peak_mb``
    (the largest per-call peak; only meaningful on CUDA, see :func:`peak_memory` for CPU).
    """
    memory = PeakMemory(device)
    order = list(cases)
    rng = random.Random(seed)
    times: dict[Hashable, list[float]] = {key: [] for key in order}
    peaks: dict[Hashable, list[float]] = {key: [] for key in order}
    for round_ in range(warmup + repeats):
        rng.shuffle(order)
        for key in order:
            memory.reset()
            sync(device)
            start = time.perf_counter()
            cases[key]()
            sync(device)
            elapsed = time.perf_counter() - start
            peak = memory.peak()
            if round_ >= warmup:
                times[key].append(elapsed)
                peaks[key].append(peak)
        if log is not None:
            log(f"round {round_ + 1}/{warmup + repeats} done")
    return {
        key: {
            "median_s": statistics.median(times[key]),
            "times": [round(t, 4) for t in times[key]],
            "peak_mb": max(peaks[key]),
        }
        for key in cases
    }


def peak_memory(cases: dict[Hashable, Callable[[], object]], *, device: str = "cpu") -> dict[Hashable, float]:
    """Peak memory (MiB) of one call of each case; on CPU run this in a process started with :data:`MEMORY_ENV`."""
    memory = PeakMemory(device)
    peaks = {}
    for key, case in cases.items():
        gc.collect()
        memory.reset()
        case()
        peaks[key] = memory.peak()
    return peaks


def environment(device: str = "cpu") -> dict[str, Any]:
    """A short description of where the numbers were measured."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    try:  # which flaplace was measured: the commit, and whether flaplace/ had uncommitted changes
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "flaplace"], cwd=ROOT, capture_output=True, text=True
        )
        info["flaplace"] = commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        pass
    return info


# ------------------------------------------------------------------------------------------------
# Worker subprocesses
# ------------------------------------------------------------------------------------------------


def run_worker(
    script: Path, args: Sequence[str], *, timeout: float, env: dict[str, str] | None = None
) -> tuple[list[dict], str | None]:
    """Run ``python script --worker-output FILE *args`` in a fresh process; return its records.

    The worker writes a JSON list to ``FILE``. On a crash or timeout the records are empty and
    the second value says what happened (the caller records it).
    """
    with tempfile.TemporaryDirectory(prefix="flaplace-bench-") as tmp:
        output = Path(tmp) / "records.json"
        command = [sys.executable, str(script), "--worker-output", str(output), *args]
        full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
        try:
            done = subprocess.run(command, env=full_env, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return [], f"timed out after {timeout:.0f} s"
        if done.returncode != 0 or not output.exists():
            return [], f"worker exited with status {done.returncode}"
        return json.loads(output.read_text()), None


def memory_and_timing_workers(
    script: Path, args: Sequence[str], repeats: int
) -> tuple[dict[tuple, float], dict[tuple, dict]]:
    """Peak memory (``--worker memory``, one case per fresh process) and times (``--worker timing``).

    Returns ``({key: peak_mb}, {key: timing record})`` keyed by each record's ``key``; exits with
    the workers' errors when either fails.
    """
    log("memory worker")
    memory, error_m = run_worker(script, ["--worker", "memory", *args], timeout=3600, env=MEMORY_ENV)
    log("timing worker")
    timing, error_t = run_worker(
        script, ["--worker", "timing", "--repeats", str(repeats), *args], timeout=7200
    )
    if error_m or error_t:
        sys.exit(f"worker failed: memory {error_m}, timing {error_t}")
    return {tuple(r["key"]): r["peak_mb"] for r in memory}, {tuple(r["key"]): r for r in timing}


def write_worker_output(path: str, records: list[dict]) -> None:
    Path(path).write_text(json.dumps(records))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Results and docs
# ------------------------------------------------------------------------------------------------


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def write_results(path: Path, records: list[dict]) -> None:
    """Write records as a JSON list (floats to 4 significant digits, one record per line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(_rounded(r), sort_keys=False) for r in records]
    path.write_text("[\n" + ",\n".join(lines) + "\n]\n")


def fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return format(value, spec)
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines)


def update_docs_section(section: str, markdown: str, page: Path = DOCS_PAGE) -> None:
    """Replace the text between ``<!-- begin SECTION -->`` and ``<!-- end SECTION -->`` of the page."""
    begin, end = f"<!-- begin {section} -->", f"<!-- end {section} -->"
    text = page.read_text() if page.exists() else "# Benchmarks\n"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    page.write_text(text)
