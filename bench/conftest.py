"""Derived numbers (tokens/s, ratios, the machine and date) printed after the benchmark table."""

import datetime
import os
import platform

import pytest
import torch

LINES: list[str] = []


@pytest.fixture
def report(benchmark):
    """report(key, value, fmt): keep a derived number with the benchmark and print it at the end."""

    def add(key: str, value: float, fmt: str = ",.0f") -> None:
        benchmark.extra_info[key] = value
        LINES.append(f"{benchmark.name}: {key} = {value:{fmt}}")

    return add


def pytest_terminal_summary(terminalreporter):
    if not LINES:
        return
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
               f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    terminalreporter.section("derived numbers")
    terminalreporter.write_line(f"{datetime.date.today()} — {machine}")
    for line in LINES:
        terminalreporter.write_line(line)
