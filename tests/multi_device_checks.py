"""Multi-device checks, run in a subprocess with fake CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python -m tests.multi_device_checks step

Prints one JSON object of maximum differences against the single-device
reference; `tests/test_parallel.py` runs it and asserts on them. The
reference is one step on one device over one padded batch holding every
structure; the parallel steps see the same structures split into one
padded batch per device (and per micro-batch).
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from ase.build import add_adsorbate, fcc100, fcc111
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms

from matsci_jax import models, parallel, train_state, train_step
from matsci_jax.data import batching
from matsci_jax.data.graphs import batch_examples, graph_from_atoms
from matsci_jax.energy import Normalizer

CUTOFF = 4.0
NUM_STRUCTURES = 16


def structures(n: int = NUM_STRUCTURES, seed: int = 0) -> list:
  """Small EMT-labelled slabs with adsorbates, of varying sizes."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    build = fcc111 if i % 2 else fcc100
    slab = build(["Cu", "Pt", "Ni", "Au"][i % 4], (2, 2, 2 + i % 2),
                 vacuum=4.0)
    add_adsorbate(slab, ["O", "H", "C"][i % 3], 1.5, "ontop")
    slab.pbc = True
    slab.set_constraint(FixAtoms(indices=range(4)))
    slab.rattle(0.05, seed=int(rng.integers(1 << 30)))
    slab.calc = EMT()
    slab.get_forces()
    out.append(slab)
  return out


def examples() -> list[dict]:
  return [graph_from_atoms(a, CUTOFF, None) for a in structures()]


def per_device_batches(exs: list[dict], groups: int) -> list:
  """`groups` padded batches of equal budget, structures dealt in order."""
  chunks = np.array_split(np.arange(len(exs)), groups)
  budget = batching.Budget(
      n_node=max(sum(len(exs[i]["atomic_numbers"]) for i in c)
                 for c in chunks) + 3,
      n_edge=max(sum(len(exs[i]["senders"]) for i in c) for c in chunks) + 5,
      n_graph=max(len(c) for c in chunks) + 1)
  return [batch_examples([exs[i] for i in c], budget) for c in chunks]


def setup(model_kwargs=None):
  kwargs = dict(name="egnn", hidden_dim=32, num_layers=2, num_radial=4,
                readout_hidden=16, cutoff=CUTOFF)
  kwargs.update(model_kwargs or {})
  name = kwargs.pop("name")
  model = models.get(name, **kwargs)
  norm = Normalizer(scale=jnp.float32(0.5), shift=jnp.float32(-1.0),
                    element_energies=jnp.zeros(119, jnp.float32))
  loss_cfg = ml_collections.ConfigDict(dict(
      energy_weight=1.0, force_weight=10.0, energy_loss="mae",
      energy_per_atom=True, force_loss="l2mae", free_atoms_only=True))
  loss_fn = train_step.make_s2ef_loss(model, norm, loss_cfg)
  # SGD with momentum: after one step the momentum is the gradient and the
  # update is proportional to it (Adam's first update is not: it divides
  # the gradient by its own size, hiding a wrong gradient sum).
  optimizer = optax.sgd(1e-3, momentum=0.9)
  return model, loss_fn, optimizer


def max_diff(a, b) -> float:
  return float(max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))),
      a, b))))


