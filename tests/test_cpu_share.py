"""Trainings running at the same time split the cores instead of oversubscribing them."""
import subprocess
import sys
import time

import torch

from conftest import REPO
from stages.cpu_share import CpuShare


def test_threads_follow_the_number_of_trainings_holding_a_slot(tmp_path):
    before = torch.get_num_threads()
    try:
        with CpuShare(tmp_path, cores=4) as first:
            assert first.running() == 1 and torch.get_num_threads() == 4
            with CpuShare(tmp_path, cores=4) as second:
                assert second.running() == 2 and first.adjust() == 2 and torch.get_num_threads() == 2
            assert first.adjust() == 4  # the other one finished
            with CpuShare(tmp_path, cores=1) as third:
                assert third.adjust() == 1  # never below one thread
    finally:
        torch.set_num_threads(before)


def test_a_killed_training_frees_its_slot(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
sys.path.insert(0, {str(REPO)!r})
from stages.cpu_share import CpuShare
with CpuShare({str(tmp_path)!r}, cores=2):
    print("holding", flush=True)
    time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    before = torch.get_num_threads()
    try:
        assert holder.stdout.readline().strip() == "holding"
        with CpuShare(tmp_path, cores=2) as share:
            assert share.running() == 2 and share.threads == 1
            holder.kill()
            holder.wait(timeout=10)
            time.sleep(0.1)
            assert share.running() == 1 and share.adjust() == 2
    finally:
        holder.kill()
        torch.set_num_threads(before)
