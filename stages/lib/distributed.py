"""Data-parallel training with torchrun: DistributedDataParallel over processes (gloo on CPU, nccl on CUDA).

`train.nproc: N` makes the train stage start itself under `torchrun --standalone --nproc-per-node N`, so
`dvc repro` and `dvc exp run` need nothing else; several machines run torchrun themselves:

    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29400 -m stages.train

Every rank walks through the same seeded global batches and trains on its slice of each one
(batch[rank::world]), so N processes see exactly the batches (and augmentations) a single process
would; gradients are averaged by DDP, losses and validation counts are summed over ranks, and only rank 0
writes outputs, TensorBoard and MLflow. Checkpoints hold the plain (unwrapped) state_dict: they load and
resume in a single process, and the other way round.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from stages.lib.errors import PipelineError


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # processes on this machine

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, *values: float, device: torch.device) -> list[float]:
        """Each value summed over all ranks (as they are, in a single process)."""
        if self.world == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()


SINGLE = Group()


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def launch(nproc: int, argv: list[str]) -> int:
    """Run `python -m stages.train ARGV` as `nproc` local processes under torchrun; its exit code."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "stages.train", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # and stop torchrun's notice
    return subprocess.call(command, env=env)


def init(device_name: str) -> tuple[Group, str]:
    """Join the process group torchrun set up; returns it and the device name this rank trains on."""
    if not under_torchrun():
        return SINGLE, device_name
    group = Group(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)),
                  int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise PipelineError(f"train.device is {device_name!r} but CUDA is not available; use auto or cpu")
        device_name = f"cuda:{group.local_rank}"
        torch.cuda.set_device(group.local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    return group, device_name


def finish(group: Group) -> None:
    if group.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
