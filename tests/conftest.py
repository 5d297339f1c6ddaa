"""Shared test settings: seeded, derandomized hypothesis; no deadlines on a shared CPU.

The suite runs on one device, ``pytest --device cuda`` (default ``cpu``): the session sets it
as torch's default device, so every tensor and module a test builds lands there, and the
``device`` fixture names it for tests that move things explicitly. Tests that only make sense
on the CPU (RSS memory probes, gloo process groups, CPU-only peers) carry
``@pytest.mark.cpu_only`` and are skipped on other devices.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default="cpu",
        help="torch device the suite runs on (cpu, cuda, cuda:1, ...); default cpu",
    )


def _suite_device(config: pytest.Config) -> torch.device:
    dev = torch.device(config.getoption("--device"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: torch.cuda.is_available() is False here")
    return dev


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cpu_only: only meaningful on the CPU (skipped elsewhere)")
    dev = _suite_device(config)
    if dev.type != "cpu":
        torch.set_default_device(dev)
    if dev.type == "cuda":  # the tolerances are fp32's: no TF32 (cuDNN convolutions default to it)
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    dev = _suite_device(config)
    if dev.type == "cpu":
        return
    skip = pytest.mark.skip(reason=f"cpu_only test, suite device is {dev}")
    for item in items:
        if "cpu_only" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> torch.device:
    """The device the suite runs on (``--device``); torch's default device is set to it."""
    return _suite_device(pytestconfig)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
