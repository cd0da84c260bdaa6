"""The gateway's load benchmark: SSE fan-out of paced jobs, and idle connections.

    python -m bench.gateway                  # full: 3 alternating runs, ~25 minutes
    python -m bench.gateway --quick          # seconds: proves the harness works
    python -m bench.gateway --profile-at 50x20   # one point, the gateway under py-spy

One ``tokenbus serve`` process (pinned to CPU 0 where there are two or more CPUs) reads the job
streams of a private ``redis-server``; everything else — Redis, this driver (which is also the
producer) and the reader processes — is pinned to the other CPUs.

**fan-out**: a paced producer writes token entries (``tokenbus.schemas`` entries, each carrying its
write time in ``data.t``) to J job streams at R tokens/s each; C SSE connections per job follow
``/jobs/{id}/events`` through the gateway (reader processes of :mod:`bench.gateway_readers`). Per
point: events delivered per second, latency written → received (p50/p99/max, one clock), the
gateway's CPU per delivered event (``/proc/<pid>/stat``) and RSS. The **baseline**, measured in the
same run, is the same events read by ``subscribe()`` in one process on the same CPU: C readers
per job. Two series: clients per job at a fixed job count, and job count at one client per job.
A side's **ceiling** is the highest offered load (events/s) before the first whose p99 passes 25 ms.

**idle**: N SSE connections to tag streams that carry nothing (heartbeats only, at a short
interval): the gateway's RSS as connections are added, then after k heartbeat rounds (counted by
the readers, not timed): memory per connection is the slope, flat over time the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hiredis
import orjson
import uvloop
from redis.asyncio import Redis

from bench.gateway_readers import bucket_us
from tokenbus.redis_server import RedisServerProcess, free_port
from tokenbus.schemas.entries import EndEntry, StartEntry, TokenEntry
from tokenbus.schemas.keys import StreamKeys

ROOT = Path(__file__).parent.parent
RESULTS = ROOT / "bench" / "results"
CEILING_P99_MS = 25.0
TICK_S = 0.001
CLK_TCK = os.sysconf("SC_CLK_TCK")
SCHEDSTAT = Path("/proc/self/schedstat").exists()
"""The kernel keeps each thread's time on a CPU in nanoseconds (``CONFIG_SCHED_INFO``)."""
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
WORDS = [" lorem", " ipsum", " dolor", " sit", " amet", ",", " consectetur", " adipiscing", " elit", "."]


def metadata(job: str) -> dict[str, Any]:
    """A token's metadata as a ChatOpenAI call in a LangGraph node writes it."""
    ns = f"write_poem:{uuid.uuid5(uuid.NAMESPACE_URL, job)}"
    return {
        "tags": ["poem"], "langgraph_step": 1, "langgraph_node": "write_poem",
        "langgraph_triggers": ["branch:to:write_poem"], "langgraph_path": ["__pregel_pull", "write_poem"],
        "langgraph_checkpoint_ns": ns, "checkpoint_ns": ns, "ls_provider": "openai",
        "ls_model_name": "gpt-4o-mini", "ls_model_type": "chat", "ls_temperature": 0.7,
    }  # fmt: skip


# -- processes -----------------------------------------------------------------------------------


@dataclass
class Pinning:
    """CPU 0 for the process measured (gateway or baseline), the others for everything else."""

    measured: list[str]
    """The command prefix that pins a child to the measured CPU (``taskset -c 0``) or nothing."""
    note: str
    cpu: int | None = None
    """The measured CPU, if pinned."""

    @classmethod
    def setup(cls) -> Pinning:
        cpus = sorted(os.sched_getaffinity(0))
        taskset = shutil.which("taskset")
        if len(cpus) < 2 or taskset is None:
            return cls([], f"not pinned ({len(cpus)} CPUs, taskset {'found' if taskset else 'missing'})")
        os.sched_setaffinity(0, cpus[1:])  # this driver, Redis and the readers inherit the rest
        note = f"measured process on CPU {cpus[0]}, the rest on {cpus[1:]}"
        return cls([taskset, "-c", str(cpus[0])], note, cpus[0])


