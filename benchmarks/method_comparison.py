"""Shared by the accuracy benchmarks: one training per method over the same base config."""

import os
from typing import Any, Mapping

import ml_collections

from shiftjax import train


def train_each(base: ml_collections.ConfigDict, methods: Mapping[str, Mapping[str, Any]],
               parent_workdir: str) -> dict[str, dict]:
  """{method name: summary} of ``base`` trained once per method's overrides.

  Runs one after the other (never two trainings at once on a small machine), each in
  ``<parent_workdir>/<first word of the name, lower case>`` so that an interrupted
  benchmark resumes; nothing is exported.
  """
  summaries = {}
  for name, overrides in methods.items():
    config = base.copy_and_resolve_references()
    config.unlock()
    config.update(overrides)
    config.export_packed = False
    workdir = os.path.join(parent_workdir, name.split()[0].lower())
    summaries[name] = train.train_and_evaluate(config, workdir)
  return summaries
