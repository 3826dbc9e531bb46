"""The benchmarks' markdown tables."""

from shiftjax.benchmarking import tables


def test_mean_std_and_markdown():
  assert tables.mean_std([1.0, 3.0]) == (2.0, 2 ** 0.5)
  assert tables.mean_std([0.5]) == (0.5, 0.0)
  assert tables.markdown(("method", "top-1"), [("float", "87.26"), ("S3", 84.06)]) == (
      "| method | top-1 |\n|---|---|\n| float | 87.26 |\n| S3 | 84.06 |")
