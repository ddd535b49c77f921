"""Sharing the CPU cores between trainings that run at the same time (`dvc queue start -j 2`, two
terminals, ...): each one holds a slot (an flock on a file in a machine-wide folder) while it trains and,
between batches, uses cores // (trainings running now) threads, so two jobs on two cores get one thread
each instead of four threads fighting over two cores. A lock dies with its process, even on SIGKILL.
"""
from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

import torch

SLOTS_DIR = Path(tempfile.gettempdir()) / "tudui-pipeline-cpu-slots"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class CpuShare:
    """with CpuShare() as share: ... share.adjust() now and then sets torch's thread count."""

    def __init__(self, folder: Path = SLOTS_DIR, cores: int | None = None, max_slots: int = 64):
        self.folder, self.cores, self.max_slots = Path(folder), cores or _cores(), max_slots
        self.file, self.threads = None, None

    def __enter__(self) -> "CpuShare":
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for index in range(self.max_slots):
                file = open(self.folder / f"slot-{index}", "a")
                try:
                    fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    file.close()
                    continue
                self.file = file
                break
        except OSError:  # an unwritable temp folder: train alone, with every core
            self.file = None
        self.adjust()
        return self

    def __exit__(self, *exc) -> None:
        if self.file:
            self.file.close()  # releases the lock
            self.file = None

    def running(self) -> int:
        """How many trainings hold a slot now (this one included)."""
        if self.file is None:
            return 1
        count = 0
        for path in self.folder.glob("slot-*"):
            try:
                with open(path, "a") as file:
                    fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                count += 1
            except OSError:
                pass
        return max(count, 1)

    def adjust(self) -> int:
        threads = max(1, self.cores // self.running())
        if threads != self.threads:
            torch.set_num_threads(threads)
            self.threads = threads
        return threads
