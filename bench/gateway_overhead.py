"""Gateway overhead benchmark: the same load straight to vLLM and through the gateway, in one run; then the latency
clients see while the alias is hot-swapped back and forth, against steady state. Prints JSON.

It starts one vLLM CPU server on the bundled model and one `alignloop serve` replica in front of it (external mode,
a fresh SQLite store), and publishes one LoRA adapter version for the swap phase. The load is `--concurrency`
clients, each sending the same image question (ShapesWorld scene, `--max-tokens` greedy tokens) back to back for
`--seconds`. Phases run in ABBA order (direct, gateway, gateway, direct, ...) over `--rounds`, so a drift in the
engine's speed over the run hits both alike. Reported per target: requests/s, latency p50/p99/mean (ms), time to
first token when streaming, and the engine's own view from vLLM's /metrics (mean end-to-end, TTFT, time per output
token); then gateway vs direct. `mean_added_outside_engine_ms` is the gateway's latency with the engine's speed
taken out: (client mean - engine mean) through the gateway minus the same straight to vLLM. The `mixed` phase
(`--seconds` x `--rounds` long) then sends half the clients straight to vLLM and half through the gateway at the
same time, so both meet the same engine batch for batch: on a machine whose engine speed wanders from phase to
phase by more than the gateway costs, it is the sharpest comparison.

The hot-swap phases then promote every `--swap-every` seconds under the same load, through the admin API, so each
move is staged on vLLM first (`serve/staging.py`), as the trainer's promotions are. Each runs `--rounds` rounds of
a steady phase (the alias on each of the two versions for half of `--seconds`) and a swapping phase (`--seconds`),
alternating so that drift weighs on both, and reports steady against swapping: p50 and p99 ratios, throughput, the
seconds each promotion and its staging took, and the CPU the gateway and vLLM used per request. Every answer in
them is exactly `--max-tokens` long (`ignore_eos`), since versions whose answers end at different lengths cost
different amounts. `between_adapters` swaps two adapter versions, as a trainer's promotions do; `base_and_adapter`
swaps the base model and an adapter. `--diagnose` takes a swap apart: the alias moved in the store alone
(`flip_only`), the staging probes alone (`staging_only`), and moves to versions vLLM has never loaded, unstaged and
staged (`first_use_*`). `--swaps-only` runs the hot-swap phases alone.

    .venv/bin/python bench/gateway_overhead.py --concurrency 8 --seconds 20 --rounds 2
    .venv/bin/python bench/gateway_overhead.py --vllm-cpus 1 --client-cpus 0   # vLLM on its own core
    .venv/bin/python bench/gateway_overhead.py --vllm-cpus 1 --client-cpus 0 --swaps-only --diagnose

On a small machine pin vLLM to its own cores: unpinned, the load generator, the gateway and vLLM compete for the same
cores, and that contention dominates the comparison. Measured figures are in bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/...`

from alignloop.cores import parse_cores
from online_rl.store import open_store
from serve.staging import StagingService
from serve.vllm_process import VLLMServer, VLLMServerConfig
from training.shapes_world import ShapesWorld

REPO = Path(__file__).resolve().parents[1]

ADMIN_KEY = "bench-admin-key-0123456789abcdef"
FRESH_VERSIONS = 24  # --diagnose: versions never used before, for the first-use phases
SETTLE_S = 0.5  # after a move, how long a request counts as near it
API_KEY = "sk-bench-0123456789abcdef0123"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


ENGINE_METRICS = {  # vLLM's own request histograms: what the engine saw, whoever sent the request
    "e2e_ms": "vllm:e2e_request_latency_seconds",
    "ttft_ms": "vllm:time_to_first_token_seconds",
    "per_output_token_ms": "vllm:request_time_per_output_token_seconds",
}


def engine_totals(vllm_url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of each ENGINE_METRICS histogram, from vLLM's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {name: key for key, name in ENGINE_METRICS.items()}
    totals = {key: [0.0, 0.0] for key in ENGINE_METRICS}
    for family in text_string_to_metric_families(httpx.get(f"{vllm_url}/metrics", timeout=10).text):
        key = wanted.get(family.name)
        for sample in family.samples if key else ():
            if sample.name.endswith("_sum"):
                totals[key][0] += sample.value
            elif sample.name.endswith("_count"):
                totals[key][1] += sample.value
    return {key: (total, count) for key, (total, count) in totals.items()}


def engine_means(phases: list[tuple[dict, dict]]) -> dict[str, float]:
    """Mean of each engine histogram over the requests of some phases, each given by its (before, after) scrapes."""
    means = {}
    for key in ENGINE_METRICS:
        total = sum(after[key][0] - before[key][0] for before, after in phases)
        count = sum(after[key][1] - before[key][1] for before, after in phases)
        means[key] = round(1000 * total / count, 2) if count else float("nan")
    return means


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request_body(model: str, max_tokens: int, stream: bool) -> dict:
    world = ShapesWorld()
    buffer = io.BytesIO()
    world.render(world.scene("test", 3)).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "Describe the image in detail."},
                ],
            }
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, float | None]:
    """Returns (end-to-end seconds, time to first content byte in seconds when streaming)."""
    started = time.perf_counter()
    first = None
    if body["stream"]:
        async with client.stream("POST", url, json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if first is None and line.startswith("data: ") and '"content"' in line:
                    first = time.perf_counter() - started
    else:
        response = await client.post(url, json=body)
        response.raise_for_status()
    return time.perf_counter() - started, first


async def run_load(base_url: str, body: dict, concurrency: int, seconds: float, headers: dict) -> dict:
    latencies: list[float] = []
    spans: list[tuple[float, float]] = []  # (sent, done) of each request, perf_counter seconds
    first_tokens: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            try:
                sent = time.perf_counter()
                total, first = await one_request(client, f"{base_url}/v1/chat/completions", body)
                latencies.append(total)
                spans.append((sent, sent + total))
                if first is not None:
                    first_tokens.append(first)
            except httpx.HTTPError:
                errors += 1

    started = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers=headers, timeout=120, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "latencies": latencies,
        "spans": spans,
        "first_tokens": first_tokens,
        "errors": errors,
        "elapsed": elapsed,
    }


def summarize(runs: list[dict]) -> dict:
    latencies = [x for run in runs for x in run["latencies"]]
    first_tokens = [x for run in runs for x in run["first_tokens"]]
    elapsed = sum(run["elapsed"] for run in runs)
    summary = {
        "requests": len(latencies),
        "errors": sum(run["errors"] for run in runs),
        "requests_per_s": round(len(latencies) / elapsed, 3),
        "latency_p50_ms": round(1000 * percentile(latencies, 0.5), 2),
        "latency_p99_ms": round(1000 * percentile(latencies, 0.99), 2),
        "latency_mean_ms": round(1000 * statistics.fmean(latencies), 2) if latencies else None,
    }
    if first_tokens:
        summary["ttft_p50_ms"] = round(1000 * percentile(first_tokens, 0.5), 2)
        summary["ttft_p99_ms"] = round(1000 * percentile(first_tokens, 0.99), 2)
    return summary


async def mixed_load(
    direct_url: str,
    direct_body: dict,
    gateway_url: str,
    gateway_body: dict,
    concurrency: int,
    seconds: float,
    auth: dict,
) -> tuple[dict, dict]:
    """Half the clients straight to vLLM, half through the gateway, at the same time: both halves meet the same
    engine, batch for batch, so its drift and noise cancel out of the comparison."""
    half = concurrency // 2
    return tuple(
        await asyncio.gather(
            run_load(direct_url, direct_body, concurrency - half, seconds, {}),
            run_load(gateway_url, gateway_body, half, seconds, auth),
        )
    )


def compare(direct: dict, through_gateway: dict) -> dict:
    """Gateway vs direct: throughput cost and added latency."""
    comparison = {
        "throughput_ratio": round(through_gateway["requests_per_s"] / direct["requests_per_s"], 4),
        "throughput_cost_pct": round(100 * (1 - through_gateway["requests_per_s"] / direct["requests_per_s"]), 2),
        "p50_added_ms": round(through_gateway["latency_p50_ms"] - direct["latency_p50_ms"], 2),
        "p99_added_ms": round(through_gateway["latency_p99_ms"] - direct["latency_p99_ms"], 2),
        "mean_added_ms": round(through_gateway["latency_mean_ms"] - direct["latency_mean_ms"], 2),
    }
    if "ttft_p50_ms" in direct and "ttft_p50_ms" in through_gateway:
        comparison["ttft_p50_added_ms"] = round(through_gateway["ttft_p50_ms"] - direct["ttft_p50_ms"], 2)
    return comparison


def promote(gateway_url: str, version: int | None) -> dict:
    """Moves the alias through the admin API (staged on vLLM first, for a version); returns the alias change."""
    response = httpx.post(
        f"{gateway_url}/v1/admin/aliases/llava-rlhf/promote",
        json={"version": version, "reason": "bench"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=120,
    )
    response.raise_for_status()
    return response.json()


@dataclasses.dataclass(frozen=True)
class Targets:
    gateway_url: str
    vllm_url: str
    store_url: str


async def swap_load(
    targets: Targets, body: dict, args, versions: tuple, mode: str = "promote", fresh: list[int] | None = None
) -> tuple[dict, dict]:
    """The gateway load while the alias moves between `versions` (None: the base model) every `swap_every` seconds.
    `mode` says what a move is: "promote", a promotion through the admin API (staged on vLLM first, then the alias
    moves: what the trainer does); or, to take a swap apart, "flip", the alias moved in the store alone (no staging;
    the gateway sees it within its poll interval), or "stage", the staging probes alone (the alias stays). Returns
    the load and the moves: their number, and the seconds each took and spent staging. With `fresh`, each move
    goes to the next of those versions, which no request has named yet (vLLM loads it on first use)."""
    swaps = {"count": 0, "promote_s": [], "staging_s": [], "windows": []}
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    probe = StagingService(None, "shapes-llava")

    async def swapper() -> None:
        async with httpx.AsyncClient(base_url=targets.gateway_url, headers=admin, timeout=120) as client:
            store = open_store(targets.store_url)
            end = time.perf_counter() + args.seconds - args.swap_every / 2
            current = versions[1]
            try:
                while time.perf_counter() < end:
                    await asyncio.sleep(args.swap_every)
                    if mode != "stage":
                        current = (await client.get("/v1/admin/adapters")).json()["aliases"].get("llava-rlhf")
                    target = versions[1] if current == versions[0] else versions[0]
                    if fresh:
                        target = fresh.pop(0)
                    started = time.perf_counter()
                    if mode == "promote":
                        response = await client.post(
                            "/v1/admin/aliases/llava-rlhf/promote", json={"version": target, "reason": "bench swap"}
                        )
                        response.raise_for_status()
                        if response.json().get("staging"):
                            swaps["staging_s"].append(response.json()["staging"]["seconds"])
                    elif mode == "flip":
                        await asyncio.to_thread(store.promote, "llava-rlhf", target, actor="bench", reason="flip")
                    else:
                        for model in ("shapes-llava", version_name(target)):
                            answer = await client.post(
                                f"{targets.vllm_url}/v1/chat/completions",
                                json=probe.body(model),
                                headers={},
                            )
                            answer.raise_for_status()
                        current = target
                    swaps["count"] += 1
                    swaps["promote_s"].append(time.perf_counter() - started)
                    swaps["windows"].append((started, time.perf_counter()))
            finally:
                store.close()

    headers = {"Authorization": f"Bearer {API_KEY}"}
    load, _ = await asyncio.gather(
        run_load(targets.gateway_url, body, args.concurrency, args.seconds, headers), swapper()
    )
    return load, swaps


def hot_swap_phases(
    targets: Targets, body: dict, args, pair: tuple, cpu, mode: str = "promote", fresh: list[int] | None = None
) -> dict:
    """`--rounds` rounds of (steady, swapping), alternating so that a drift in vLLM's speed weighs on both: steady
    with the alias on each of the two versions for half the phase, then the alias swapped between them. Reports
    both, their ratios, the promotions' and stagings' seconds, and the CPU each process used per request."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    steady_runs, swap_runs, swaps = [], [], {"count": 0, "promote_s": [], "staging_s": [], "windows": []}
    near, away = [], []  # latencies in the swapping phases of requests that overlap a move, and of the others
    by_version: dict[str, list[dict]] = {version_name(v): [] for v in pair}
    cpu_s = {"steady": {}, "swapping": {}}
    for _ in range(args.rounds):
        for version in pair:
            promote(targets.gateway_url, version)
            before = cpu()
            run = asyncio.run(run_load(targets.gateway_url, body, args.concurrency, args.seconds / 2, auth))
            _add(cpu_s["steady"], before, cpu())
            steady_runs.append(run)
            by_version[version_name(version)].append(run)
        before = cpu()
        load, made = asyncio.run(swap_load(targets, body, args, pair, mode, fresh))
        _add(cpu_s["swapping"], before, cpu())
        swap_runs.append(load)
        swaps["count"] += made["count"]
        swaps["promote_s"] += made["promote_s"]
        swaps["staging_s"] += made["staging_s"]
        # A request is near a move if it was in flight while the move ran (staging, then the flip) or up to
        # SETTLE_S after it (it may be among the first on the new version, or batched with the last on the old).
        for sent, done in load["spans"]:
            touched = any(sent <= end + SETTLE_S and done >= start for start, end in made["windows"])
            (near if touched else away).append(done - sent)
    steady, during = summarize(steady_runs), summarize(swap_runs)
    return {
        "versions": [version_name(v) for v in pair],
        "moves": mode + (" to versions never used" if fresh is not None else ""),
        "swaps": swaps["count"],
        "steady": steady,
        "steady_by_version": {name: summarize(runs) for name, runs in by_version.items()},
        "during_swaps": during,
        "p50_ratio": round(during["latency_p50_ms"] / steady["latency_p50_ms"], 4),
        "p99_ratio": round(during["latency_p99_ms"] / steady["latency_p99_ms"], 4),
        "throughput_change_pct": round(100 * (during["requests_per_s"] / steady["requests_per_s"] - 1), 2),
        "near_a_move_vs_not": {
            "requests": [len(near), len(away)],
            "p50_ratio": round(percentile(near, 0.5) / percentile(away, 0.5), 4) if near and away else None,
            "p99_ratio": round(percentile(near, 0.99) / percentile(away, 0.99), 4) if near and away else None,
        },
        "promote_ms": _spread(swaps["promote_s"]),
        "staging_ms": _spread(swaps["staging_s"]),
        "cpu_ms_per_request": {
            phase: {
                name: round(1000 * total / max(1, (steady if phase == "steady" else during)["requests"]), 2)
                for name, total in used.items()
            }
            for phase, used in cpu_s.items()
        },
    }


