"""Benchmark of ``raygpt tokenize`` (not a test): end-to-end MB/s against single-thread tiktoken, and peak memory.

    .venv/bin/python -m bench.tokenize [--copies 5 11] [--cpus 2] [--no-write]

For each size the sample corpus is replicated ``copies`` times into a temporary directory (11 copies = 55.6 MB)
and tokenized end to end (read -> clean -> tokenize -> pack -> write parquet + manifest) in a fresh process with
its own local Ray of ``--cpus`` CPUs and a pool of that many tokenizer actors. Ray's start-up is not timed (a tiny
warm-up dataset first starts Ray Data's per-cluster system actors); the tokenizer actors' start-up is. The
baseline is tiktoken's ``encode_ordinary_batch(texts, num_threads=1)`` on the same texts, already in memory
(encoding only), in the same run. Peak memory is sampled every 50 ms: the driver's RSS, and the sum and the largest
RSS of its Ray worker processes. The figures go into bench/results/tokenize.json and bench/RESULTS.md.
"""

from __future__ import annotations

import os
import sys

# This file is named like the standard library's `tokenize` module; running it puts bench/ first on sys.path, which
# would shadow that module for everything imported below (and for Ray's workers). Swap it for the repository root
# (for ``bench.report``) before any other import.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [entry for entry in sys.path if os.path.abspath(entry or ".") != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from bench.report import Headline, save_fragment  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "shakespeare"


def replicate(target: Path, copies: int) -> int:
    target.mkdir(parents=True, exist_ok=True)
    total = 0
    for copy in range(copies):
        folder = target / f"copy{copy:02d}"
        folder.mkdir(exist_ok=True)
        for file in sorted(SAMPLE.glob("*.txt")):
            shutil.copyfile(file, folder / file.name)
            total += file.stat().st_size
    return total


class MemorySampler:
    """Peak RSS and CPU time of this process and of its Ray processes (its descendants), sampled in a thread.

    Only descendants count, so other Ray clusters on the machine are not measured.
    """

    def __init__(self, interval: float = 0.05) -> None:
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()
        self.interval = interval
        self.driver_peak = 0
        self.workers_peak = 0
        self.worker_peak = 0
        self._cpu_start = {p.pid: self._cpu(p) for p in self._descendants()}
        self._cpu_seen: dict[int, float] = {}
        self._driver_cpu_start = self._cpu(self.me)
        self.driver_cpu = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _descendants(self) -> list[Any]:
        try:
            return self.me.children(recursive=True)
        except self.psutil.Error:
            return []

    def _cpu(self, process: Any) -> float:
        try:
            times = process.cpu_times()
            return times.user + times.system
        except self.psutil.Error:
            return 0.0

    def _sample(self) -> None:
        self.driver_peak = max(self.driver_peak, self.me.memory_info().rss)
        sizes = []
        for process in self._descendants():
            try:
                self._cpu_seen[process.pid] = max(self._cpu_seen.get(process.pid, 0.0), self._cpu(process))
                if " ".join(process.cmdline()).startswith("ray::"):
                    sizes.append(process.memory_info().rss)
            except self.psutil.Error:
                continue
        if sizes:
            self.workers_peak = max(self.workers_peak, sum(sizes))
            self.worker_peak = max(self.worker_peak, max(sizes))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    @property
    def ray_cpu(self) -> float:
        """CPU seconds used by the Ray processes while sampling (up to the last sample of each process)."""
        return sum(cpu - self._cpu_start.get(pid, 0.0) for pid, cpu in self._cpu_seen.items())

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.driver_cpu = self._cpu(self.me) - self._driver_cpu_start


def run_pipeline(corpus: Path, run_dir: Path, cpus: int) -> dict[str, Any]:
    """One end-to-end tokenize in this process (called in a fresh subprocess per size)."""
    import ray

    from pipeline.config import load_config
    from pipeline.data.build import tokenize_corpus

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    # Ray's start-up is not what is measured: a first small dataset brings up Ray Data's own system actors
    # (stats, autoscaling coordinator) once per cluster; then let the machine settle.
    warmup = load_config(None, [f"run.dir={run_dir}-warmup", f"data.inputs=[{SAMPLE / 'sonnets_gut.txt'}]"])
    tokenize_corpus(warmup, overwrite=True, log=lambda _: None)
    time.sleep(3)
    config = load_config(
        None, [f"run.dir={run_dir}", f"data.inputs=[{corpus}]", f"data.num_tokenizers={cpus}", "run.num_cpus=2"]
    )
    from pipeline.data import build

    first_output: list[float] = []
    consume = build._consume

    def timed_consume(*args: Any) -> None:  # when the first token rows reach the driver (actors are up)
        if not first_output:
            first_output.append(time.perf_counter())
        consume(*args)

    build._consume = timed_consume
    with MemorySampler() as memory:
        started = time.perf_counter()
        result = tokenize_corpus(config, overwrite=True, log=lambda _: None)
        seconds = time.perf_counter() - started
    build._consume = consume
    ray.shutdown()
    totals = result.manifest["totals"]
    return {
        "bytes": totals["bytes"],
        "tokens": totals["tokens"],
        "sequences": sum(s["sequences"] for s in result.manifest["splits"].values()),
        "seconds": seconds,
        "mb_per_s": totals["bytes"] / 1e6 / seconds,
        "first_output_s": first_output[0] - started,
        "cpu_seconds": memory.driver_cpu + memory.ray_cpu,
        "driver_peak_mb": memory.driver_peak / 1e6,
        "workers_peak_mb": memory.workers_peak / 1e6,
        "largest_worker_peak_mb": memory.worker_peak / 1e6,
        "summary": result.summary(),
    }


