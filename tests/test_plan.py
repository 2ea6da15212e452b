"""`matsci_jax.plan`: per-device memory of a run's layouts, planned ahead of
time. Several devices need their own process (the device count is fixed
when jax starts), so those tests run one."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matsci_jax import config_files, plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN_SIZE = 64  # Splits the tiny model's 16-wide weights under FSDP.


def _config(small_devset):
  config = config_files.load("configs/test.py")
  config.data.path = str(small_devset / "s2ef")
  config.parallel.fsdp_min_size = MIN_SIZE
  config.train.progress_bar = False
  return config


def _independent_state(config):
  """The model's parameter and optimizer-state shapes, from the model and
  optimizer alone (not through `train.build` or any sharding)."""
  from ase.build import fcc111

  from matsci_jax import models, train_state
  from matsci_jax.data.graphs import batch_examples, graph_from_atoms
  model = models.from_config(config.model, 1)
  graph = batch_examples([graph_from_atoms(
      fcc111("Cu", (2, 2, 3), vacuum=5.0), 6.0, None)])
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), graph)
  opt = jax.eval_shape(train_state.make_optimizer(config).init, params)
  return params, opt


def _nbytes(tree, fsdp: int = 1) -> int:
  """Per-device bytes when arrays of MIN_SIZE or more elements with a
  dimension divisible by `fsdp` are split `fsdp` ways."""
  total = 0
  for x in jax.tree_util.tree_leaves(tree):
    size = math.prod(x.shape) * x.dtype.itemsize
    split = (fsdp > 1 and math.prod(x.shape) >= MIN_SIZE
             and any(d % fsdp == 0 for d in x.shape))
    total += size // fsdp if split else size
  return total


def _env(devices: int) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=plan.xla_flags(devices))


@pytest.mark.parametrize("text,expected", [
    ("80GB", 80 * 10 ** 9), ("80GiB", 80 * 2 ** 30), ("16e9", 16 * 10 ** 9),
    ("1.5 gib", int(1.5 * 2 ** 30)), ("512MiB", 512 * 2 ** 20),
    ("1000000", 10 ** 6), ("2TB", 2 * 10 ** 12)])
def test_parse_memory(text, expected):
  assert plan.parse_memory(text) == expected


@pytest.mark.parametrize("text", ["80G", "eighty", "", "-5GB", "0",
                                  "80 GBs", "0.5"])
def test_parse_memory_rejects(text):
  with pytest.raises(ValueError, match="device memory"):
    plan.parse_memory(text)


def test_layouts_and_their_overrides():
  assert plan.LAYOUT_NAMES == ("data_parallel", "fsdp", "fsdp_remat",
                               "fsdp_remat_bf16")
  assert plan.get_layout("data_parallel").overrides(8, 2) == {
      "parallel.strategy": "jit", "mesh.data": 8, "mesh.fsdp": 1,
      "model.remat": "", "precision": "float32"}
  bf16 = plan.get_layout("fsdp_remat_bf16")
  assert bf16.overrides(8) == {
      "parallel.strategy": "jit", "mesh.data": 1, "mesh.fsdp": 8,
      "model.remat": "full", "precision": "bf16"}
  assert bf16.overrides(8, 2)["mesh.data"] == 4
  with pytest.raises(ValueError, match="--fsdp 3 does not divide"):
    bf16.overrides(8, 3)
  with pytest.raises(ValueError, match="unknown layout 'zero3'"):
    plan.get_layout("zero3")
  config = config_files.load("configs/test.py")
  config.parallel.strategy = "pmap"
  cfg = plan.layout_config(config, bf16, 4)
  assert cfg.parallel.strategy == "jit"
  assert (cfg.mesh.fsdp, cfg.model.remat, cfg.precision) == (4, "full",
                                                             "bf16")
  assert config.model.remat == "" and config.mesh.fsdp == 1  # A copy.
  assert plan.command_line(plan.get_layout("fsdp").overrides(4)) == (
      "--config.parallel.strategy=jit --config.mesh.data=1 "
      "--config.mesh.fsdp=4 --config.model.remat='' "
      "--config.precision=float32")


def test_fsdp_sizes_split_only_dimensions_they_divide():
  state = {"w": jax.ShapeDtypeStruct((7000, 7000), jnp.float32),
           "b": jax.ShapeDtypeStruct((7000,), jnp.float32)}
  whole = 7000 * 7000 * 4
  assert plan.fsdp_bytes(state, 8, 2 ** 14) == whole // 8 + 7000 * 4
  assert plan.fsdp_bytes(state, 16, 2 ** 14) == whole + 7000 * 4
  assert plan.best_fsdp(state, 256, 2 ** 14) == 8
  assert plan.best_fsdp(state, 4, 2 ** 14) == 4
  assert plan.xla_flags(4, "--xla_foo=1 " + plan.DEVICE_COUNT_FLAG + "=2") \
      == ("--xla_foo=1 " + plan.CPU_MEMORY_SCHEDULER + "=false "
          + plan.DEVICE_COUNT_FLAG + "=4")


def test_plan_counts_state_and_decides_fit(small_devset):
  config = _config(small_devset)
  devices = jax.device_count()
  layout = plan.get_layout("data_parallel")
  step = plan.compile_layout(config, layout, devices)
  p = plan.layout_plan(step, plan.parse_memory("1TB"))
  params, opt = _independent_state(config)
  assert p.num_params == sum(math.prod(x.shape)
                             for x in jax.tree_util.tree_leaves(params))
  assert p.params == p.ema_params == p.gradients == _nbytes(params)
  assert p.opt_state == _nbytes(opt)
  assert p.unsplit_params == p.params
  state = p.params + p.ema_params + p.opt_state + 4  # + the int32 step.
  # XLA's own count: the donated state, and the batch fields the step uses.
  assert p.alias == state
  assert state < p.argument <= state + p.batch
  assert p.peak == p.argument + p.output - p.alias + p.temporaries
  assert p.fits and p.flops_per_step > 0
  assert plan.layout_plan(step, p.peak).fits
  assert not plan.layout_plan(step, p.peak - 1).fits
  with pytest.raises(ValueError, match=f"needs a process with that many, "
                     f"but this one has {devices}"):
    plan.plan(config, devices + 1, "80GB")


def test_fsdp_parameter_bytes_shrink_with_the_fsdp_size(small_devset):
  script = f"""