def engine_mixing(vllm_url: str, body: dict, args, versions: list[int]) -> dict:
    """Straight to vLLM, `--concurrency` streams: batches of one adapter, of two adapters mixed, of the base model,
    and of the base model mixed with an adapter (half the streams each), `--rounds` rounds in turn, `--seconds`
    each. Whether a batch that mixes versions, as one does across a swap, is slower than one that does not."""
    models = {
        "one_adapter": [version_name(versions[0])],
        "two_adapters": [version_name(v) for v in versions[:2]],
        "base": ["shapes-llava"],
        "base_and_adapter": ["shapes-llava", version_name(versions[0])],
    }
    runs: dict[str, list[dict]] = {name: [] for name in models}

    async def mixed(names: list[str]) -> list[dict]:
        share = args.concurrency // len(names)
        loads = [run_load(vllm_url, {**body, "model": name}, share, args.seconds, {}) for name in names]
        return list(await asyncio.gather(*loads))

    for _ in range(args.rounds):
        for name, served in models.items():
            loads = asyncio.run(mixed(served))
            elapsed = max(load["elapsed"] for load in loads)
            runs[name].append({**_merge(loads), "elapsed": elapsed})
    return {name: summarize(found) for name, found in runs.items()}


def _merge(loads: list[dict]) -> dict:
    return {
        "latencies": [x for load in loads for x in load["latencies"]],
        "first_tokens": [x for load in loads for x in load["first_tokens"]],
        "errors": sum(load["errors"] for load in loads),
    }


