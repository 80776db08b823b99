"""A sharded library's other processes: shards 1..N-1, each an Engine that mirrors the driver.

(The worker's loop is ``engine.serve_shard``; this module starts and stops the processes.)

The driver is the Engine the user made (shard 0). It starts one process per further shard,
joins them in a ``torch.distributed`` group and binds its all-reduce (runtime/parallel.py):
gloo on CPUs, NCCL on GPUs (shard r on ``cuda:(I + r)``), gloo again where shards share GPUs.
Then, before each forward it runs itself, it sends the same call to every worker, so all
shards reach each all-reduce together: ``_forward`` (a chunk), ``decode_token`` (a step),
``_new_cache`` and ``rollback``. Sampling, text and the token list live in the driver only; a
worker keeps only its cache and its length.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import socket
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from mistral_compile.config import MistralConfig, read_config
from mistral_compile.errors import MistralCompileError
from mistral_compile.runtime.library import parse_device
from mistral_compile.runtime.parallel import (
    all_reduce_bound,
    collective_backend,
    library_shards,
    register_all_reduce,
    shard_device,
    shard_weights,
    torch_all_reduce,
    unbind_all_reduce,
)

logger = logging.getLogger("mistral_compile.runtime")

TIMEOUT = timedelta(seconds=300)  # a collective waiting longer than this fails (a shard died)
# NVLink multicast stays off wherever shards run (the machines' rule); children inherit these
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}


def gpu_count(device: str) -> int:
    """How many GPUs the shards may spread over (0 on CPUs)."""
    if not device.startswith("cuda"):
        return 0
    import torch

    return torch.cuda.device_count()


def join_shards(rank: int, shards: int, address: str, device: str = "cpu") -> None:
    """Join this process to the shards' group and bind its all-reduce to it.

    ``device`` is this shard's own (``shard_device``): NCCL needs it current before the group
    forms.
    """
    import torch.distributed as dist

    for key, value in NO_MULTICAST.items():
        os.environ.setdefault(key, value)
    backend = collective_backend(device, shards, gpu_count(device))
    if backend == "nccl":
        import torch

        torch.cuda.set_device(int(device.partition(":")[2] or 0))
    dist.init_process_group(backend, init_method=address, rank=rank, world_size=shards,
                            timeout=TIMEOUT)
    register_all_reduce(torch_all_reduce())


def run_worker(rank: int, shards: int, address: str, model_dir: str | os.PathLike,
               args: dict[str, Any], pipe: Any, build: Callable[[Any, dict], Any],
               handle: Callable[[Any, str, tuple], None]) -> None:
    """A worker process's life (``engine.serve_shard``, ``llm.serve_batch_shard``).

    It joins the group, takes its shard's weights, builds its Engine or LLM with ``build(params,
    args)``, says it is ready, then runs ``handle(it, op, op_args)`` for each call the driver
    sends, in order, until "stop". The weights are cut from the model's, or made by the
    driver's ``make_params(device, rank)`` (bench's random weights: runtime/bench.py
    RandomParams).
    """
    make = args.pop("make_params", None)
    join_shards(rank, shards, address, args["device"])
    if make is not None:
        params = make(args["device"], rank)
    else:
        params = shard_weights(model_dir, read_config(model_dir).with_shards(shards), rank)
    target = build(params, args)
    pipe.send("ready")
    while True:
        op, op_args = pipe.recv()
        if op == "stop":
            return
        handle(target, op, op_args)


def start_shards(model_dir: str | os.PathLike, lib: str | os.PathLike, device: str,
                 params: Mapping[str, Any] | None, worker_args: dict[str, Any],
                 target: Callable[..., None]) -> tuple[ShardGroup | None, Mapping | None]:
    """The driver's start (Engine, LLM): the other shards' processes and shard 0's weights.

    The shard count is the library's (``compile --tensor-parallel-shards``), whatever the
    model folder's config says: weights converted once serve every count. Any other library,
    or a shard's own process (its all-reduce already bound), gets ``(None, params)`` back
    unchanged. ``worker_args`` (with ``device``) make each worker's Engine or LLM, run by
    ``target`` (``engine.serve_shard``, ``llm.serve_batch_shard``).
    """
    if all_reduce_bound() or not Path(lib).is_file():  # a worker; or Artifact says "not found"
        return None, params(device, 0) if callable(params) else params
    config = read_config(model_dir).with_shards(library_shards(lib, device))
    if config.tensor_parallel_shards == 1:
        return None, params(device, 0) if callable(params) else params
    if params is not None and not callable(params):
        raise MistralCompileError(f"{model_dir}: a tensor-parallel model loads its shards' "
                                  "weights from its folder; params cannot be given (a maker "
                                  "of each shard's, called in its process, can)")
    kind, index = parse_device(device)
    device = kind if kind == "cpu" else f"cuda:{index}"
    group = ShardGroup(Path(model_dir), Path(lib), config,
                       {"device": device, "make_params": params, **worker_args}, target)
    if params is not None:
        return group, params(shard_device(device, 0, config.tensor_parallel_shards,
                                          gpu_count(device)), 0)
    return group, shard_weights(model_dir, config, 0)


class ShardGroup:
    """The driver's side: the workers' pipes; ``send`` one call to all of them."""

    def __init__(self, model_dir: Path, lib: Path, config: MistralConfig,
                 engine_args: dict[str, Any], target: Callable[..., None]) -> None:
        """Start shards 1..N-1 and join them as shard 0.

        Each runs ``target(rank, shards, address, model_dir, lib, engine_args, pipe)``
        (``engine.serve_shard``), its ``device`` its own (``shard_device``).
        """
        shards = config.tensor_parallel_shards
        device = engine_args["device"]
        gpus = gpu_count(device)
        if device.startswith("cuda") and gpus < shards:
            logger.warning("%d tensor-parallel shards on %d GPU(s): shards share GPUs and "
                           "reduce through gloo (a check of the path, not a speed-up)", shards,
                           gpus)
        if multiprocessing.current_process().daemon:  # e.g. serve's engine process
            raise MistralCompileError(f"{lib}: tensor-parallel shards start their processes "
                                      "from the caller's, which is a daemon process here "
                                      "(serve's engine): not supported yet")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        for key, value in NO_MULTICAST.items():  # before the children exist: they inherit
            os.environ.setdefault(key, value)
        ctx = multiprocessing.get_context("spawn")
        self.pipes, self.procs = [], []
        for rank in range(1, shards):
            mine, theirs = ctx.Pipe()
            args = {**engine_args, "device": shard_device(device, rank, shards, gpus)}
            proc = ctx.Process(target=target, daemon=True,
                               args=(rank, shards, address, os.fspath(model_dir),
                                     os.fspath(lib), args, theirs))
            proc.start()
            self.pipes.append(mine)
            self.procs.append(proc)
        join_shards(0, shards, address, shard_device(device, 0, shards, gpus))
        for rank, pipe in enumerate(self.pipes, 1):
            if not pipe.poll(TIMEOUT.total_seconds()) or pipe.recv() != "ready":
                raise MistralCompileError(f"{lib}: tensor-parallel shard {rank} did not start")
        atexit.register(self.close)

    def send(self, op: str, *args: Any) -> None:
        for pipe in self.pipes:
            pipe.send((op, args))

    def close(self) -> None:
        """Stop the workers (once)."""
        if not self.pipes:
            return
        for pipe in self.pipes:
            try:
                pipe.send(("stop", ()))
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(timeout=10)
        self.pipes, self.procs = [], []
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        unbind_all_reduce()
