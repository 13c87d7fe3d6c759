"""Benchmark of ``raygpt tokenize`` (not a test): throughput against tiktoken on one and on every core, start-up,
steady state, dedup's cost, and peak memory.

    .venv/bin/python -m bench.tokenize [--copies 11 60] [--cpus 2] [--dedup-copies 11] [--no-write]

For each size the sample corpus is replicated ``copies`` times into a temporary directory (11 copies = 55.6 MB,
60 = 303 MB) and tokenized end to end (read -> clean -> tokenize -> pack -> write parquet + manifest) in a fresh
process with its own local Ray of ``--cpus`` CPUs and a pool of that many tokenizer actors. Ray's start-up is not
timed (a tiny warm-up dataset first starts Ray Data's per-cluster system actors); the tokenizer actors' start-up
is, and is reported on its own: "first rows" is when the driver receives the first block's counts, and the steady
state is the token rate from then to the last block. The baselines are tiktoken's
``encode_ordinary_batch(texts, num_threads=N)`` on the same texts, already in memory (encoding only), in the same
run: N=1, and N=--cpus (the machine's limit for a pipeline whose work is BPE encoding). Dedup's cost is one more
run of the ``--dedup-copies`` corpus with ``data.dedup`` exact and near on. Peak memory is sampled every 50 ms: the
driver's RSS, and the sum and the largest RSS of its Ray worker processes. The figures go into
bench/results/tokenize.json and bench/RESULTS.md.
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
# the end-to-end target (1.5x one thread) is set for a corpus of about 300 MB: on a smaller one the actors'
# start-up, a fixed cost, is most of the time
END_TO_END_TARGET_BYTES = 250e6


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


def run_pipeline(corpus: Path, run_dir: Path, cpus: int, dedup: bool) -> dict[str, Any]:
    """One end-to-end tokenize in this process (called in a fresh subprocess per size)."""
    import numpy as np
    import ray

    from pipeline.config import load_config
    from pipeline.data import build
    from pipeline.data.build import tokenize_corpus

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    # Ray's start-up is not what is measured: a first small dataset brings up Ray Data's own system actors
    # (stats, autoscaling coordinator) once per cluster; then let the machine settle.
    warmup = load_config(None, [f"run.dir={run_dir}-warmup", f"data.inputs=[{SAMPLE / 'sonnets_gut.txt'}]"])
    tokenize_corpus(warmup, overwrite=True, log=lambda _: None)
    time.sleep(3)
    overrides = [f"run.dir={run_dir}", f"data.inputs=[{corpus}]", f"data.num_tokenizers={cpus}", "run.num_cpus=2"]
    if dedup:
        overrides += ["data.dedup.exact=true", "data.dedup.near=true"]
    config = load_config(None, overrides)

    arrivals: list[tuple[float, int]] = []  # when each block's counts reached the driver, and its tokens
    collect = build._collect

    def timed_collect(batch: Any, *args: Any) -> None:
        kind = batch.column("kind").to_numpy()
        tokens = int(np.asarray(batch.column("tokens").to_numpy(zero_copy_only=False))[kind == 0].sum())
        arrivals.append((time.perf_counter(), tokens))
        collect(batch, *args)

    build._collect = timed_collect
    with MemorySampler() as memory:
        started = time.perf_counter()
        result = tokenize_corpus(config, overwrite=True, log=lambda _: None)
        seconds = time.perf_counter() - started
    build._collect = collect
    ray.shutdown()
    totals = result.manifest["totals"]
    first, last = arrivals[0][0], arrivals[-1][0]
    steady_tokens = sum(tokens for _, tokens in arrivals[1:])
    return {
        "bytes": totals["bytes"],
        "tokens": totals["tokens"],
        "sequences": sum(s["sequences"] for s in result.manifest["splits"].values()),
        "seconds": seconds,
        "mb_per_s": totals["bytes"] / 1e6 / seconds,
        "first_output_s": first - started,
        "steady_tokens_per_s": steady_tokens / (last - first) if last > first else float("nan"),
        "after_last_block_s": seconds - (last - started),
        "cpu_seconds": memory.driver_cpu + memory.ray_cpu,
        "driver_peak_mb": memory.driver_peak / 1e6,
        "workers_peak_mb": memory.workers_peak / 1e6,
        "largest_worker_peak_mb": memory.worker_peak / 1e6,
        "summary": result.summary(),
    }


def baseline(corpus: Path, threads: int) -> dict[str, Any]:
    from pipeline.model.tokenizer import get_tokenizer

    encoding = get_tokenizer().encoding
    texts = [p.read_text(encoding="utf-8") for p in sorted(corpus.rglob("*.txt"))]
    size = sum(len(t.encode("utf-8")) for t in texts)
    started, cpu = time.perf_counter(), time.process_time()
    tokens = sum(len(ids) for ids in encoding.encode_ordinary_batch(texts, num_threads=threads))
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {
        "threads": threads,
        "bytes": size,
        "tokens": tokens,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "mb_per_s": size / 1e6 / seconds,
        "tokens_per_s": tokens / seconds,
    }


def child_run(corpus: Path, run_dir: Path, cpus: int, dedup: bool) -> dict[str, Any]:
    child = subprocess.run(
        [sys.executable, __file__, "--child", str(corpus), str(run_dir), str(cpus), str(int(dedup))],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
    if child.returncode or not lines:
        sys.exit(f"pipeline run failed:\n{child.stdout[-3000:]}\n{child.stderr[-3000:]}")
    shutil.rmtree(run_dir, ignore_errors=True)
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description="benchmark raygpt tokenize")
    parser.add_argument("--copies", type=int, nargs="+", default=[11, 60], help="sample-corpus copies per size")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray = tokenizer actors")
    parser.add_argument("--dedup-copies", type=int, default=11, help="the size (copies) dedup's cost is measured at")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    parser.add_argument("--child", nargs=4, metavar=("CORPUS", "RUN_DIR", "CPUS", "DEDUP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        corpus, run_dir, cpus, dedup = args.child
        print("RESULT " + json.dumps(run_pipeline(Path(corpus), Path(run_dir), int(cpus), dedup == "1")))
        return

    rows = []
    dedup_row: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="raygpt-bench-") as tmp:
        for copies in args.copies:
            corpus = Path(tmp) / f"corpus{copies}"
            replicate(corpus, copies)
            result = child_run(corpus, Path(tmp) / f"run{copies}", args.cpus, dedup=False)
            result["baseline"] = baseline(corpus, 1)
            result["limit"] = baseline(corpus, args.cpus)
            result["ratio"] = result["mb_per_s"] / result["baseline"]["mb_per_s"]
            result["limit_ratio"] = result["limit"]["mb_per_s"] / result["baseline"]["mb_per_s"]
            result["steady_vs_limit"] = result["steady_tokens_per_s"] / result["limit"]["tokens_per_s"]
            result["copies"] = copies
            result["load"] = os.getloadavg()[0]
            rows.append(result)
            print(
                f"{result['bytes'] / 1e6:6.1f} MB: pipeline {result['mb_per_s']:.2f} MB/s ({result['seconds']:.1f} s), "
                f"first rows at {result['first_output_s']:.1f} s, steady {result['steady_tokens_per_s'] / 1e6:.2f}M "
                f"tokens/s = {result['steady_vs_limit']:.2f} of tiktoken on {args.cpus} threads "
                f"({result['limit']['tokens_per_s'] / 1e6:.2f}M/s); end to end {result['ratio']:.2f}x tiktoken "
                f"1 thread ({result['baseline']['mb_per_s']:.2f} MB/s; {args.cpus} threads "
                f"{result['limit_ratio']:.2f}x); peak RSS driver {result['driver_peak_mb']:.0f} MB, Ray workers "
                f"{result['workers_peak_mb']:.0f} MB (largest {result['largest_worker_peak_mb']:.0f} MB); "
                f"load average {result['load']:.1f}",
                flush=True,
            )
            if copies == args.dedup_copies:
                dedup_row = child_run(corpus, Path(tmp) / f"dedup{copies}", args.cpus, dedup=True)
                dedup_row["cost"] = dedup_row["seconds"] / result["seconds"]
                dedup_row["load"] = os.getloadavg()[0]
                print(
                    f"{dedup_row['bytes'] / 1e6:6.1f} MB with exact + near dedup: {dedup_row['seconds']:.1f} s "
                    f"= {dedup_row['cost']:.2f}x the run without ({dedup_row['summary']})",
                    flush=True,
                )

    n = args.cpus
    lines = [
        f"Local Ray with {n} CPUs and {n} tokenizer actors; corpus = the sample replicated; end to end (read, clean, "
        "tokenize, pack, write parquet + manifest; Ray start-up excluded, tokenizer actor start-up included) vs "
        f"tiktoken `encode_ordinary_batch(num_threads=1)` and `(num_threads={n})` on the same texts already in "
        "memory, in the same run.",
        "",
        f"| corpus | tokens | pipeline end to end | ratio to 1 thread | {n} threads (the limit) "
        "| first rows at | steady state | steady / limit | peak RSS driver | peak RSS Ray workers (sum / max) "
        "| load avg |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['bytes'] / 1e6:.1f} MB | {r['tokens'] / 1e6:.1f}M | {r['mb_per_s']:.2f} MB/s ({r['seconds']:.1f} s) "
            f"| {r['ratio']:.2f} (1 thread {r['baseline']['mb_per_s']:.2f} MB/s) "
            f"| {r['limit']['tokens_per_s'] / 1e6:.2f}M tokens/s = {r['limit_ratio']:.2f}x "
            f"| {r['first_output_s']:.1f} s | {r['steady_tokens_per_s'] / 1e6:.2f}M tokens/s "
            f"| {r['steady_vs_limit']:.2f} | {r['driver_peak_mb']:.0f} MB "
            f"| {r['workers_peak_mb']:.0f} / {r['largest_worker_peak_mb']:.0f} MB | {r['load']:.1f} |"
        )
    if dedup_row is not None:
        lines += [
            "",
            f"Dedup's cost: {dedup_row['bytes'] / 1e6:.1f} MB with `data.dedup` exact and near on took "
            f"{dedup_row['seconds']:.1f} s, {dedup_row['cost']:.2f}x the same corpus without (it reads every file "
            f"once more and MinHashes every document); load avg {dedup_row['load']:.1f}.",
        ]
    lines += [
        "",
        "First rows at: when the first block's counts reached the driver, i.e. the tokenizer actors' start-up (new "
        "worker processes importing Ray Data) plus one block. Steady state: tokens per second from then to the "
        "last block. The driver receives counts and tails only (tokens are packed and written by the actors), "
        "so its peak RSS does not grow with the corpus. RSS counts shared pages (the object store's mapped "
        "memory) in each worker. Load avg: the machine's 1-minute load after the run; above the core count, other "
        "jobs competed for the CPUs and the wall-clock figures understate the pipeline.",
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
                1.5 if r["bytes"] >= END_TO_END_TARGET_BYTES else None,
            )
            for r in rows
        ] + [
            Headline(
                f"steady state, {r['bytes'] / 1e6:.0f} MB",
                f"{r['steady_tokens_per_s'] / 1e6:.2f}M tokens/s",
                f"tiktoken {n} threads {r['limit']['tokens_per_s'] / 1e6:.2f}M tokens/s",
                r["steady_vs_limit"],
                0.9,
            )
            for r in rows
        ]
        command = (
            f"python -m bench.tokenize --copies {' '.join(map(str, args.copies))} --cpus {n} "
            f"--dedup-copies {args.dedup_copies}"
        )
        print(f"wrote {save_fragment('tokenize', command, section, headlines)}")


if __name__ == "__main__":
    main()