def version_name(version: int | None) -> str:
    return "base" if version is None else f"policy-v{version}"


def _add(totals: dict, before: dict, after: dict) -> None:
    for name in after:
        totals[name] = totals.get(name, 0.0) + after[name] - before[name]


def _spread(seconds: list[float]) -> dict:
    if not seconds:
        return {}
    return {
        "mean": round(1000 * statistics.fmean(seconds), 1),
        "p50": round(1000 * percentile(seconds, 0.5), 1),
        "max": round(1000 * max(seconds), 1),
    }


def process_cpu(pids: dict[str, int]) -> callable:
    """cpu() -> {name: CPU seconds so far} of each process with its children (vLLM runs its engine in children)."""

    def cpu() -> dict[str, float]:
        used = {}
        for name, pid in pids.items():
            total = 0.0
            try:
                process = psutil.Process(pid)
                for member in [process, *process.children(recursive=True)]:
                    times = member.cpu_times()
                    total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
            used[name] = total
        return used

    return cpu


def random_lora(model_dir: Path, seed: int):
    """A rank-8 LoRA with strong random weights: a real adapter that changes the answers (so staging's smoke check
    passes), the same rank and modules as a trained one."""
    import torch
    from peft import get_peft_model

    from training.lora import language_model_lora
    from training.tiny_llava import load_checkpoint

    model, _ = load_checkpoint(model_dir)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, language_model_lora(rank=8, init_lora_weights=False))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5)
    return peft_model