def proc_cpu_s(pid: int) -> float:
    """CPU time of a process: its threads' time on a CPU, in nanoseconds, where the kernel keeps it
    (``/proc/<pid>/task/*/schedstat``; a thread that ends between two readings takes its time with
    it); else utime + stime, in clock ticks (``/proc/<pid>/stat``). Ticks are 10 ms: a quick run's
    reader, busy for less than a tick between two readings on a loaded machine, read 0."""
    if SCHEDSTAT:
        total = 0
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that just ended
                total += int((task / "schedstat").read_text().split()[0])
        return total / 1e9
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_runq_wait_s(pid: int) -> float:
    """Time the process was ready to run but waiting for a CPU (/proc/<pid>/schedstat)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9


def cpu_busy_s(cpu: int | None) -> float:
    """Busy time of one CPU (every process on it, and steal), from /proc/stat; 0 if not pinned."""
    if cpu is None:
        return 0.0
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in line.split()[1:9])
            return (user + nice + system + irq + softirq + steal) / CLK_TCK
    return 0.0


def proc_rss_mb(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KB / 1024


def self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Gateway:
    """A ``tokenbus serve`` process, its log in a file."""

    def __init__(self, redis_url: str, prefix: str, pinning: Pinning, **env: str) -> None:
        self.port = free_port()
        self.url_host = "127.0.0.1"
        self._env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TOKENBUS_")},
            "REDIS_URL": redis_url, "TOKENBUS_PREFIX": prefix, "TOKENBUS_QUEUE": f"{prefix}:queue", **env,
        }  # fmt: skip
        self._cmd = [*pinning.measured, str(Path(sys.executable).with_name("tokenbus")), "--log-level", "WARNING",
                     "serve", "--port", str(self.port)]  # fmt: skip
        self._log = tempfile.NamedTemporaryFile(prefix="bench-gateway-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self._cmd, env=self._env, stdin=asyncio.subprocess.DEVNULL, stdout=self._log, stderr=self._log
        )
        deadline = time.monotonic() + 30
        while not await self._healthy():
            if self.proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start:\n{self.log()[-3000:]}")
            await asyncio.sleep(0.05)

    async def _healthy(self) -> bool:
        try:
            reader, writer = await asyncio.open_connection(self.url_host, self.port)
        except OSError:
            return False
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        response = await reader.read()
        writer.close()
        return response.startswith(b"HTTP/1.1 200")

    def connections(self) -> int:
        """Established TCP connections to the gateway's port, on its side (from /proc/net/tcp)."""
        local = f":{self.port:04X}"
        count = 0
        with open("/proc/net/tcp") as table:
            for line in table:
                fields = line.split()
                if fields[1].endswith(local) and fields[3] == "01":
                    count += 1
        return count

    async def quiet(self) -> None:
        """Wait until the last point's connections are gone."""
        deadline = time.monotonic() + 60
        while self.connections() and time.monotonic() < deadline:  # noqa: ASYNC110 (nothing to await on)
            await asyncio.sleep(0.05)

    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self._log.close()
        with contextlib.suppress(OSError):
            os.unlink(self._log.name)


class ReaderProcess:
    """A :mod:`bench.gateway_readers` process, driven by JSON lines."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, *args: str, prefix: Sequence[str] = ()) -> ReaderProcess:
        proc = await asyncio.create_subprocess_exec(
            *prefix, sys.executable, "-m", "bench.gateway_readers", *args, cwd=ROOT,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 26,
        )  # fmt: skip
        return cls(proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def ask(self, command: dict[str, Any], within: float = 600.0) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(orjson.dumps(command) + b"\n")
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), within)
        if not line:
            raise RuntimeError(f"reader process {self.pid} exited ({await self.proc.wait()})")
        answer: dict[str, Any] = orjson.loads(line)
        return answer

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()


# -- the producer --------------------------------------------------------------------------------


VARYING = (b"seq", b"content", b"data", b"ts")
"""The fields that differ between the tokens of one job."""


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


class XaddTemplate:
    """One job's XADD in RESP, packed once; each token fills in its :data:`VARYING` fields."""

    def __init__(self, key: str, fields: dict[bytes, bytes]) -> None:
        args = [b"XADD", key.encode(), b"*", *(part for item in fields.items() for part in item)]
        self._parts: list[bytes] = []
        static = b"*%d\r\n" % len(args)
        for i, arg in enumerate(args):
            if i >= 3 and i % 2 == 0 and args[i - 1] in VARYING:
                self._parts.append(static)  # the value of a varying field follows it
                static = b""
            else:
                static += bulk(arg)
        self._parts.append(static)

    def pack(self, seq: bytes, content: bytes, data: bytes, ts: bytes) -> bytes:
        p = self._parts
        return b"".join((p[0], bulk(seq), p[1], bulk(content), p[2], bulk(data), p[3], bulk(ts), p[4]))


