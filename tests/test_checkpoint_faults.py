"""Damaged checkpoints and full disks: a resume or `load` falls back to the
newest checkpoint that restores whole (checksums catch changed bytes), and
a save that runs out of space is one clear error."""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from matsci_jax import checkpoints, train
from tests.conftest import REPO


def _state(step: int) -> dict:
  """Random (incompressible) arrays: a flipped bit in their files changes
  a value instead of breaking a compressed stream."""
  rng = np.random.default_rng(step)
  return {"params": {"w": jnp.asarray(rng.standard_normal((64, 32)),
                                      jnp.float32),
                     "b": jnp.asarray(rng.standard_normal(32), jnp.float32)},
          "step": jnp.int32(step)}


def _saved_run(workdir, steps=(1, 2, 3)) -> str:
  ckpt = checkpoints.Checkpoints(str(workdir), 5, "val/loss")
  for step in steps:
    ckpt.save(step, _state(step), {"position": step},
              {"val/loss": 1.0 / step})
  ckpt.close()
  return str(workdir)


def _flip_bit(step_dir) -> None:
  """Flips a bit in the largest file of array data of a step (for `_state`:
  its one large array, stored as is)."""
  folder = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
  path = max((os.path.join(folder, name) for name in os.listdir(folder)),
             key=os.path.getsize)
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x40  # An exponent bit: off by orders of 10.
  with open(path, "wb") as f:
    f.write(data)


def _cut_index(step_dir) -> None:
  """Truncates the files of a step's array index (OCDBT's b-tree)."""
  folder = os.path.join(step_dir, "state", "d")
  for name in os.listdir(folder):
    path = os.path.join(folder, name)
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def _change_checksum(step_dir, name: str) -> None:
  """As a flipped bit in the array `name` would look: a checksum that its
  bytes no longer match. (The arrays of a trained model sit in several
  files, some compressed: a bit flipped in them may miss or break them.)"""
  path = os.path.join(step_dir, "_CHECKPOINT_METADATA")
  record = json.load(open(path))
  assert "matsci_jax_checksums" in record["custom_metadata"], "none saved"
  sums = record["custom_metadata"]["matsci_jax_checksums"]["state"]
  sums[name][0] = f"{int(sums[name][0], 16) ^ 1:08x}"
  with open(path, "w") as f:
    json.dump(record, f)


class _Strategy:
  """One device: checkpoints hold the state as it is."""

  def host_state(self, state):
    return state

  def from_host_state(self, state):
    return state


class _Iterator:
  position = None

  def set_state(self, position):
    self.position = position


def _resume(workdir):
  """`train._resume` of a run saved by `_saved_run`, and the warnings."""
  ckpt = checkpoints.Checkpoints(str(workdir), 5, "val/loss")
  data = _Iterator()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    state, step = train._resume(ckpt, _Strategy(), _state(0), data,
                                str(workdir))
  return ckpt, state, step, data.position, caught


def _same(a, b) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(
      jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _skipped(caught) -> str:
  """The one warning of a skipped checkpoint."""
  (warning,) = caught
  assert warning.category is checkpoints.DamagedCheckpointWarning
  return str(warning.message)


def test_flipped_bits_are_caught_and_the_run_resumes_before_them(tmp_path):
  run = _saved_run(tmp_path)
  _flip_bit(tmp_path / "checkpoints" / "3")
  ckpt, state, step, position, caught = _resume(run)
  assert step == 2 and position == {"position": 2}
  assert _same(state, _state(2))
  assert _skipped(caught).startswith(
      f"checkpoint {tmp_path}/checkpoints/3 does not restore (checksum "
      "mismatch in 1 array(s) (params/w)")
  # Set aside, so that the resumed run saves step 3 again.
  assert sorted(os.listdir(tmp_path / "checkpoints")) == [
      "1", "2", "3.damaged"]
  ckpt.save(3, _state(3), {"position": 3})
  ckpt.close()
  assert ckpt.latest_step() == 3


def test_an_unreadable_latest_checkpoint_falls_back(tmp_path):
  run = _saved_run(tmp_path)
  _cut_index(tmp_path / "checkpoints" / "3")
  _, state, step, _, caught = _resume(run)
  assert step == 2 and _same(state, _state(2))
  message = _skipped(caught)
  assert message.startswith(
      f"checkpoint {tmp_path}/checkpoints/3 does not restore (")
  assert "Error reading" in message and "tensorstore_spec" not in message


def test_missing_orbax_metadata_is_named(tmp_path):
  run = _saved_run(tmp_path)
  os.remove(tmp_path / "checkpoints" / "3" / "state" / "_METADATA")
  _, _, step, _, caught = _resume(run)
  assert step == 2
  assert f"{tmp_path}/checkpoints/3/state/_METADATA is missing" in (
      _skipped(caught))


def test_no_checkpoint_that_restores_is_an_error_naming_each(tmp_path):
  run = _saved_run(tmp_path)
  _flip_bit(tmp_path / "checkpoints" / "3")
  _cut_index(tmp_path / "checkpoints" / "2")
  os.remove(tmp_path / "checkpoints" / "1" / "_CHECKPOINT_METADATA")
  with pytest.raises(checkpoints.CheckpointError) as error:
    _resume(run)
  lines = str(error.value).splitlines()
  assert lines[0] == f"no checkpoint in {tmp_path}/checkpoints restores:"
  assert lines[1].startswith("  step 3: checksum mismatch")
  assert lines[2].startswith("  step 2: ") and "Error reading" in lines[2]
  assert lines[3].startswith("  step 1: ") and "_CHECKPOINT_METADATA" in (
      lines[3])
  # Nothing was moved: the folder is as the run left it.
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2", "3"]


def test_checkpoints_saved_without_checksums_still_restore(tmp_path):
  """Checkpoints written before checksums were recorded: checks skipped."""
  with ocp.CheckpointManager(tmp_path / "checkpoints",
                             item_names=("state", "data")) as manager:
    manager.save(4, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_state(4)),
        data=ocp.args.JsonSave({"position": 4})))
  _, state, step, position, caught = _resume(tmp_path)
  assert not caught
  assert step == 4 and position == {"position": 4}
  assert _same(state, _state(4))