import json
from matsci_jax import config_files, plan, train
config = config_files.load("configs/test.py")
config.data.path = {str(small_devset / "s2ef")!r}
config.parallel.fsdp_min_size = {MIN_SIZE}
out = {{}}
for k in (1, 2, 4, 8):
  cfg = plan.layout_config(config, plan.get_layout("fsdp"), 8, k)
  state = train.build(cfg, abstract=True).state
  out[k] = [plan.sharded_bytes(state.params),
            plan.sharded_bytes(state.opt_state)]
print(json.dumps(out))
"""
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO,
                        env=_env(8), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = {int(k): v for k, v in
         json.loads(proc.stdout.strip().splitlines()[-1]).items()}
  params, opt = _independent_state(_config(small_devset))
  for k, (param_bytes, opt_bytes) in got.items():
    assert param_bytes == _nbytes(params, k), k
    assert opt_bytes == _nbytes(opt, k), k
  assert got[1][0] > got[2][0] > got[4][0] > got[8][0]


def test_command_plans_a_tiny_config(small_devset, tmp_path):
  out = tmp_path / "plan.json"
  cmd = [sys.executable, "-m", "matsci_jax.plan", "--config=configs/test.py",
         f"--config.data.path={small_devset / 's2ef'}",
         f"--config.parallel.fsdp_min_size={MIN_SIZE}", "--devices", "4",
         "--layouts=data_parallel,fsdp", "--device-memory", "1GiB",
         f"--json={out}"]
  proc = subprocess.run(cmd, cwd=REPO, env=_env(1), capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "sizes in MiB (binary units)" in proc.stdout
  assert "data_parallel (4x1)" in proc.stdout
  assert "fsdp (1x4)" in proc.stdout
  assert "--config.mesh.data=1 --config.mesh.fsdp=4" in proc.stdout
  result = json.loads(out.read_text())
  assert result["devices"] == 4 and result["device_memory"] == 2 ** 30
  dp, fsdp = result["layouts"]
  params, opt = _independent_state(_config(small_devset))
  assert dp["params"] == _nbytes(params)
  assert fsdp["params"] == _nbytes(params, 4) < dp["params"]
  assert fsdp["opt_state"] == _nbytes(opt, 4)
  assert dp["fits"] and fsdp["fits"]
  assert dp["mesh"] == {"data": 4, "fsdp": 1}
  # A size it cannot read fails before anything is built.
  bad = subprocess.run(cmd[:-3] + ["--device-memory", "80G"], cwd=REPO,
                       env=_env(1), capture_output=True, text=True,
                       timeout=120)
  assert bad.returncode != 0
  assert "device memory '80G'" in bad.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="measures resident memory through /proc")
def test_planned_peak_matches_the_measured_one(small_devset):
  from benchmarks import plan_validation
  results = plan_validation.run(
      ["data_parallel", "fsdp_remat_bf16"], 8, "configs/test.py",
      ["model.hidden_dim=64"], str(small_devset / "s2ef"))
  for r in results:
    assert abs(r["ratio"] - 1) <= 0.15, r
    assert r["measured_arguments_mb"] == pytest.approx(
        r["planned_arguments_mb"], rel=0.15), r


@pytest.mark.parametrize("accum", [1, 2])
def test_abstract_build_matches_the_training_state(small_devset, accum):
  """What the plan compiles is what training runs: the same state shapes,
  dtypes and shardings, and the same placed batch."""
  from matsci_jax import train
  from matsci_jax.data import pipeline
  config = _config(small_devset)
  config.train.grad_accum_steps = accum
  abstract = train.build(config, abstract=True)
  real = train.build(config)
  assert abstract.flops_per_step == real.flops_per_step > 0
  assert jax.tree_util.tree_structure(abstract.state) == \
      jax.tree_util.tree_structure(real.state)
  for a, r in zip(jax.tree_util.tree_leaves(abstract.state),
                  jax.tree_util.tree_leaves(real.state)):
    assert isinstance(a, jax.ShapeDtypeStruct)
    assert (a.shape, a.dtype, a.sharding) == (r.shape, r.dtype, r.sharding)
  first = real.train_data.first()
  n = real.strategy.batches_per_step  # As the input pipeline gives them.
  placed = real.strategy.place_train(
      first if n == 1 else pipeline.stack([first] * n))
  shapes = abstract.strategy.abstract_train_batch(first)
  for a, r in zip(jax.tree_util.tree_leaves(shapes),
                  jax.tree_util.tree_leaves(placed)):
    assert (a.shape, a.dtype, a.sharding) == (r.shape, r.dtype, r.sharding)


def test_flops_count_every_iteration_of_the_model_scans(small_devset):
  """XLA counts a loop's body once; the step's FLOPs count every layer of
  a scan over layers and every chunk of edges, as the loops' unrolled
  forms do."""
  from matsci_jax import train
  config = _config(small_devset)
  config.model.num_layers = 4
  config.model.remat = "full"
  unrolled = train.build(config, abstract=True).flops_per_step
  config.model.scan_layers = True
  scanned = train.build(config, abstract=True).flops_per_step
  np.testing.assert_allclose(scanned, unrolled, rtol=0.02)
  config.model.scan_layers = False
  config.model.edge_chunk = 64
  # Chunks recompute their edge work once more in the backward pass.
  assert train.build(config, abstract=True).flops_per_step > unrolled


def test_bisection_finds_the_smallest_fitting_count():
  from benchmarks.plan_paper_sizes import smallest_fitting
  counts = [1, 2, 4, 8, 16, 32]
  for threshold in counts:
    checked = []

    def fits(d):
      checked.append(d)
      return d >= threshold

    assert smallest_fitting(counts, fits) == threshold
    assert len(checked) <= 4  # The last, then bisection.
  assert smallest_fitting(counts, lambda d: False) is None
  assert smallest_fitting([], lambda d: True) is None
