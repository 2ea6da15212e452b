"""Fine-tuning: training that starts from a trained model's parameters.

    transfer = finetune.from_config(config, model, example)  # None: off
    params = transfer.merge(model.init(rng, example))        # jit-safe
    print(transfer.describe())

`config.init.checkpoint` names a training workdir or a checkpoint in it (what
`checkpoints.load` accepts); its EMA parameters (what evaluation used)
become the starting point:

* encoder parameters (everything outside the model's `head_modules`) load,
  and must exist with the same shapes in both models (else `ConfigError`);
* head parameters load where their names and shapes match, so a model
  trained with one head and fine-tuned with several keeps its hidden head
  layers and gets a fresh last layer;
* rows of species-indexed parameters (embedding tables, GALA's one-hot
  projections) load for the elements the trained model saw and stay fresh
  for the others. Such parameters are found, not named: their species axis
  is the one that grows when the model's `num_species` does.

Element references need nothing: the normaliser comes from the new
training statistics. The optimizer state starts fresh.

Parameter paths, in messages and in `config.init.freeze`, are the
"/"-joined keys below the "params" collection, without it:
"layer_0/message_out/kernel" (another collection's keys keep the
collection's name first). Freeze patterns are regular expressions matched
with `re.fullmatch`, e.g. "layer_.*" or "embed/.*".
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from matsci_jax import checkpoints, models
from matsci_jax.config_checks import ConfigError

PARAMS = "params"
_SHOWN = 6  # Paths quoted in a message before "..."


def path_of(key_path) -> str:
  """The "/"-joined path of a `jax.tree_util` key path, without a leading
  "params"."""
  keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
          for k in key_path]
  if keys and keys[0] == PARAMS:
    keys = keys[1:]
  return "/".join(keys)


def flat(params) -> dict[str, Any]:
  """`{path: leaf}` of a parameter tree (arrays or shapes), in tree order."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  return {path_of(p): leaf for p, leaf in leaves}


def _size(leaf) -> int:
  return int(np.prod(leaf.shape))


def _shape(shape) -> str:
  return f"[{', '.join(str(d) for d in shape)}]"


def _listing(paths: Sequence[str]) -> str:
  shown = ", ".join(paths[:_SHOWN])
  return shown + (f", ... ({len(paths)} in all)" if len(paths) > _SHOWN
                  else "")


def frozen_paths(params, patterns: Sequence[str]) -> set[str]:
  """Paths of `params` that match one of `patterns` (`re.fullmatch`).

  Args:
    params: a parameter tree ({"params": ...}), arrays or shapes.
    patterns: regular expressions of paths (see the module docstring).

  Raises:
    ConfigError: a pattern is not a regular expression, or matches no path
      (the message shows some real paths).
  """
  paths = list(flat(params))
  frozen = set()
  for pattern in patterns:
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise ConfigError(f"config.init.freeze pattern {pattern!r} is not a "
                        f"regular expression: {e}") from None
    hits = [p for p in paths if regex.fullmatch(p)]
    if not hits:
      raise ConfigError(
          f"config.init.freeze pattern {pattern!r} matches no parameter "
          f"path (matched whole, without a leading 'params/'); paths are "
          f"e.g. {_listing(paths)}")
    frozen.update(hits)
  return frozen


def frozen_mask(params, patterns: Sequence[str]):
  """A tree like `params` of bools, True on leaves kept fixed."""
  frozen = frozen_paths(params, patterns)
  return jax.tree_util.tree_map_with_path(
      lambda p, _: path_of(p) in frozen, params)


def freeze_counts(params, patterns: Sequence[str]) -> tuple[int, int]:
  """(trainable, frozen) numbers of scalars in `params` (arrays or shapes).

  Raises:
    ConfigError: as `frozen_paths`.
  """
  frozen = frozen_paths(params, patterns)
  sizes = {p: _size(leaf) for p, leaf in flat(params).items()}
  fixed = sum(s for p, s in sizes.items() if p in frozen)
  return sum(sizes.values()) - fixed, fixed


def model_name(model) -> str:
  """The registered name of `model`'s class."""
  for name in models.names():
    if models.model_class(name) is type(model):
      return name
  raise ValueError(f"{type(model).__name__} is not a registered model")