def check_step() -> dict:
  """Data parallel, FSDP and pmap against one device; accumulation."""
  devices = jax.devices()
  assert len(devices) == 8, devices
  exs = examples()
  model, loss_fn, optimizer = setup()
  merged = batch_examples(exs)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), merged)
  state = train_state.TrainState.create(params, optimizer)
  single = jax.jit(train_step.make_train_step(loss_fn, optimizer))
  ref_state, ref_metrics = single(state, merged)
  ref_grads = jax.grad(lambda p: loss_fn(p, merged)[0])(params)
  results = {"reference_loss": float(ref_metrics["loss"]),
             "reference_grad_norm": float(ref_metrics["grad_norm"]),
             "reference_update": max_diff(ref_state.params, params)}

  def compare(name, new_state, metrics, ref_state=ref_state,
              ref_metrics=ref_metrics):
    new_state = jax.device_get(new_state)
    results[name] = {
        "loss": abs(float(metrics["loss"]) - float(ref_metrics["loss"])),
        "force_loss": abs(float(metrics["force_loss"])
                          - float(ref_metrics["force_loss"])),
        "grad_norm": abs(float(metrics["grad_norm"])
                         - float(ref_metrics["grad_norm"])),
        "params": max_diff(new_state.params, ref_state.params),
        "opt_state": max_diff(new_state.opt_state, ref_state.opt_state),
        "ema": max_diff(new_state.ema_params, ref_state.ema_params)}

  stacked = parallel.stack_batches(per_device_batches(exs, 8))
  for name, (data, fsdp) in {"data_parallel": (8, 1),
                             "fsdp": (2, 4)}.items():
    mesh = parallel.make_mesh(data, fsdp)
    sharding = parallel.state_shardings(state, mesh, fsdp=fsdp > 1,
                                        min_size=64)
    step = parallel.make_sharded_train_step(loss_fn, optimizer, mesh,
                                            sharding)
    placed = jax.device_put(jax.tree_util.tree_map(jnp.copy, state),
                            sharding)
    batch = jax.device_put(stacked, parallel.batch_sharding(mesh))
    new_state, metrics = step(placed, batch)
    compare(name, new_state, metrics)
    if fsdp > 1:
      kernels = [s for s in jax.tree_util.tree_leaves(
          new_state.params, is_leaf=lambda x: hasattr(x, "sharding"))]
      results[name]["sharded_arrays"] = sum(
          "fsdp" in str(k.sharding.spec) for k in kernels)
      shard_shapes = [k.addressable_shards[0].data.shape for k in kernels]
      results[name]["param_elements_per_device"] = int(sum(
          np.prod(s) for s in shard_shapes))
      results[name]["param_elements"] = int(sum(k.size for k in kernels))

  # Layers scanned over stacked parameters, rematerialised, with their
  # edges in chunks: each layer gathers its FSDP slices where it runs.
  # Width 30 and 4 layers over fsdp 4: only the stacking axis divides, so
  # the layers' arrays are split along it and gathered before the scan.
  for name, extra in (("fsdp_scan_chunks", dict(edge_chunk=64)),
                      ("fsdp_scan_stack_split",
                       dict(hidden_dim=30, num_layers=4))):
    model_s, loss_s, _ = setup(dict(scan_layers=True, remat="full", **extra))
    state_s = train_state.TrainState.create(
        jax.jit(model_s.init)(jax.random.PRNGKey(0), merged), optimizer)
    ref_s = jax.jit(train_step.make_train_step(loss_s, optimizer))(
        state_s, merged)
    mesh = parallel.make_mesh(2, 4)
    sharding = parallel.state_shardings(state_s, mesh, fsdp=True,
                                        min_size=64)
    step = parallel.make_sharded_train_step(loss_s, optimizer, mesh,
                                            sharding)
    new_state, metrics = step(
        jax.device_put(jax.tree_util.tree_map(jnp.copy, state_s), sharding),
        jax.device_put(stacked, parallel.batch_sharding(mesh)))
    compare(name, new_state, metrics, *ref_s)
    layers = jax.tree_util.tree_leaves(new_state.params["params"]["layers"])
    results[name]["layer_arrays_split"] = [
        str(x.sharding.spec) for x in layers if "fsdp" in str(x.sharding.spec)]

  pmap_step = parallel.make_pmap_train_step(loss_fn, optimizer)
  new_state, metrics = pmap_step(parallel.replicate(state), stacked)
  compare("pmap", jax.tree_util.tree_map(lambda x: x[0], new_state),
          jax.tree_util.tree_map(lambda x: x[0], metrics))

  # Accumulation: 4 devices x 2 micro-batches, and one device x 4.
  micro = per_device_batches(exs, 8)
  accum = parallel.stack_batches([parallel.stack_batches(micro[i:i + 2])
                                  for i in range(0, 8, 2)])
  mesh = parallel.make_mesh(4, 1, devices=devices[:4])
  sharding = parallel.state_shardings(state, mesh)
  step = parallel.make_sharded_train_step(loss_fn, optimizer, mesh, sharding,
                                          grad_accum_steps=2)
  # A copy: the step donates its state, and placement may share buffers.
  new_state, metrics = step(jax.device_put(jax.tree_util.tree_map(
      jnp.copy, state), sharding),
                            jax.device_put(accum,
                                           parallel.batch_sharding(mesh)))
  compare("accumulate_4x2", new_state, metrics)
  one = jax.jit(train_step.make_train_step(loss_fn, optimizer,
                                           grad_accum_steps=4))
  new_state, metrics = one(state, parallel.stack_batches(
      per_device_batches(exs, 4)))
  compare("accumulate_1x4", new_state, metrics)
  results["reference_grad_max"] = float(max(
      np.abs(np.asarray(g)).max() for g in jax.tree_util.tree_leaves(
          ref_grads)))
  return results


