"""Test-session set-up shared by all test modules."""

from shiftjax import host_memory


def pytest_configure(config):
  del config
  # As experiments/train.py does, before any test's first computation: the many small
  # trainings here then skip faulting in XLA's scratch buffers on every step.
  host_memory.reuse_freed_memory()