def test_checksums_describe_the_saved_arrays(tmp_path):
  _saved_run(tmp_path, steps=(7,))
  for folder in ("checkpoints", "best"):
    record = json.load(open(tmp_path / folder / "7" / "_CHECKPOINT_METADATA"))
    sums = record["custom_metadata"]["matsci_jax_checksums"]
    assert sums["algorithm"] == "crc32"
    assert sums["state"]["params/w"][1:] == ["float32", [64, 32]]
    assert sums["state"]["step"][1:] == ["int32", []]


# `load`: the trained model of the test session, copied and damaged.


_EMBEDDING = "ema_params/params/embed/embedding"


def _copy_run(trained_s2ef, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(trained_s2ef, run)
  (step,) = os.listdir(run / "checkpoints")
  return run, int(step)


def test_load_skips_a_damaged_latest_checkpoint(trained_s2ef, tmp_path):
  run, step = _copy_run(trained_s2ef, tmp_path)
  good = checkpoints.load(run, checkpoint="latest")
  # An older, intact step (a copy of the latest), and the latest damaged.
  shutil.copytree(run / "checkpoints" / str(step),
                  run / "checkpoints" / str(step - 50))
  _change_checksum(run / "checkpoints" / str(step), _EMBEDDING)
  with pytest.warns(checkpoints.DamagedCheckpointWarning,
                    match=f"checkpoints/{step} does not restore .checksum "
                    rf"mismatch in 1 array\(s\) \({_EMBEDDING}\)"):
    trained = checkpoints.load(run, checkpoint="latest")
  assert trained.step == step - 50 and _same(trained.params, good.params)
  # The damaged folder stays where it is: loading changes nothing.
  assert str(step) in os.listdir(run / "checkpoints")
  with pytest.raises(checkpoints.CheckpointError,
                     match=f"step {step}: checksum mismatch"):
    checkpoints.load(run / "checkpoints" / str(step))


def test_load_skips_a_damaged_best_checkpoint(trained_s2ef, tmp_path):
  run, step = _copy_run(trained_s2ef, tmp_path)
  best = run / "best"
  shutil.copytree(best / str(step), best / "60")
  metrics = json.load(open(best / "60" / "metrics" / "metrics"))
  metrics = {k: v * 2 for k, v in metrics.items()}  # Worse than step's.
  with open(best / "60" / "metrics" / "metrics", "w") as f:
    json.dump(metrics, f)
  _change_checksum(best / str(step), _EMBEDDING)
  with pytest.warns(checkpoints.DamagedCheckpointWarning,
                    match=f"best/{step} does not restore"):
    assert checkpoints.load(run).step == 60
  _cut_index(best / "60")
  with pytest.raises(checkpoints.CheckpointError) as error:
    checkpoints.load(run)
  message = str(error.value)
  assert f"step {step}: checksum mismatch" in message
  assert "step 60: " in message
  assert 'checkpoint="latest")' in message  # How to load the latest.
  assert checkpoints.load(run, checkpoint="latest").step == step


def test_load_names_a_missing_metadata_file(trained_s2ef, tmp_path):
  run, step = _copy_run(trained_s2ef, tmp_path)
  os.remove(run / "checkpoints" / str(step) / "state" / "_METADATA")
  with pytest.raises(checkpoints.CheckpointError,
                     match=f"checkpoints/{step}/state/_METADATA is missing"):
    checkpoints.load(run, checkpoint="latest")


_SHARDED = """
import json, os, warnings
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from matsci_jax import checkpoints

workdir = os.environ["WORKDIR"]
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
def state(step, sharding):
  rng = np.random.default_rng(step)
  return {"w": jax.device_put(rng.standard_normal((64, 32)).astype(
              np.float32), sharding(P("fsdp", None))),
          "step": jax.device_put(np.int32(step), sharding(P()))}
split = lambda spec: NamedSharding(mesh, spec)
one = lambda spec: jax.sharding.SingleDeviceSharding(jax.devices()[0])
ckpt = checkpoints.Checkpoints(workdir, 5, "loss")
for step in (1, 2):
  ckpt.save(step, state(step, split), {"position": step})
ckpt.close()
out = {"split": len(state(2, split)["w"].sharding.device_set)}
for name, sharding in (("one_device", one), ("mesh", split)):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    step, got, _ = checkpoints.Checkpoints(
        workdir, 5, "loss").restore_latest(state(0, sharding))
  out[name] = {"step": step, "warnings": len(caught), "same": bool(
      np.array_equal(np.asarray(got["w"]), np.asarray(state(2, one)["w"])))}
# Split this small, the arrays sit in OCDBT's own checksummed index: a
# flipped bit there is TensorStore's error. A changed record checks ours.
from tests.test_checkpoint_faults import _change_checksum
_change_checksum(os.path.join(workdir, "checkpoints", "2"), "w")
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter("always")
  step, _, _ = checkpoints.Checkpoints(workdir, 5, "loss").restore_latest(
      state(0, split))
out["changed"] = {"step": step, "warnings": [str(w.message) for w in caught]}
print(json.dumps(out))
"""


def test_checksums_of_arrays_split_over_eight_devices(tmp_path):
  """Saved from a 2x4 mesh, checked on restore onto one device and onto
  the mesh; a mismatch is caught."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", WORKDIR=str(tmp_path),
             XLA_FLAGS="--xla_force_host_platform_device_count=8"
             " --xla_cpu_collective_call_terminate_timeout_seconds=600"
             " --xla_cpu_collective_timeout_seconds=600")
  proc = subprocess.run([sys.executable, "-c", _SHARDED], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["split"] == 8
  for name in ("one_device", "mesh"):
    assert out[name] == {"step": 2, "warnings": 0, "same": True}, out
  assert out["changed"]["step"] == 1, out
  (warning,) = out["changed"]["warnings"]
  assert "checkpoints/2 does not restore (checksum mismatch in 1 array(s) " \
      "(w)" in warning


# A full disk.


def test_a_full_disk_is_one_clear_error(tmp_path, monkeypatch, caplog):
  """The arrays' writes fail with ENOSPC in orbax's background thread; the
  next save says so once, naming the folder and the free space."""
  from orbax.checkpoint._src.serialization import serialization

  async def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC),
                  str(tmp_path / "checkpoints"))

  ckpt = checkpoints.Checkpoints(str(tmp_path), 5, "val/loss")
  ckpt.save(1, _state(1), {"position": 1})
  ckpt.wait()
  monkeypatch.setattr(serialization, "async_serialize_from_host", no_space)
  ckpt.save(2, _state(2), {"position": 2}, {"val/loss": 0.5})
  with pytest.raises(checkpoints.CheckpointError) as error:
    ckpt.save(3, _state(3), {"position": 3})
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(
      f"no space left on device to save checkpoint step 2 in "
      f"{tmp_path}/checkpoints (")
  assert re.search(r"\(\d+\.\d [KMGT]iB free of \d+\.\d [KMGT]iB on "
                   r"that disk\)", message), message
  assert "latest complete checkpoint (step 1)" in message
  assert error.value.__cause__ is None and error.value.__suppress_context__
  ckpt.wait()  # The best save failed the same way: not reported again.
  assert not [r for r in caplog.records if r.exc_info], [
      r.getMessage() for r in caplog.records if r.exc_info]
  monkeypatch.undo()
  ckpt.close()


_TINY_DISK = """
import os, numpy as np, jax.numpy as jnp
from matsci_jax import checkpoints
ckpt = checkpoints.Checkpoints(os.environ["WORKDIR"], 5, "loss")
try:
  for step in range(1, 6):
    w = np.random.default_rng(step).standard_normal(60_000)
    ckpt.save(step, {"w": jnp.asarray(w, jnp.float32)}, {"position": step},
              {"loss": 1.0 / step})
finally:
  ckpt.wait()
"""


def test_a_really_full_disk_is_one_clear_error(tmp_path):
  """The same on a 1 MiB tmpfs (a mount namespace of our own, where user
  namespaces allow one): TensorStore's own ENOSPC, from its C++ writes."""
  disk = tmp_path / "disk"
  disk.mkdir()
  script = (f"mount -t tmpfs -o size=1m tmpfs {disk} && "
            f"exec {sys.executable} -c \"$SCRIPT\"")
  env = dict(os.environ, JAX_PLATFORMS="cpu", SCRIPT=_TINY_DISK,
             WORKDIR=str(disk / "run"))
  probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
  if probe.returncode != 0:
    pytest.skip("no user namespaces here for a tiny filesystem")
  proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1, proc.stderr[-4000:]
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith(
      "matsci_jax.checkpoint_integrity.CheckpointError: no space left on "
      "device to "
      "save checkpoint step ")
  assert f" in {disk}/run/" in lines[-1] and " free of 1.0 MiB" in lines[-1]
  assert sum("Traceback" in line for line in lines) == 1, proc.stderr
  assert len(lines) < 30, proc.stderr  # That traceback alone.