def baseline(corpus: Path) -> dict[str, Any]:
    from pipeline.model.tokenizer import get_tokenizer

    encoding = get_tokenizer().encoding
    texts = [p.read_text(encoding="utf-8") for p in sorted(corpus.rglob("*.txt"))]
    size = sum(len(t.encode("utf-8")) for t in texts)
    started, cpu = time.perf_counter(), time.process_time()
    tokens = sum(len(ids) for ids in encoding.encode_ordinary_batch(texts, num_threads=1))
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"bytes": size, "tokens": tokens, "seconds": seconds, "cpu_seconds": cpu, "mb_per_s": size / 1e6 / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description="benchmark raygpt tokenize")
    parser.add_argument("--copies", type=int, nargs="+", default=[5, 11, 22], help="sample-corpus copies per size")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray = tokenizer actors")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    parser.add_argument("--child", nargs=3, metavar=("CORPUS", "RUN_DIR", "CPUS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        corpus, run_dir, cpus = args.child
        print("RESULT " + json.dumps(run_pipeline(Path(corpus), Path(run_dir), int(cpus))))
        return

    rows = []
    with tempfile.TemporaryDirectory(prefix="raygpt-bench-") as tmp:
        for copies in args.copies:
            corpus = Path(tmp) / f"corpus{copies}"
            replicate(corpus, copies)
            child = subprocess.run(
                [sys.executable, __file__, "--child", str(corpus), str(Path(tmp) / f"run{copies}"), str(args.cpus)],
                capture_output=True,
                text=True,
                cwd=REPO,
                env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
            )
            lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
            if child.returncode or not lines:
                sys.exit(f"pipeline run failed:\n{child.stdout[-3000:]}\n{child.stderr[-3000:]}")
            result = json.loads(lines[-1].removeprefix("RESULT "))
            result["baseline"] = baseline(corpus)
            result["ratio"] = result["mb_per_s"] / result["baseline"]["mb_per_s"]
            result["copies"] = copies
            result["load"] = os.getloadavg()[0]
            shutil.rmtree(Path(tmp) / f"run{copies}", ignore_errors=True)
            rows.append(result)
            print(
                f"{result['bytes'] / 1e6:6.1f} MB: pipeline {result['mb_per_s']:.2f} MB/s ({result['seconds']:.1f} s), "
                f"first rows at {result['first_output_s']:.1f} s, "
                f"tiktoken 1 thread {result['baseline']['mb_per_s']:.2f} MB/s -> ratio {result['ratio']:.2f}; "
                f"CPU {result['cpu_seconds']:.1f} s vs {result['baseline']['cpu_seconds']:.1f} s; "
                f"peak RSS driver {result['driver_peak_mb']:.0f} MB, Ray workers {result['workers_peak_mb']:.0f} MB "
                f"(largest {result['largest_worker_peak_mb']:.0f} MB); load average {os.getloadavg()[0]:.1f}",
                flush=True,
            )

    lines = [
        f"Local Ray with {args.cpus} CPUs and {args.cpus} tokenizer actors; corpus = the sample replicated; "
        "end to end (read, clean, tokenize, pack, write parquet + manifest; Ray start-up excluded, tokenizer actor "
        "start-up included) vs tiktoken `encode_ordinary_batch(num_threads=1)` on the same texts already in memory.",
        "",
        "| corpus | tokens | pipeline | first rows at | tiktoken 1 thread | ratio | CPU s pipeline / tiktoken "
        "| peak RSS driver | peak RSS Ray workers (sum / max) | load avg |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['bytes'] / 1e6:.1f} MB | {r['tokens'] / 1e6:.1f}M | {r['mb_per_s']:.2f} MB/s ({r['seconds']:.1f} s) "
            f"| {r['first_output_s']:.1f} s "
            f"| {r['baseline']['mb_per_s']:.2f} MB/s | {r['ratio']:.2f} "
            f"| {r['cpu_seconds']:.1f} / {r['baseline']['cpu_seconds']:.1f} | {r['driver_peak_mb']:.0f} MB "
            f"| {r['workers_peak_mb']:.0f} / {r['largest_worker_peak_mb']:.0f} MB | {r['load']:.1f} |"
        )
    lines += [
        "",
        "First rows at: when the first token rows reached the driver, i.e. the tokenizer actors' start-up (new "
        "worker processes importing Ray Data) plus one block. "
        "CPU s: CPU time of the driver and its Ray processes (user + system) vs the single-thread encode. RSS counts "
        "shared pages (the object store's mapped memory) in each worker. Load avg: the machine's 1-minute load "
        "after the run; above the core count, other jobs competed for the CPUs and the wall-clock figures (MB/s, "
        "ratio) understate the pipeline.",
    ]
    section = "\n".join(lines) + "\n"
    print(section)
    if not args.no_write:
        headlines = [
            Headline(
                f"end to end, {r['bytes'] / 1e6:.0f} MB",
                f"{r['mb_per_s']:.2f} MB/s",
                f"tiktoken 1 thread {r['baseline']['mb_per_s']:.2f} MB/s",
                r["ratio"],
                1.6,
            )
            for r in rows
        ]
        command = f"python -m bench.tokenize --copies {' '.join(map(str, args.copies))} --cpus {args.cpus}"
        print(f"wrote {save_fragment('tokenize', command, section, headlines)}")


if __name__ == "__main__":
    main()