def check_checkpoint(tmp: str) -> dict:
  """A state saved on mesh (2, 4) with FSDP restores on (8, 1) and on one
  device, with the shardings asked for and the same values."""
  import orbax.checkpoint as ocp
  exs = examples()
  model, _, optimizer = setup(dict(hidden_dim=64))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), batch_examples(exs))
  state = train_state.TrainState.create(params, optimizer)
  mesh = parallel.make_mesh(2, 4)
  saved = jax.device_put(state, parallel.state_shardings(
      state, mesh, fsdp=True, min_size=64))
  with ocp.CheckpointManager(tmp) as manager:
    manager.save(3, args=ocp.args.StandardSave(saved))
    manager.wait_until_finished()
  out = {"saved_split": sum("fsdp" in str(x.sharding.spec)
                            for x in jax.tree_util.tree_leaves(saved))}
  targets = {
      "mesh_8x1": parallel.state_shardings(state, parallel.make_mesh(8, 1)),
      "one_device": jax.tree_util.tree_map(
          lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]),
          state)}
  for name, shardings in targets.items():
    abstract = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        state, shardings)
    with ocp.CheckpointManager(tmp) as manager:
      restored = manager.restore(3, args=ocp.args.StandardRestore(abstract))
    out[name] = {
        "max_diff": max_diff(restored, state),
        "shardings_match": all(
            x.sharding == s for x, s in zip(
                jax.tree_util.tree_leaves(restored),
                jax.tree_util.tree_leaves(shardings)))}
  return out


def check_train(tmp: str) -> dict:
  """The training job on 8 devices: data parallel, FSDP and pmap agree."""
  import os
  from configs import test as test_config
  from matsci_jax import train
  out = {}
  for name, (data, fsdp, strategy) in {
      "data_parallel": (8, 1, "jit"), "fsdp": (2, 4, "jit"),
      "pmap": (-1, 1, "pmap")}.items():
    config = test_config.get_config()
    config.data.batch_size = 2
    config.train.num_steps = 6
    config.train.eval_every = 6
    config.train.checkpoint_every = 3
    config.mesh.data, config.mesh.fsdp = data, fsdp
    config.parallel.strategy = strategy
    config.parallel.fsdp_min_size = 64
    result = train.train_and_evaluate(config, os.path.join(tmp, name))
    out[name] = {"val_energy_mae": result["metrics"]["val/energy_mae"],
                 "val_force_mae": result["metrics"]["val/force_mae"],
                 "recompiles": result["recompiles_after_warmup"],
                 "devices": result["devices"],
                 "flops_per_step": result["flops_per_step"]}
  return out


