"""Meshes and multi-device steps (8 fake CPU devices, in a subprocess)."""

import json
import os
import subprocess
import sys

import jax
import pytest

from matsci_jax import parallel
from tests.conftest import REPO


# Fake devices are threads: on two cores shared with another test worker,
# some of them can reach a collective long after the others, past XLA's
# default timeout, which aborts the process.
_SLOW_COLLECTIVES = (" --xla_cpu_collective_call_terminate_timeout_seconds=600"
                     " --xla_cpu_collective_timeout_seconds=600")


def _run_checks(name: str, devices: int = 8) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"
             + _SLOW_COLLECTIVES)
  out = subprocess.run([sys.executable, "-m", "tests.multi_device_checks",
                        name], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def step_results():
  return _run_checks("step")


@pytest.mark.parametrize("strategy", ["data_parallel", "fsdp", "pmap",
                                      "accumulate_4x2", "accumulate_1x4",
                                      "fsdp_scan_chunks",
                                      "fsdp_scan_stack_split"])
def test_step_equals_the_single_device_step(step_results, strategy):
  """Same loss, gradient, parameters, momentum (= gradient) and EMA."""
  r = step_results[strategy]
  ref_loss = step_results["reference_loss"]
  grad_scale = max(step_results["reference_grad_max"], 1.0)
  assert ref_loss > 1.0 and step_results["reference_update"] > 1e-4
  assert r["loss"] < 1e-6 * ref_loss, r
  assert r["force_loss"] < 1e-6 * ref_loss, r
  assert r["grad_norm"] < 1e-5 * step_results["reference_grad_norm"], r
  # A gradient summed twice, or not at all, would be off by a factor of
  # the device count: at the scale of the gradient itself.
  assert r["opt_state"] < 1e-5 * grad_scale, r
  assert r["params"] < 1e-3 * step_results["reference_update"], r
  assert r["ema"] < 1e-3 * step_results["reference_update"], r


def test_edges_split_over_devices_equal_one_device():
  """Energies, forces and stress with each structure's edges split over 8
  devices (atoms replicated), and also in chunks there."""
  results = _run_checks("edges")
  temp = results.pop("temp_bytes")
  assert len(results) == 8
  for name, errors in results.items():
    assert errors["force_scale"] > 1e-4, name  # Not trivially equal.
    for key in ("energy", "forces", "stress"):
      if key in errors:
        assert errors[key] < 1e-5, (name, key, errors)
  assert "stress" in results["egnn/split"]
  # Each device holds an eighth of the edges' activations.
  assert temp["split"] < temp["one_device"] / 4, temp


def test_fsdp_splits_the_parameters(step_results):
  # Stacked layers: split along a layer's own dimensions, or (width 30
  # over 4 devices) along the stacking axis.
  split = step_results["fsdp_scan_chunks"]["layer_arrays_split"]
  assert len(split) >= 4 and all(s.startswith("P(None,") for s in split)
  split = step_results["fsdp_scan_stack_split"]["layer_arrays_split"]
  assert len(split) >= 4 and all(s.startswith("P('fsdp'") for s in split)
  r = step_results["fsdp"]
  assert r["sharded_arrays"] >= 4
  # Four-way splits of most of the parameters.
  assert r["param_elements_per_device"] < 0.5 * r["param_elements"]


def test_flops_per_step_count_every_device(train_results):
  """The same step on 8 devices under every strategy: the same FLOPs (pmap
  lowers one device's program, jit one program whose per-device part runs
  in `shard_map`; both count all devices)."""
  flops = {name: train_results[name]["flops_per_step"]
           for name in ("data_parallel", "fsdp", "pmap")}
  reference = flops["pmap"]
  assert reference > 0, flops
  for value in flops.values():
    assert abs(value - reference) < 0.15 * reference, flops


def test_checkpoint_from_a_2x4_fsdp_mesh_restores_anywhere():
  r = _run_checks("checkpoint")
  assert r["saved_split"] > 0
  for target in ("mesh_8x1", "one_device"):
    assert r[target]["max_diff"] == 0.0, r
    assert r[target]["shardings_match"], r


@pytest.fixture(scope="module")
def train_results():
  return _run_checks("train")


def test_training_job_on_eight_devices(train_results):
  """Data parallel, FSDP and pmap runs of the job agree, compile once."""
  r = train_results
  reference = r["data_parallel"]
  for name in ("data_parallel", "fsdp", "pmap"):
    assert r[name]["recompiles"] == 0, r
    assert r[name]["devices"]["count"] == 8, r
    for metric in ("val_energy_mae", "val_force_mae"):
      assert abs(r[name][metric] - reference[metric]) < 1e-4 * max(
          reference[metric], 1e-3), (name, metric, r)
  assert r["fsdp"]["devices"]["mesh"] == {"data": 2, "fsdp": 4}


def _free_port() -> int:
  import socket
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def _two_processes(args) -> list[str]:
  """Runs `args(i)` as processes 0 and 1 with 4 fake devices each."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4"
             + _SLOW_COLLECTIVES)
  procs = [subprocess.Popen([sys.executable] + args(i), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-4000:]
    outs.append(out)
  return outs


def test_two_processes_match_one_device():
  """jax.distributed with a localhost coordinator, 4 devices per process."""
  port = _free_port()
  outs = _two_processes(lambda i: ["-m", "tests.multi_device_checks",
                                   "two_processes", str(i), str(port)])
  results = [json.loads(out.strip().splitlines()[-1]) for out in outs]
  assert sorted(r["process"] for r in results) == [0, 1]
  for r in results:
    assert r["loss"] < 1e-6 * r["reference_loss"], r
    assert r["opt_state"] < 1e-5, r  # the momentum: the gradient itself
    assert r["params"] < 1e-3 * r["reference_update"], r


def test_training_job_on_two_processes_matches_one_process(train_results,
                                                         tmp_path):
  """The main command on 2 processes x 4 devices, as 1 process x 8."""
  port = _free_port()
  workdir = tmp_path / "run"
  overrides = [f"--config.{k}={v}" for k, v in {
      "data.batch_size": 2, "train.num_steps": 6, "train.eval_every": 6,
      "train.checkpoint_every": 3, "distributed.initialize": True,
      "distributed.coordinator_address": f"localhost:{port}",
      "distributed.num_processes": 2}.items()]
  outs = _two_processes(lambda i: [
      "-m", "matsci_jax.main", "--config=configs/test.py",
      f"--workdir={workdir}", f"--config.distributed.process_id={i}",
      *overrides])
  assert "finished step 6" in outs[0] and "finished step" not in outs[1]
  result = json.loads((workdir / "metrics.json").read_text())
  assert result["devices"]["count"] == 8
  assert result["recompiles_after_warmup"] == 0
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
  reference = train_results["data_parallel"]
  for metric in ("energy_mae", "force_mae"):
    assert abs(result["metrics"][f"val/{metric}"]
               - reference[f"val_{metric}"]) < 1e-4 * reference[
                   f"val_{metric}"], (result["metrics"], reference)

  # The run resumes in one process on one device, from step 6.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  out = subprocess.run(
      [sys.executable, "-m", "matsci_jax.main", "--config=configs/test.py",
       f"--workdir={workdir}", "--config.data.batch_size=2",
       "--config.train.num_steps=9", "--config.train.eval_every=9",
       "--config.train.checkpoint_every=3"], cwd=REPO, env=env,
      capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-4000:]
  assert "finished step 9" in out.stdout
  resumed = json.loads((workdir / "metrics.json").read_text())
  assert resumed["devices"]["count"] == 1 and resumed["step"] == 9
  assert resumed["resumed_from_step"] == 6
  assert sorted(os.listdir(workdir / "checkpoints")) == ["6", "9"]


def test_mesh_sizes_are_inferred_and_checked():
  n = len(jax.devices())
  mesh = parallel.make_mesh(-1, 1)
  assert dict(mesh.shape) == {"data": n, "fsdp": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  with pytest.raises(ValueError, match="devices"):
    parallel.make_mesh(n + 1, 1)
  with pytest.raises(ValueError, match="at most one"):
    parallel.make_mesh(-1, -1)


def test_fsdp_splits_large_arrays_along_a_divisible_dimension():
  assert parallel.fsdp_dim((64, 128), 4, 1024) == 1
  assert parallel.fsdp_dim((128, 6), 4, 512) == 0
  assert parallel.fsdp_dim((7, 9), 4, 1) is None  # nothing divisible
  assert parallel.fsdp_dim((64,), 4, 1024) is None  # too small to split
  assert parallel.fsdp_dim((64, 128), 1, 1) is None  # no fsdp axis