def publish_bench_adapters(store_url: str, model_dir: Path, adapter_dir: Path, count: int = 2) -> list[int]:
    from online_rl.adapters import publish_adapter

    with open_store(store_url) as store:
        return [
            publish_adapter(store, random_lora(model_dir, seed), adapter_dir, str(model_dir), algorithm="bench").version
            for seed in range(count)
        ]


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the gateway exited during start-up")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the gateway did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "shapes-llava")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--rounds", type=int, default=2, help="direct/gateway alternations")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--swap-every", type=float, default=2.0, help="seconds between alias moves in the swap phase")
    parser.add_argument("--vllm-cpus", help="cores for vLLM, e.g. 1 (taskset); the rest of the bench stays off them")
    parser.add_argument("--client-cpus", help="cores for the load generator and the gateway, e.g. 0")
    parser.add_argument(
        "--swaps-only", action="store_true", help="only the hot-swap phases (no direct/gateway/mixed comparison)"
    )
    parser.add_argument(
        "--diagnose", action="store_true", help="also swap by moving the alias alone, and by staging alone"
    )
    args = parser.parse_args()

    if args.client_cpus:  # the gateway is started from here and inherits it
        os.sched_setaffinity(0, parse_cores(args.client_cpus))
    workdir = Path(tempfile.mkdtemp(prefix="alignloop-bench-"))
    adapter_dir = workdir / "adapters"
    store_url = f"sqlite:///{workdir / 'alignloop.db'}"
    config = VLLMServerConfig(
        model=str(args.model),
        served_model_name="shapes-llava",
        port=free_port(),
        adapter_dir=str(adapter_dir),
        max_model_len=512,
        max_lora_rank=16,
        max_loras=4,
        cpus=args.vllm_cpus,
    )
    gateway_port = free_port()
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    env = dict(
        os.environ,
        ALIGNLOOP_PORT=str(gateway_port),
        ALIGNLOOP_VLLM_URLS=config.base_url,
        ALIGNLOOP_STORE_URL=store_url,
        ALIGNLOOP_API_KEYS=f"bench:{API_KEY}",
        ALIGNLOOP_ADMIN_KEY=ADMIN_KEY,
        ALIGNLOOP_RATE_LIMIT_PER_MINUTE="10000000",
        ALIGNLOOP_MAX_CONCURRENT_PER_KEY="1000",
        ALIGNLOOP_LOG_LEVEL="WARNING",
    )
    versions = publish_bench_adapters(store_url, args.model, adapter_dir, 2 + (FRESH_VERSIONS if args.diagnose else 0))
    versions, fresh = versions[:2], versions[2:]
    with VLLMServer(config, log_path=workdir / "vllm.log") as vllm:
        gateway = subprocess.Popen(
            [str(Path(sys.executable).parent / "alignloop"), "serve"],
            env=env,
            stdout=(workdir / "gateway.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        try:
            wait_ready(gateway_url, gateway)
            direct_body = request_body("shapes-llava", args.max_tokens, args.stream)
            gateway_body = request_body("llava-rlhf", args.max_tokens, args.stream)
            auth = {"Authorization": f"Bearer {API_KEY}"}
            # Warm-up: the first requests compile kernels and fill caches; the adapter is loaded once.
            asyncio.run(run_load(vllm.base_url, direct_body, args.concurrency, 3.0, {}))
            for version in versions:
                asyncio.run(run_load(gateway_url, {**gateway_body, "model": f"llava-rlhf@v{version}"}, 2, 2.0, auth))
            runs = {"direct": [], "gateway": []}
            scrapes = {"direct": [], "gateway": []}
            gateway_process, gateway_cpu_s = psutil.Process(gateway.pid), 0.0
            for round_number in range(0 if args.swaps_only else args.rounds):
                # ABBA: direct-gateway, then gateway-direct, so a drift in vLLM's speed over the run (it happens,
                # e.g. once an adapter is loaded) weighs on both alike instead of always on the second phase.
                order = ("direct", "gateway") if round_number % 2 == 0 else ("gateway", "direct")
                for target in order:
                    before, cpu_before = engine_totals(vllm.base_url), sum(gateway_process.cpu_times()[:2])
                    if target == "direct":
                        runs[target].append(
                            asyncio.run(run_load(vllm.base_url, direct_body, args.concurrency, args.seconds, {}))
                        )
                    else:
                        runs[target].append(
                            asyncio.run(run_load(gateway_url, gateway_body, args.concurrency, args.seconds, auth))
                        )
                        gateway_cpu_s += sum(gateway_process.cpu_times()[:2]) - cpu_before
                    scrapes[target].append((before, engine_totals(vllm.base_url)))
            direct_runs, gateway_runs = runs["direct"], runs["gateway"]
            mixed_direct, mixed_gateway = None, None
            if not args.swaps_only:
                mixed_direct, mixed_gateway = asyncio.run(
                    mixed_load(
                        vllm.base_url,
                        direct_body,
                        gateway_url,
                        gateway_body,
                        args.concurrency,
                        args.seconds * args.rounds,
                        auth,
                    )
                )
            cpu = process_cpu({"gateway": gateway.pid, "vllm": vllm.process.pid})
            targets = Targets(gateway_url, vllm.base_url, store_url)
            # Every answer exactly --max-tokens long: versions whose answers end at different lengths would
            # otherwise cost different amounts, and the steady and the swapping phases mix them differently.
            swap_body = {**gateway_body, "ignore_eos": True}
            pair = tuple(versions)
            hot_swap = {
                # Two adapter versions, as a trainer's promotions swap them: the swap's own cost.
                "between_adapters": hot_swap_phases(targets, swap_body, args, pair, cpu),
                # The base model and an adapter: what the swap phase measured first (its steady state mixes the
                # base model's speed with the adapter's).
                "base_and_adapter": hot_swap_phases(targets, swap_body, args, (None, versions[0]), cpu),
            }
            if args.diagnose:  # a swap taken apart: the alias moving alone, and staging alone
                hot_swap["flip_only"] = hot_swap_phases(targets, swap_body, args, pair, cpu, mode="flip")
                hot_swap["staging_only"] = hot_swap_phases(targets, swap_body, args, pair, cpu, mode="stage")
                # First use: every move to a version vLLM has not loaded yet, unstaged and then staged.
                hot_swap["first_use_unstaged"] = hot_swap_phases(
                    targets, swap_body, args, pair, cpu, mode="flip", fresh=fresh[: len(fresh) // 2]
                )
                hot_swap["first_use_staged"] = hot_swap_phases(
                    targets, swap_body, args, pair, cpu, mode="promote", fresh=fresh[len(fresh) // 2 :]
                )
                direct_swap_body = {**direct_body, "ignore_eos": True}
                hot_swap["engine_mixing"] = engine_mixing(vllm.base_url, direct_swap_body, args, versions)
        finally:
            gateway.terminate()
            gateway.wait(30)
    if args.swaps_only:
        print(
            json.dumps(
                {
                    "benchmark": "gateway_overhead",
                    "load": vars(args) | {"model": str(args.model)},
                    "hot_swap": hot_swap,
                },
                indent=2,
            )
        )
        return
    direct, through_gateway = summarize(direct_runs), summarize(gateway_runs)
    direct["engine"], through_gateway["engine"] = engine_means(scrapes["direct"]), engine_means(scrapes["gateway"])
    # Time outside vLLM's engine (HTTP both ways, and the gateway when there is one), per request on average: the
    # gateway's own latency, whatever speed the engine ran at during each phase.
    outside = {
        target: summary["latency_mean_ms"] - summary["engine"]["e2e_ms"]
        for target, summary in (("direct", direct), ("gateway", through_gateway))
    }
    report = {
        "benchmark": "gateway_overhead",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "load": {
            "concurrency": args.concurrency,
            "seconds_per_phase": args.seconds,
            "rounds": args.rounds,
            "max_tokens": args.max_tokens,
            "stream": args.stream,
            "vllm_cpus": args.vllm_cpus,
            "client_cpus": args.client_cpus,
        },
        "direct_vllm": direct,
        "gateway": through_gateway,
        "gateway_vs_direct": {
            **compare(direct, through_gateway),
            "engine_e2e_mean_added_ms": round(through_gateway["engine"]["e2e_ms"] - direct["engine"]["e2e_ms"], 2),
            "mean_added_outside_engine_ms": round(outside["gateway"] - outside["direct"], 2),
            # CPU the gateway process itself used: on a machine where it shares vLLM's cores, this is what it costs.
            "gateway_cpu_ms_per_request": round(1000 * gateway_cpu_s / max(through_gateway["requests"], 1), 2),
            "gateway_cpu_share_of_machine": round(gateway_cpu_s / (args.rounds * args.seconds * os.cpu_count()), 4),
        },
        "mixed": {
            "clients": {"direct": args.concurrency - args.concurrency // 2, "gateway": args.concurrency // 2},
            "direct_vllm": summarize([mixed_direct]),
            "gateway": summarize([mixed_gateway]),
        },
        "hot_swap": hot_swap,
    }
    report["mixed"]["gateway_vs_direct"] = compare(report["mixed"]["direct_vllm"], report["mixed"]["gateway"])
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
