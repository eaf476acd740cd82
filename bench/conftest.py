"""Derived numbers (tokens/s, ratios, the machine and date) printed after the benchmark table."""

import datetime
import os
import platform

import pytest
import torch

LINES: list[str] = []


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (platform.processor() is often empty)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measured_on() -> dict:
    """Where and when a number was measured: CPU, cores, torch threads, load, device, date."""
    info = {"cpu": cpu_model(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_1min": round(os.getloadavg()[0], 2), "date": datetime.datetime.now().isoformat(timespec="minutes"),
            "torch": torch.__version__}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


@pytest.fixture
def machine_info() -> dict:
    """``measured_on()`` at the time of the benchmark that asks for it."""
    return measured_on()


@pytest.fixture(scope="session")
def race():
    """bench/race_data.py's activations and SAE weights at L0 ≈ 32 and at init (built once)."""
    import race_data

    return race_data.load()


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
    machine = (f"{cpu_model()}, {os.cpu_count()} CPUs, torch threads "
               f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    terminalreporter.section("derived numbers")
    terminalreporter.write_line(f"{datetime.date.today()} — {machine}")
    for line in LINES:
        terminalreporter.write_line(line)