class Producer:
    """Paced token entries on job streams: J jobs at R tokens/s each, evenly interleaved, written
    as they fall due, each tick's in one write on a connection of its own (RESP packed here: the
    producer shares its CPU with the readers). Each token carries its write time, ``data.t``, in ns."""

    def __init__(self, redis: Redis, port: int, prefix: str, jobs: Sequence[str]) -> None:
        self._redis = redis
        self._port = port
        self._jobs = list(jobs)
        keys = StreamKeys(prefix)
        self._keys = [keys.job(j) for j in jobs]
        self._templates = []
        for job, key in zip(jobs, self._keys, strict=True):
            entry = TokenEntry(job=job, attempt=1, seq=1, ts=0, tags=("poem",), node="write_poem", meta=metadata(job))
            fields = entry.encode()
            assert tuple(k for k in fields if k in VARYING) == VARYING, "the contract's field order changed"
            self._templates.append(XaddTemplate(key, fields))
        self._run_ids = [f"run-{uuid.uuid5(uuid.NAMESPACE_URL, j)}" for j in jobs]
        self.sent = 0

    async def start_jobs(self) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for job, key in zip(self._jobs, self._keys, strict=True):
                entry = StartEntry(job=job, attempt=1, seq=0, ts=time.time_ns() // 1_000_000,
                                   data={"graph": "bench", "modes": ["messages"]})  # fmt: skip
                pipe.xadd(key, entry.encode())  # type: ignore[arg-type]
            await pipe.execute()

    async def run(self, rate: float, duration: float) -> dict[str, float]:
        """Write ``duration`` seconds of tokens; the lateness of each batch's first token (µs)."""
        n = len(self._jobs)
        dt = 1.0 / (rate * n)
        total = round(duration * rate) * n
        words = [w.encode() for w in WORDS]
        replies = hiredis.Reader()
        reader, writer = await asyncio.open_connection("127.0.0.1", self._port)
        start = time.monotonic() + 0.005
        k, lateness = 0, []
        try:
            while k < total:
                now = time.monotonic()
                due = min(total, int((now - start) / dt) + 1)
                if due > k:
                    lateness.append(now - (start + k * dt))
                    commands = []
                    for i in range(k, due):
                        job, seq = i % n, i // n + 1
                        t = time.time_ns()
                        data = orjson.dumps({"id": self._run_ids[job], "t": t})
                        ts = b"%d" % (t // 1_000_000)
                        commands.append(self._templates[job].pack(b"%d" % seq, words[seq % len(words)], data, ts))
                    writer.write(b"".join(commands))
                    await self._replies(reader, replies, due - k)
                    self.sent += due - k
                    k = due
                # at least a tick: the loop's timers have 1 ms resolution, and a shorter sleep spins
                await asyncio.sleep(max(TICK_S, start + k * dt - time.monotonic()))
        finally:
            writer.close()
        lateness.sort()
        return {
            "late_p99_ms": lateness[int(len(lateness) * 0.99)] * 1000 if lateness else 0.0,
            "late_max_ms": lateness[-1] * 1000 if lateness else 0.0,
            "batches": len(lateness),
        }

    @staticmethod
    async def _replies(reader: asyncio.StreamReader, parser: hiredis.Reader, n: int) -> None:
        while n:
            reply = parser.gets()
            if reply is False:
                data = await reader.read(1 << 16)
                if not data:
                    raise ConnectionError("Redis closed the producer's connection")
                parser.feed(data)
                continue
            if isinstance(reply, hiredis.ReplyError):
                raise RuntimeError(f"XADD refused: {reply}")
            n -= 1

    async def end_jobs(self) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for job, key in zip(self._jobs, self._keys, strict=True):
                seq = self.sent // len(self._jobs) + 1
                entry = EndEntry(job=job, attempt=1, seq=seq, ts=time.time_ns() // 1_000_000, data={"chunks": seq - 1})
                pipe.xadd(key, entry.encode())  # type: ignore[arg-type]
            await pipe.execute()

    async def delete(self) -> None:
        await self._redis.delete(*self._keys)


# -- measures ------------------------------------------------------------------------------------


def percentiles(histogram: Counter[int]) -> tuple[float, float, float]:
    """p50, p99 and max (ms) of a merged latency histogram."""
    n = sum(histogram.values())
    if not n:
        return 0.0, 0.0, 0.0
    keys = sorted(histogram)
    marks, out, seen = [n // 2, min(n - 1, int(n * 0.99))], [], 0
    for key in keys:
        seen += histogram[key]
        while marks and seen > marks[0]:
            marks.pop(0)
            out.append(bucket_us(key) / 1000)
    return out[0], out[1], bucket_us(keys[-1]) / 1000


@dataclass
class Bench:
    args: argparse.Namespace
    redis: Redis
    redis_url: str
    redis_port: int
    pinning: Pinning
    prefix: str = field(default_factory=lambda: f"g{uuid.uuid4().hex[:8]}")
    results: dict[str, list[float]] = field(default_factory=dict)
    readers: list[ReaderProcess] = field(default_factory=list)
    points: int = 0

    def record(self, name: str, value: float) -> None:
        self.results.setdefault(name, []).append(value)
        print(f"  {name}: {value:,.3f}", file=sys.stderr, flush=True)

    async def redis_cpu_s(self) -> float:
        info = await self.redis.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    async def sse_readers(self, n: int, gateway: Gateway) -> list[ReaderProcess]:
        readers = [await ReaderProcess.start("sse", gateway.url_host, str(gateway.port)) for _ in range(n)]
        self.readers += readers
        return readers

    async def close_readers(self, readers: list[ReaderProcess]) -> None:
        for reader in readers:
            await reader.close()
            self.readers.remove(reader)


async def fanout_point(
    bench: Bench,
    gateway: Gateway | None,
    jobs: int,
    per_job: int,
    measuring: Callable[[], Awaitable[Any]] | None = None,
) -> dict[str, float]:
    """One load point through a gateway, or through ``subscribe()`` (``gateway`` None); what it
    measured. ``measuring`` is called once the readers are connected, as the tokens start."""
    args = bench.args
    bench.points += 1
    job_ids = [f"p{bench.points}-{i}" for i in range(jobs)]
    producer = Producer(bench.redis, bench.redis_port, bench.prefix, job_ids)
    await producer.start_jobs()
    side = "subscribe" if gateway is None else "gateway"
    if gateway is not None:
        readers = await bench.sse_readers(min(args.sse_processes, jobs * per_job), gateway)
        paths = [f"/jobs/{j}/events" for _ in range(per_job) for j in job_ids]
        measured = gateway.pid
    else:
        reader = await ReaderProcess.start("subscribe", bench.redis_url, bench.prefix, prefix=bench.pinning.measured)
        bench.readers.append(reader)
        readers = [reader]
        paths = [j for _ in range(per_job) for j in job_ids]
        measured = reader.pid
    try:
        opened = await asyncio.gather(*(r.ask({"open": paths[i :: len(readers)]}) for i, r in enumerate(readers)))
        if sum(o["opened"] for o in opened) != len(paths):
            raise RuntimeError(f"{side}: only {opened} of {len(paths)} readers opened")
        await asyncio.gather(*(r.ask({"mark": True}) for r in readers))
        if measuring is not None:
            await measuring()
        cpu0, redis0, self0, t0 = proc_cpu_s(measured), await bench.redis_cpu_s(), self_cpu_s(), time.monotonic()
        wait0, busy0 = proc_runq_wait_s(measured), cpu_busy_s(bench.pinning.cpu)
        late = await producer.run(args.rate, args.duration)
        await producer.end_jobs()
        within = max(60.0, 8 * args.duration)
        try:
            await asyncio.gather(*(r.ask({"wait_end": True}, within) for r in readers))
        except TimeoutError:
            print(f"  {side} {jobs}x{per_job}: not every reader saw its job end within {within}s", file=sys.stderr)
        cpu1, redis1, self1, t1 = proc_cpu_s(measured), await bench.redis_cpu_s(), self_cpu_s(), time.monotonic()
        wait1, busy1 = proc_runq_wait_s(measured), cpu_busy_s(bench.pinning.cpu)
        rss = proc_rss_mb(measured)
        done = await asyncio.gather(*(r.ask({"stop": True}) for r in readers))
    finally:
        await bench.close_readers(readers)
        await producer.delete()
    histogram: Counter[int] = Counter()
    for d in done:
        histogram.update({int(k): v for k, v in d["histogram"].items()})
    tokens = sum(d["tokens"] for d in done)
    expected = producer.sent * per_job
    p50, p99, top = percentiles(histogram)
    first = min(d["first_ns"] for d in done if d["first_ns"])
    last = max(d["last_ns"] for d in done)
    wall = t1 - t0
    readers_cpu = sum(d["cpu_s"] for d in done) if gateway is not None else 0.0
    return {
        "offered_events_per_s": jobs * per_job * args.rate,
        "events_per_s": tokens / ((last - first) / 1e9) if last > first else 0.0,
        "p50_ms": p50, "p99_ms": p99, "max_ms": top,
        "cpu_us_per_event": (cpu1 - cpu0) / max(tokens, 1) * 1e6,
        "cpu_share": (cpu1 - cpu0) / wall,
        "rss_mb": rss,
        "missing": expected - tokens,
        "unended": sum(d["connections"] - d["ended"] for d in done),
        "load_cpus_busy": (readers_cpu + (redis1 - redis0) + (self1 - self0)) / wall,
        "readers_cpu_share": readers_cpu / wall,
        "redis_cpu_share": (redis1 - redis0) / wall,
        "producer_cpu_share": (self1 - self0) / wall,
        "producer_late_p99_ms": late["late_p99_ms"],
        "runq_wait_share": (wait1 - wait0) / wall,
        "others_on_its_cpu_share": max(0.0, (busy1 - busy0) - (cpu1 - cpu0)) / wall,
    }  # fmt: skip


def ceiling(p99_by_load: dict[float, float], limit: float = CEILING_P99_MS) -> float:
    """The highest load before the first whose p99 passes ``limit`` (0: the lowest already does)."""
    best = 0.0
    for load in sorted(p99_by_load):
        if p99_by_load[load] > limit:
            break
        best = load
    return best


async def fanout(bench: Bench) -> None:
    """Both series, every point through each side in turn (the order rotates from run to run)."""
    args = bench.args
    gateways = {"gateway": Gateway(bench.redis_url, bench.prefix, bench.pinning)}
    for name, src in args.compare:
        gateways[f"gateway_{name}"] = Gateway(bench.redis_url, bench.prefix, bench.pinning, PYTHONPATH=src)
    for gateway in gateways.values():
        await gateway.start()
    series = {
        "fanout": [(args.fanout_jobs, c) for c in args.clients],
        "jobs": [(j, 1) for j in args.jobs],
    }
    all_sides = [*gateways, "subscribe"]
    try:
        for run in range(args.runs):
            sides = all_sides[run % len(all_sides) :] + all_sides[: run % len(all_sides)]
            for name, points in series.items():
                p99s: dict[str, dict[float, float]] = {side: {} for side in sides}
                for jobs, per_job in points:
                    measured = {}
                    for side in sides:
                        if p99s[side] and max(p99s[side].values()) > args.stop_after_ms:
                            continue  # far past its ceiling: a heavier load only takes longer to drain
                        gateway = gateways.get(side)
                        for g in gateways.values():
                            await g.quiet()
                        print(f"== run {run + 1} {name} {jobs} jobs x {per_job} {side}", file=sys.stderr, flush=True)
                        m = measured[side] = await measure_quietly(bench, gateway, jobs, per_job)
                        for key, value in m.items():
                            if key != "offered_events_per_s":
                                bench.record(f"{side}_{jobs}j_{per_job}c_{key}", value)
                        p99s[side][m["offered_events_per_s"]] = m["p99_ms"]
                    compare_point(bench, measured, f"{jobs}j_{per_job}c")
                ceilings = {side: ceiling(p99s[side]) for side in sides}
                for side in sides:
                    bench.record(f"ceiling_{side}_{name}_events_per_s", ceilings[side])
                    if side != "subscribe" and ceilings["subscribe"]:
                        ratio = ceilings[side] / ceilings["subscribe"]
                        bench.record(f"ratio_ceiling_{side}_vs_subscribe_{name}", ratio)
    finally:
        for gateway in gateways.values():
            await gateway.stop()


async def measure_quietly(bench: Bench, gateway: Gateway | None, jobs: int, per_job: int) -> dict[str, float]:
    """A point, measured again (up to ``--noisy-retries`` times, once the machine's load has
    fallen) when other processes kept the measured one waiting for its CPU more than ``--noisy``
    of the time: the machine is shared. The last measure is kept, with its count of retries."""
    args = bench.args
    retries = 0
    while True:
        m = await fanout_point(bench, gateway, jobs, per_job)
        if m["runq_wait_share"] <= args.noisy or retries >= args.noisy_retries:
            return {**m, "noisy_retries": retries}
        retries += 1
        print(f"  noisy ({m['runq_wait_share']:.0%} waiting for CPU): again once the load falls", file=sys.stderr)
        deadline = time.monotonic() + args.noisy_wait_s
        while os.getloadavg()[0] > args.noisy_load and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(5)


def compare_point(bench: Bench, measured: dict[str, dict[str, float]], point: str) -> None:
    """What each gateway adds to the baseline at one point; and the gateway against its variants."""
    base = measured.get("subscribe")
    for side, m in measured.items():
        if side == "subscribe":
            continue
        if base is not None:
            bench.record(f"added_p99_ms_{side}_{point}", m["p99_ms"] - base["p99_ms"])
            ratio = m["cpu_us_per_event"] / base["cpu_us_per_event"]
            bench.record(f"ratio_cpu_per_event_{side}_vs_subscribe_{point}", ratio)
        if side != "gateway" and "gateway" in measured:
            ratio = measured["gateway"]["cpu_us_per_event"] / m["cpu_us_per_event"]
            bench.record(f"ratio_cpu_per_event_gateway_vs_{side}_{point}", ratio)


async def idle(bench: Bench) -> None:
    """Idle connections (heartbeats only): the gateway's RSS by connections held, then by rounds."""
    args = bench.args
    gateway = Gateway(bench.redis_url, bench.prefix, bench.pinning, TOKENBUS_GATEWAY_HEARTBEAT=str(args.heartbeat))
    await gateway.start()
    readers = await bench.sse_readers(args.sse_processes, gateway)
    try:
        rss = {0: proc_rss_mb(gateway.pid)}
        bench.record("idle_rss_mb_0conn", rss[0])
        held = 0
        for step in args.idle_steps:
            paths = [f"/tags/idle-{i % (args.idle_streams or step)}/events" for i in range(held, step)]
            opened = await asyncio.gather(*(r.ask({"open": paths[i :: len(readers)]}) for i, r in enumerate(readers)))
            if sum(o["opened"] for o in opened) != len(paths):
                raise RuntimeError(f"idle: only {opened} of {len(paths)} connections opened")
            held = step
            rss[step] = proc_rss_mb(gateway.pid)
            bench.record(f"idle_rss_mb_{step}conn", rss[step])
        xs, ys = list(rss), list(rss.values())
        slope = statistics.linear_regression(xs, ys).slope
        bench.record("idle_kb_per_connection", slope * 1024)
        by_round, marks = {}, {}
        for k in args.beats:
            answers = await asyncio.gather(*(r.ask({"beats": k}) for r in readers))
            marks[k] = proc_cpu_s(gateway.pid), time.monotonic()
            by_round[k] = proc_rss_mb(gateway.pid)
            bench.record(f"idle_rss_mb_after_{k}beats", by_round[k])
            bench.record(f"idle_lost_connections_after_{k}beats", sum(a["lost"] for a in answers))
        first, last = args.beats[0], args.beats[-1]
        bench.record("idle_rss_growth_mb_over_beats", by_round[last] - by_round[first])
        (cpu0, t0), (cpu1, t1) = marks[first], marks[last]
        bench.record("idle_cpu_share", (cpu1 - cpu0) / (t1 - t0))
        bench.record("idle_cpu_us_per_heartbeat", (cpu1 - cpu0) / max((last - first) * held, 1) * 1e6)
        await asyncio.gather(*(r.ask({"stop": True}) for r in readers))
    finally:
        await bench.close_readers(readers)
        await gateway.stop()


# -- the profile ---------------------------------------------------------------------------------


async def profile(bench: Bench, at: list[tuple[int, int]]) -> None:
    """The gateway under py-spy at the given points (figures of a profiled run: not results)."""
    spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if spy is None:
        sys.exit("py-spy is not installed: .venv/bin/pip install py-spy")
    gateway = Gateway(bench.redis_url, bench.prefix, bench.pinning)
    await gateway.start()
    try:
        for jobs, per_job in at:
            out = RESULTS / f"gateway-profile-{jobs}x{per_job}"
            RESULTS.mkdir(parents=True, exist_ok=True)
            recorders: list[asyncio.subprocess.Process] = []
            # recording starts once the connections are open: the steady state only
            record = functools.partial(py_spies, recorders, spy, gateway.pid, int(bench.args.duration), out)
            m = await fanout_point(bench, gateway, jobs, per_job, record)
            for r in recorders:
                await r.wait()
            print(f"profiled {jobs} jobs x {per_job}: {orjson.dumps(m).decode()}", file=sys.stderr)
            print(summarise_profile(Path(f"{out}.txt")))
    finally:
        await gateway.stop()


FORMATS = (("raw", "txt"), ("flamegraph", "svg"))


async def py_spy(spy: str, pid: int, seconds: int, fmt: str, out: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        spy, "record", "--pid", str(pid), "--rate", "200", "--duration", str(seconds), "--nonblocking",
        "--format", fmt, "-o", str(out), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def py_spies(into: list[asyncio.subprocess.Process], spy: str, pid: int, seconds: int, out: Path) -> None:
    """py-spy recording ``pid`` for ``seconds``: collapsed stacks (``out``.txt) and a flame graph (.svg)."""
    into += [await py_spy(spy, pid, seconds, fmt, Path(f"{out}.{ext}")) for fmt, ext in FORMATS]


def summarise_profile(path: Path, top: int = 25) -> str:
    """The functions taking the most samples of a py-spy raw (collapsed) profile: inclusive and self."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = [f.split(":")[0] + ")" if ":" in f else f for f in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
    lines = [f"{path.name}: {total} samples", "inclusive:"]
    lines += [f"  {n / total:6.1%}  {f}" for f, n in inclusive.most_common(top)]
    lines += ["self:"]
    lines += [f"  {n / total:6.1%}  {f}" for f, n in own.most_common(top)]
    return "\n".join(lines)


# -- the run -------------------------------------------------------------------------------------


SCENARIOS = {"fanout": fanout, "idle": idle}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    pinning = Pinning.setup()
    print(f"pinning: {pinning.note}", file=sys.stderr)
    server = RedisServerProcess()  # on the driver's CPUs
    server.start()
    redis = Redis.from_url(server.url)
    bench = Bench(args, redis, server.url, server.port, pinning)
    try:
        if args.profile_at:
            await profile(bench, args.profile_at)
            return {}
        for name in args.only or SCENARIOS:
            print(f"== {name}", file=sys.stderr, flush=True)
            await SCENARIOS[name](bench)
    finally:
        for reader in bench.readers:
            await reader.close()
        await redis.aclose()
        server.close()
    return {
        "command": " ".join(sys.argv),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "pinning": pinning.note},
        "results": {
            name: {"min": min(v), "median": statistics.median(v), "max": max(v), "runs": v}
            for name, v in bench.results.items()
        },
    }


def table(report: dict[str, Any]) -> str:
    lines = ["| measure | min | median | max |", "|---|---:|---:|---:|"]
    for name, r in report["results"].items():
        lines.append(f"| {name} | {r['min']:,.2f} | {r['median']:,.2f} | {r['max']:,.2f} |")
    return "\n".join(lines)


def point(text: str) -> tuple[int, int]:
    jobs, _, per_job = text.partition("x")
    return int(jobs), int(per_job)


def variant(text: str) -> tuple[str, str]:
    name, _, src = text.partition("=")
    if not name.isidentifier() or not Path(src, "tokenbus", "gateway").is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=DIR, DIR a tokenbus source tree")
    return name, str(Path(src).resolve())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one run: proves the harness works")
    parser.add_argument("--runs", type=int, default=3, help="alternations of gateway and baseline")
    parser.add_argument("--only", action="append", choices=list(SCENARIOS))
    parser.add_argument("--out", type=Path, default=RESULTS / "gateway.json")
    parser.add_argument("--rate", type=float, default=50.0, help="tokens/s per job")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of tokens per point")
    parser.add_argument("--fanout-jobs", type=int, default=50, help="jobs of the clients-per-job series")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 5, 10, 20, 40], help="clients per job")
    parser.add_argument("--jobs", type=int, nargs="+", default=[100, 200, 400, 800], help="jobs (1 client each)")
    parser.add_argument("--stop-after-ms", type=float, default=250.0, help="a side's p99 past which its series stops")
    parser.add_argument("--noisy", type=float, default=0.1, help="runq wait share past which a point is redone")
    parser.add_argument("--noisy-retries", type=int, default=2)
    parser.add_argument("--noisy-load", type=float, default=1.5, help="1-min load average to wait for before redoing")
    parser.add_argument("--noisy-wait-s", type=float, default=300.0, help="longest wait for that load")
    parser.add_argument("--sse-processes", type=int, default=2, help="SSE reader processes")
    parser.add_argument("--idle-steps", type=int, nargs="+", default=[500, 1000, 1500, 2000])
    parser.add_argument("--idle-streams", type=int, default=0, help="tags the idle connections follow (0: one each)")
    parser.add_argument("--beats", type=int, nargs="+", default=[10, 20, 40, 60], help="heartbeat rounds")
    parser.add_argument("--heartbeat", type=float, default=1.0, help="TOKENBUS_GATEWAY_HEARTBEAT of the idle run")
    parser.add_argument("--profile-at", type=point, nargs="+", metavar="JOBSxCLIENTS")
    parser.add_argument(
        "--compare", type=variant, action="append", default=[], metavar="NAME=DIR",
        help="also measure a gateway running the tokenbus source tree in DIR (e.g. an older commit's git archive)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.duration, args.fanout_jobs, args.clients, args.jobs = 1, 1.0, 3, [1, 2], [6]
        args.idle_steps, args.beats, args.heartbeat = [10, 20], [2, 3], 0.2
        args.noisy_retries = 0  # the test suite runs beside other tests: no waiting for quiet
    return args


def run() -> None:
    args = parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # thousands of sockets, here and in children
    try:
        report = uvloop.run(main(args))
    except asyncio.CancelledError:
        sys.exit("stopped (SIGTERM): no results written")
    if not report:
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(table(report))


if __name__ == "__main__":
    run()