def check_two_processes(process_id: str, port: str) -> dict:
  """One of two processes with 4 devices each: the step on the global
  8-device mesh (each process feeding its own 4 batches) equals one device
  on all the structures."""
  from jax.experimental import multihost_utils
  jax.distributed.initialize(f"localhost:{port}", num_processes=2,
                             process_id=int(process_id))
  assert jax.device_count() == 8 and jax.local_device_count() == 4
  exs = examples()
  model, loss_fn, optimizer = setup()
  merged = batch_examples(exs)

  def create():
    params = model.init(jax.random.PRNGKey(0), merged)
    return train_state.TrainState.create(params, optimizer)

  with jax.default_device(jax.local_devices()[0]):
    ref_state, ref_metrics = jax.jit(train_step.make_train_step(
        loss_fn, optimizer))(jax.jit(create)(), merged)
  mesh = parallel.make_mesh(-1, 1)
  shardings = parallel.state_shardings(jax.eval_shape(create), mesh)
  state = jax.jit(create, out_shardings=shardings)()
  step = parallel.make_sharded_train_step(loss_fn, optimizer, mesh, shardings)
  mine = per_device_batches(exs, 8)[4 * jax.process_index():][:4]
  new_state, metrics = step(state, parallel.to_global(
      parallel.stack_batches(mine), mesh))
  gathered = multihost_utils.process_allgather(new_state, tiled=True)
  return {"process": jax.process_index(),
          # Replicated: every process holds the whole value.
          "loss": abs(float(metrics["loss"].addressable_shards[0].data)
                      - float(ref_metrics["loss"])),
          "reference_loss": float(ref_metrics["loss"]),
          "reference_update": max_diff(jax.device_get(ref_state.params),
                                       jax.device_get(jax.jit(create)().params)),
          "params": max_diff(gathered.params, jax.device_get(
              ref_state.params)),
          "opt_state": max_diff(gathered.opt_state, jax.device_get(
              ref_state.opt_state))}


def relative_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check_edges() -> dict:
  """Edges split over 8 devices (and in chunks there) against one device:
  energies, forces and stress of every model, and memory per device."""
  from ase.build import bulk

  from matsci_jax.energy import (make_energy_and_forces_fn,
                                 make_energy_forces_stress_fn)
  from tests.models.test_models import CASES, CUTOFF, _model, _structures
  mesh = parallel.make_mesh(data=8)
  norm = Normalizer(scale=jnp.float32(1.0), shift=jnp.float32(0.1),
                    element_energies=jnp.zeros(119, jnp.float32))
  cell = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
  cell.rattle(0.05, seed=2)
  out = {}
  # Between them, every kind of edge work (EGNN messages, MEGNet edge
  # states and Set2Set edge pooling, GALA rows, NequIP tensor products)
  # and stress.
  for case in ("egnn", "megnet_set2set", "gala", "nequip"):
    graph_kwargs = CASES[case][1]
    graph = batch_examples([graph_from_atoms(a, CUTOFF, None, **graph_kwargs)
                            for a in _structures() + [cell]])
    model = _model(case)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), graph)
    make = (make_energy_forces_stress_fn if case == "egnn"
            else make_energy_and_forces_fn)
    reference = jax.jit(make(model, norm))(params, graph)
    chunk = 3 * graph_kwargs.get("num_neighbors", 8)
    for name, m in (("split", model), ("split_chunked",
                                       model.clone(edge_chunk=chunk))):
      got = jax.jit(make(m, norm, mesh=mesh))(params, graph)
      out[f"{case}/{name}"] = {
          key: relative_error(g, r) for key, g, r in zip(
              ("energy", "forces", "stress"), got, reference)}
      out[f"{case}/{name}"]["force_scale"] = float(
          np.abs(np.asarray(reference[1])).max())
  # Memory per device: all atoms, an eighth of the edges.
  big = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(4)
  big.rattle(0.05, seed=0)
  graph = batch_examples([graph_from_atoms(big, 6.0, None)])
  model = models.get("egnn", hidden_dim=64, num_layers=3, cutoff=6.0)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), graph)
  temp = {}
  for name, m in (("one_device", None), ("split", mesh)):
    fn = jax.jit(make_energy_and_forces_fn(model, norm, mesh=m))
    temp[name] = fn.lower(params, graph).compile().memory_analysis(
    ).temp_size_in_bytes
  out["temp_bytes"] = temp
  return out


CHECKS = {"step": check_step, "checkpoint": check_checkpoint,
          "train": check_train, "two_processes": check_two_processes,
          "edges": check_edges}

if __name__ == "__main__":
  check = CHECKS[sys.argv[1]]
  if check in (check_step, check_edges):
    print(json.dumps(check()))
  elif check is check_two_processes:
    print(json.dumps(check(*sys.argv[2:4])))
  else:
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
      print(json.dumps(check(tmp)))
