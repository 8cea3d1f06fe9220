"""Where a run executes and how it ends: the device, the processes of distributed training, mixed precision, data
loading processes, the random state a resumed run continues from, a clean stop on Ctrl-C or SIGTERM, and the
messages of errors a user can fix."""

import contextlib
import datetime
import os
import random
import signal

import numpy as np
import torch
import torch.distributed as dist

# How long a process waits for the others in a collective operation: NCCL's default of 10 minutes is shorter than
# some things one process does alone (the first writing a checkpoint to slow storage, scoring COCO).
DISTRIBUTED_TIMEOUT = datetime.timedelta(minutes=60)


def resolve_device(name: str | None = None) -> torch.device:
    """torch.device for a name such as "cpu", "cuda" or "cuda:1"; None picks CUDA when available, else the CPU.
    Raises ValueError for an unknown name or an unavailable CUDA device. On CUDA, cuDNN is also told to find the
    fastest convolution algorithm of each input size once (cudnn.benchmark): padded sizes are multiples of 32,
    so there are few of them."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"unknown device {name!r}; expected cpu, cuda or cuda:N") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested, but PyTorch sees no CUDA GPU here; use --device cpu")
    torch.backends.cudnn.benchmark = device.type == "cuda"
    return device


def setup_distributed(device_name: str | None = None) -> tuple[torch.device, int, int]:
    """Device, rank and world size; under torchrun, one process per GPU (NCCL) or per CPU process (gloo).
    `device_name` as for resolve_device; under torchrun each process takes the GPU of its LOCAL_RANK."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = resolve_device(device_name)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=DISTRIBUTED_TIMEOUT)
    return device, rank, world_size


def mixed_precision_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype of mixed-precision training on `device`: fp16 on a GPU (as NVIDIA's retinanet-examples),
    bf16 on a CPU that computes in bf16 natively (AVX512-BF16 or AMX), otherwise None, full precision: elsewhere
    bf16 is emulated, and slower than fp32."""
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return torch.bfloat16
    return None


def inference_autocast(device: torch.device) -> torch.autocast:
    """Mixed precision for inference: fp16 on a GPU (the scores and boxes are decoded in fp32), none elsewhere."""
    return torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda")


class StopRequest:
    """A signal handler for Ctrl-C (SIGINT) and SIGTERM: the first asks the training loop to stop after the current
    step and save a checkpoint there; a second one interrupts at once."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


@contextlib.contextmanager
def stop_on_signals(stop: StopRequest):
    """Let Ctrl-C and SIGTERM (sent by schedulers before they kill a job) request a clean stop while inside."""
    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def error_message(error: Exception) -> str:
    """The message of a user error. One raised in a DataLoader worker process comes back with the worker's whole
    traceback in its message (PyTorch's way of re-raising it); its last line is the original message."""
    message = str(error)
    if "DataLoader worker" in message:
        message = message.rstrip().splitlines()[-1].removeprefix(f"{type(error).__name__}: ")
    return message


def default_workers(max_workers: int = 8) -> int:
    """Data loading processes for each training process: the CPU cores this machine gives it, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(max_workers, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def random_state() -> dict:
    """The state of every random number generator of this process (torch's, CUDA's, numpy's and Python's), as
    tensors and plain values that a checkpoint can hold."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": [name, keys.tolist(), position, has_gauss, cached_gaussian],
        "python": random.getstate(),
    }


def restore_random_state(state: dict) -> None:
    """Put every random number generator back in the state random_state() returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    random.setstate(state["python"])
