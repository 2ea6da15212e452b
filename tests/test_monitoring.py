"""Metric files stay readable whatever happened to the run before."""

import csv

from matsci_jax import monitoring


def _rows(path):
  with open(path, newline="") as f:
    return list(csv.reader(f))


def test_resumed_run_keeps_the_csv_header(tmp_path):
  # A run killed before its first flush leaves an empty metrics.csv.
  (tmp_path / "metrics.csv").write_text("")
  writer = monitoring.MetricWriter(str(tmp_path))
  writer.write(10, {"train/loss": 1.5})
  writer.close()
  assert _rows(tmp_path / "metrics.csv") == [
      ["step", "metric", "value"], ["10", "train/loss", "1.5"]]


def test_drop_rows_after_restores_a_lost_header(tmp_path):
  path = tmp_path / "metrics.csv"
  path.write_text("10,train/loss,1.5\n20,train/loss,1.25\n")
  monitoring.drop_rows_after(str(tmp_path), 10)
  assert _rows(path) == [["step", "metric", "value"],
                         ["10", "train/loss", "1.5"]]
  path.write_text("")
  monitoring.drop_rows_after(str(tmp_path), 10)
  assert _rows(path) == [["step", "metric", "value"]]