def species_axes(model, example) -> dict[str, int]:
  """`{path: axis}` of the parameters indexed by atomic number.

  Found from shapes alone: the axis of a parameter that grows by one when
  `model.num_species` does (no compute runs). Models without a
  `num_species` field have none.

  Args:
    model: an `EnergyModel`.
    example: a batch `model.init` takes.
  """
  num = getattr(model, "num_species", None)
  if not isinstance(num, int):
    return {}
  rng = jax.random.PRNGKey(0)
  base = flat(jax.eval_shape(model.init, rng, example))
  grown = flat(jax.eval_shape(model.clone(num_species=num + 1).init, rng,
                              example))
  axes = {}
  for path, leaf in base.items():
    other = grown.get(path)
    if other is None or len(other.shape) != len(leaf.shape):
      continue
    changed = [a for a, (n, m) in enumerate(zip(leaf.shape, other.shape))
               if m != n]
    if len(changed) == 1 and other.shape[changed[0]] == num + 1:
      axes[path] = changed[0]
  return axes


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """A trained model's parameters, as a fine-tuning run starts from them.

  Attributes:
    path: the training workdir.
    step: the checkpoint's training step.
    model_config: its model config (model.json), a dict.
    params: its EMA parameters ({"params": ...}) as host numpy arrays.
    elements: atomic numbers in its training data (None: not recorded).
  """
  path: str
  step: int
  model_config: dict
  params: Any
  elements: tuple[int, ...] | None

  def check(self, model, example) -> "Transfer":
    """What each parameter of `model` starts from; checked from shapes
    (nothing runs).

    Args:
      model: the `EnergyModel` to fine-tune.
      example: a batch `model.init` takes.

    Raises:
      ConfigError: another model, or an encoder parameter (one outside
        `model.head_modules`) missing on either side or of another shape;
        names the workdir, the parameter and both shapes.
    """
    where = f"config.init.checkpoint = {self.path!r}"
    name, there = model_name(model), self.model_config.get("name")
    if there != name:
      raise ConfigError(f"{where}: it holds model {there!r}, config.model "
                        f"is {name!r}; fine-tuning keeps the model")
    fresh = flat(jax.eval_shape(model.init, jax.random.PRNGKey(0), example))
    trained = flat(self.params)
    problems = _encoder_problems(fresh, trained, tuple(model.head_modules))
    if problems:
      more = (f"\n  ... ({len(problems)} in all)"
              if len(problems) > _SHOWN else "")
      raise ConfigError(
          f"{where}: its {there!r} encoder does not fit config.model "
          f"(compare its model.json with config.model):\n  "
          + "\n  ".join(problems[:_SHOWN]) + more)

    axes = species_axes(model, example)
    loads, rows, fresh_heads = [], {}, {}
    for path, leaf in fresh.items():
      old = trained.get(path)
      if old is None or tuple(old.shape) != tuple(leaf.shape):
        fresh_heads[path] = ("absent from the trained model" if old is None
                             else f"{_shape(old.shape)} there, "
                             f"{_shape(leaf.shape)} here")
      elif path in axes and self.elements is not None:
        rows[path] = (axes[path],
                      _seen(self.elements, leaf.shape[axes[path]]))
      else:
        loads.append(path)
    unused = tuple(p for p in trained if p not in fresh or p in fresh_heads)
    return Transfer(
        source=self, loads=tuple(loads), rows=rows, fresh=fresh_heads,
        unused=unused, sizes={p: _size(leaf) for p, leaf in fresh.items()},
        unused_size=sum(_size(trained[p]) for p in unused))


def _encoder_problems(fresh: dict, trained: dict,
                      heads: tuple[str, ...]) -> list[str]:
  """Encoder parameters (outside the `heads` modules) that one model has
  and the other lacks or has in another shape, one line each."""
  def in_head(path):
    return path.split("/", 1)[0] in heads

  problems = []
  for path, leaf in fresh.items():
    old = trained.get(path)
    if in_head(path):
      continue
    if old is None:
      problems.append(f"parameter {path} {_shape(leaf.shape)} of "
                      "config.model is absent from the trained model")
    elif tuple(old.shape) != tuple(leaf.shape):
      problems.append(f"parameter {path} is {_shape(old.shape)} in the "
                      f"trained model, {_shape(leaf.shape)} in config.model")
  problems += [f"parameter {path} {_shape(old.shape)} of the trained model "
               "is absent from config.model"
               for path, old in trained.items()
               if path not in fresh and not in_head(path)]
  return problems


def _seen(elements: Sequence[int], num_species: int) -> np.ndarray:
  """bool [num_species], True at the atomic numbers in `elements`."""
  mask = np.zeros(num_species, bool)
  mask[[z for z in elements if 0 <= z < num_species]] = True
  return mask


@dataclasses.dataclass(frozen=True)
class Transfer:
  """Which parameters of a model load from a `Pretrained` and how.

  Attributes:
    source: the trained model.
    loads: paths that load whole.
    rows: `{path: (species axis, bool [num_species] seen)}`: entries of
      seen elements load, the others keep their fresh values.
    fresh: `{path: why}` of head parameters that keep their fresh values.
    unused: paths of trained parameters that do not load (head
      parameters the model here lacks or has in another shape).
    sizes: `{path: scalars}` of the model here.
    unused_size: scalars of `unused`.
  """
  source: Pretrained
  loads: tuple[str, ...]
  rows: dict
  fresh: dict
  unused: tuple[str, ...]
  sizes: dict
  unused_size: int

  def merge(self, params):
    """Freshly initialised `params` with the trained values put in.

    Usable inside `jax.jit` on traced parameters (the trained arrays
    become constants of the computation); loaded leaves equal the trained
    ones bit for bit.

    Args:
      params: the model's initial variables ({"params": ...}).
    """
    trained = flat(self.source.params)
    loads = set(self.loads)

    def put(key_path, leaf):
      path = path_of(key_path)
      if path in loads:
        return jnp.asarray(trained[path], leaf.dtype)
      if path in self.rows:
        axis, seen = self.rows[path]
        shape = [1] * leaf.ndim
        shape[axis] = seen.size
        return jnp.where(seen.reshape(shape),
                         jnp.asarray(trained[path], leaf.dtype), leaf)
      return leaf
    return jax.tree_util.tree_map_with_path(put, params)

  def counts(self) -> dict[str, int]:
    """Scalars that load, that stay fresh (head parameters and embedding
    rows of unseen elements) and that the trained model has unused."""
    loaded = sum(self.sizes[p] for p in self.loads)
    fresh = sum(self.sizes[p] for p in self.fresh)
    for path, (_, seen) in self.rows.items():
      per_row = self.sizes[path] // seen.size
      loaded += per_row * int(seen.sum())
      fresh += per_row * int((~seen).sum())
    return {"loaded": loaded, "fresh": fresh, "unused": self.unused_size}

  def summary(self) -> dict:
    """Where from and `counts`, for metrics.json."""
    return {"checkpoint": self.source.path, "step": self.source.step,
            **self.counts()}

  def describe(self) -> str:
    """Lines for the training log: where from, what loads, what not."""
    src, n = self.source, self.counts()
    lines = [f"fine-tuning from {src.path} (step {src.step}, EMA "
             f"parameters): {n['loaded']:,} scalars load, {n['fresh']:,} "
             f"fresh, {n['unused']:,} of the trained model unused"]
    if self.fresh:
      lines.append("  fresh head parameters: " + "; ".join(
          f"{p} ({why})" for p, why in self.fresh.items()))
    if self.rows:
      seen = next(iter(self.rows.values()))[1]
      lines.append(
          f"  rows of {', '.join(self.rows)} load for the "
          f"{int(seen.sum())} elements it saw (Z = {list(src.elements)}); "
          "the others stay fresh")
    elif src.elements is None:
      lines.append("  its model.json records no elements: every embedding "
                   "row loads")
    if self.unused:
      lines.append(f"  unused: {_listing(list(self.unused))}")
    return "\n".join(lines)


def load(path: str) -> Pretrained:
  """The EMA parameters of a trained model (`checkpoints.load`'s choice of
  checkpoint: the best by validation for a workdir), on the host.

  Raises:
    ConfigError: `path` is no workdir or holds no checkpoint that
      restores; names `config.init.checkpoint` and says why.
  """
  where = f"config.init.checkpoint = {path!r}"
  try:
    trained = checkpoints.load(path)
  except (checkpoints.CheckpointError, KeyError, ValueError) as e:
    raise ConfigError(f"{where}: {e}") from e
  info = checkpoints.RunFolder(trained.workdir).read_model()
  return Pretrained(
      path=trained.workdir, step=trained.step, model_config=info["model"],
      params=jax.device_get(trained.params), elements=trained.elements)


def from_config(config, model, example) -> Transfer | None:
  """The `Transfer` of `config.init.checkpoint` for `model`, checked; None
  when the config starts from random parameters (no `init` section, or an
  empty `from`).

  Raises:
    ConfigError: see `load` and `Pretrained.check`.
  """
  init = config.get("init")
  source = init.get("checkpoint", "") if init is not None else ""
  if not source:
    return None
  return load(source).check(model, example)
