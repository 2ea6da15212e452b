"""NequIP (Batzner et al. 2022): an E(3)-equivariant interatomic potential.

Node features are irreducible representations of O(3) (`e3nn_jax.Irreps`,
e.g. "32x0e + 16x1o + 8x2e": 32 scalars, 16 vectors, 8 rank-2 tensors per
atom), starting from a species embedding (scalars). Each layer does

    x_i     = W_up h_i                                   (per atom)
    m_i     = 1/N sum_j R(d_ij) * (x_j (x) Y(r_ij))      (per edge, summed)
    h_i    <- gate(W_down m_i + W_self h_i) + h_i        (per atom)

where Y are the spherical harmonics of the unit edge vector up to `lmax`
("component" normalisation), (x) the tensor product reduced to the
layer's irreps (every path l_in x l_sh -> l_out allowed by parity and the
triangle rule, Clebsch-Gordan coefficients from e3nn), and R(d) a radial
MLP on a Bessel basis, times e3nn's polynomial envelope, giving one weight
per path and channel. N is `avg_num_neighbors`. The W are equivariant
linear maps (channel mixing within each irrep), the gate applies SiLU
(tanh for odd scalars) to scalars and multiplies each non-scalar irrep by
a sigmoid of an extra scalar, and the residual + h_i covers the irreps
that a layer's input and output share. A layer's irreps are the requested
ones its tensor product can reach: the first layer (scalar input) gets
only "natural" parities (0e, 1o, 2e); odd scalars and even vectors appear
from the second and third layers on. The last layer outputs only the even
scalars, the only features an invariant readout can use, and an MLP reads
out `num_heads` energies per atom.

Only the tensor product, its radial weights and the gather/scatter run per
edge: the linear maps run per atom before the gather (W_up) and after the
sum (W_down), so a node's features are gathered once per layer, and the
tensor product is written out over the nonzero Clebsch-Gordan
coefficients (`weighted_products`). Positions enter through true periodic
edge vectors (`geometry.edge_geometry`), so energies are invariant and
forces (-dE/dx) equivariant under rotations, reflections, translations and
periodic wrapping, and smooth as atoms cross the cutoff.

Precision: `dtype` (bfloat16 for mixed precision) sets the radial MLPs,
the readout and the scalar channels of the linear maps; their l > 0
channels, the tensor products, harmonics, gates, sums and the residual
stream stay float32, since rounding the components of an l > 0 irrep
separately breaks equivariance. Measured on the default config (three
test structures, three random rotations): bf16 forces differ from float32
ones by 4%, as bf16's 8-bit mantissa implies, and rotate with the
structure to 1e-4, 1e-4 and 3e-3 of their size (the last when a rounded
invariant falls on the other side of a bf16 step); with the tensor
products in bf16 as well, 7e-3 to 9e-3; with all linear channels in bf16,
5e-3 to 8e-3; in float32, 2e-6 to 5e-6.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph
import numpy as np

from matsci_jax import _compat  # noqa: F401  (jraph needs it)
from matsci_jax.models import edge_sums, geometry, registry, remat

_SCALARS = ("0e", "0o")
# 1 / sqrt(E[silu(z)**2]) for z ~ N(0, 1): keeps the radial MLP's
# activations of unit size (e3nn.normalize_function(jax.nn.silu)).
_SILU_SCALE = 1.6765648


def _silu(x):
  return _SILU_SCALE * jax.nn.silu(x)


def layer_irreps(irreps_in: e3nn.Irreps, target: e3nn.Irreps, lmax: int
                 ) -> tuple[e3nn.Irreps, e3nn.Irreps, e3nn.Irreps]:
  """The irreps of a layer, from its input and requested output.

  Args:
    irreps_in: the layer's input features (regrouped).
    target: the requested output irreps (regrouped).
    lmax: highest degree of the edge harmonics.

  Returns:
    (messages: the tensor product's irreps, one radial weight per irrep
    copy; pre_gate: scalars, then one gate scalar per non-scalar irrep,
    then the non-scalars; out: the layer's output irreps, regrouped).
  """
  sh = e3nn.Irreps.spherical_harmonics(lmax)
  reachable = e3nn.tensor_product(irreps_in, sh)
  out = e3nn.Irreps([(mul, ir) for mul, ir in target
                     if ir in reachable]).regroup()
  scalars = out.filter(keep=list(_SCALARS))
  nonscalars = out.filter(drop=list(_SCALARS))
  pre_gate = scalars + e3nn.Irreps(f"{nonscalars.num_irreps}x0e") + nonscalars
  messages = e3nn.tensor_product(irreps_in, sh,
                                 filter_ir_out=[ir for _, ir in out])
  return messages, pre_gate.remove_zero_multiplicities(), out


class EquivariantLinear(nn.Module):
  """Per-atom linear map between irreps: mixes the channels of each irrep.

  Weights [mul_in, mul_out] per output irrep, stored side by side in one
  float32 vector, have unit-variance initialisation and are scaled by
  1/sqrt(mul_in) in the forward pass (e3nn's "path" normalisation). Output
  irreps the input lacks are zero (and have no weights).

  Attributes:
    irreps_out: output irreps, kept in the given order (not regrouped).
    dtype: computation dtype of the scalar (l = 0) channels; the others
      compute in float32, and outputs are float32.
  """
  irreps_out: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: e3nn.IrrepsArray) -> e3nn.IrrepsArray:
    """x: [n, irreps_in.dim] -> float32 [n, irreps_out.dim]."""
    x = x.regroup()
    inputs = {ir: (mul, chunk) for (mul, ir), chunk in zip(x.irreps, x.chunks)}
    irreps_out = e3nn.Irreps(self.irreps_out)
    shapes = [(inputs[ir][0], mul) if ir in inputs else (0, mul)
              for mul, ir in irreps_out]
    # One parameter for all irreps: initialising many small ones costs
    # compile time.
    weights = self.param("weights", nn.initializers.normal(1.0),
                         (sum(a * b for a, b in shapes),), jnp.float32)
    chunks, start = [], 0
    for (mul_in, mul), (_, ir) in zip(shapes, irreps_out):
      w = weights[start:start + mul_in * mul].reshape(mul_in, mul)
      start += mul_in * mul
      chunk = inputs.get(ir, (0, None))[1]
      if chunk is None:  # No such input irrep, or known to be zero.
        chunks.append(None)
        continue
      # Rounding the components of l > 0 irreps separately breaks
      # equivariance: those stay float32.
      dtype = self.dtype if ir.l == 0 else jnp.float32
      w = (w / np.sqrt(mul_in)).astype(dtype)
      y = jnp.einsum("nui,uv->nvi", chunk.astype(dtype), w)
      chunks.append(y.astype(jnp.float32))
    return e3nn.from_chunks(irreps_out, chunks, x.shape[:-1], jnp.float32)


class ProductBlock(NamedTuple):
  """One input irrep's share of the edge tensor product (see
  `product_blocks`).

  Attributes:
    mul: its channels u.
    start: its first column in the input features.
    dim: its dimension 2 l_in + 1.
    paths: (ir_out, begin, end) per path l_in x l_sh -> l_out: its output
      columns, the paths side by side.
    columns: per output column, its nonzero Clebsch-Gordan coefficients
      ("component" normalisation) as ((i, ((j, c), ...)), ...): input
      component i, harmonic component j (of all degrees 0..lmax), value c.
  """
  mul: int
  start: int
  dim: int
  paths: tuple
  columns: tuple

  @property
  def width(self) -> int:
    return len(self.columns)


@functools.lru_cache(maxsize=None)
def product_blocks(irreps_in: str, lmax: int, irreps_out: str
                   ) -> tuple[ProductBlock, ...]:
  """How features of `irreps_in` (regrouped) couple with edge harmonics
  0..lmax into the irreps of `irreps_out` (only their types count)."""
  keep = {ir for _, ir in e3nn.Irreps(irreps_out)}
  sh = e3nn.Irreps.spherical_harmonics(lmax)
  blocks, start = [], 0
  for mul, ir_in in e3nn.Irreps(irreps_in):
    paths, columns = [], []
    for (_, ir_sh), sh_slice in zip(sh, sh.slices()):
      for ir_out in ir_in * ir_sh:
        if ir_out not in keep:
          continue
        cg = np.asarray(e3nn.clebsch_gordan(ir_in.l, ir_sh.l, ir_out.l)
                        ) * np.sqrt(ir_out.dim)
        paths.append((ir_out, len(columns), len(columns) + ir_out.dim))
        for k in range(ir_out.dim):
          columns.append(tuple(
              (i, tuple((sh_slice.start + j, float(cg[i, j, k]))
                        for j in range(ir_sh.dim) if abs(cg[i, j, k]) > 1e-9))
              for i in range(ir_in.dim) if np.abs(cg[i, :, k]).max() > 1e-9))
    if paths:
      blocks.append(ProductBlock(mul, start, ir_in.dim, tuple(paths),
                                 tuple(columns)))
    start += mul * ir_in.dim
  return tuple(blocks)


def weighted_products(blocks: tuple[ProductBlock, ...], x: jax.Array,
                      sh: jax.Array, weights: jax.Array) -> jax.Array:
  """Tensor products of features with edge harmonics, one weight per path
  and channel ("uvu"), in the blocks' own layout.

  Written out over the nonzero Clebsch-Gordan coefficients (most are
  zero) as elementwise products that XLA fuses: on two CPU cores, training
  steps take two thirds of the time and memory of dense per-edge coupling
  matrices, at about twice their compile time.

  Args:
    blocks: `product_blocks` of the features' irreps.
    x: float32 [n, irreps_in.dim] features (of each edge's sender).
    sh: float32 [n, (lmax + 1)**2] edge harmonics.
    weights: float32 [n, num_weights], per block [mul, len(paths)].

  Returns:
    float32 [n, sum(mul * width)]: per block [mul, width] (`assemble`
    turns sums of these into irreps).
  """
  # Each coupling of the harmonics [n] is built once (blocks of the same
  # degree share them): fewer ops to trace and compile.
  coupled = {}

  def coupling(js):
    if js not in coupled:
      coupled[js] = sum(c * sh[:, j] for j, c in js)[:, None]
    return coupled[js]

  out, w_start = [], 0
  for b in blocks:
    x1 = x[:, b.start:b.start + b.mul * b.dim].reshape(-1, b.mul, b.dim)
    x1 = [x1[:, :, i] for i in range(b.dim)]
    n_paths = len(b.paths)
    w = weights[:, w_start:w_start + b.mul * n_paths].reshape(
        -1, b.mul, n_paths)
    w_start += b.mul * n_paths
    columns = []
    for p, (_, begin, end) in enumerate(b.paths):
      w_p = w[:, :, p]
      for terms in b.columns[begin:end]:
        columns.append(sum(x1[i] * coupling(js) for i, js in terms) * w_p)
    out.append(jnp.stack(columns, -1).reshape(-1, b.mul * b.width))
  return jnp.concatenate(out, -1)


def assemble(blocks: tuple[ProductBlock, ...], m: jax.Array
             ) -> e3nn.IrrepsArray:
  """`weighted_products` layout [n, sum(mul * width)] -> irreps: those of
  `e3nn.tensor_product` (sorted, regrouped, channels in its order)."""
  pieces, start = {}, 0
  for b in blocks:
    t = m[:, start:start + b.mul * b.width].reshape(-1, b.mul, b.width)
    start += b.mul * b.width
    for ir, begin, end in b.paths:
      pieces.setdefault(ir, []).append(t[:, :, begin:end])
  irreps = e3nn.Irreps([(sum(p.shape[1] for p in pieces[ir]), ir)
                        for ir in sorted(pieces)])
  chunks = [jnp.concatenate(pieces[ir], 1) for _, ir in irreps]
  return e3nn.from_chunks(irreps, chunks, m.shape[:-1], m.dtype)


def _edge_terms(x: jax.Array, graph: jraph.GraphsTuple, edges: dict,
                cutoff: float, num_radial: int, lmax: int) -> dict:
  """Edge inputs of a layer from positions, for the given edges.

  Args:
    x: float32 [n_node, 3] positions.
    graph: the padded batch (its cells and atoms' structures).
    edges: senders, receivers [n]; cell_shifts [n, 3]; mask [n].
    cutoff, num_radial, lmax: the envelope's radius, the Bessel functions
      and the harmonics' highest degree.

  Returns:
    senders and receivers; sh [n, (lmax + 1)**2], the harmonics of the unit
    edge vectors ("component" normalisation); radial [n, num_radial], the
    Bessel basis of d / cutoff; envelope [n].
  """
  with jax.named_scope("edge_geometry"):  # Labels the compiled ops.
    view = graph._replace(senders=edges["senders"],
                          receivers=edges["receivers"],
                          edges={"cell_shifts": edges["cell_shifts"],
                                 "mask": edges["mask"]})
    edge = geometry.edge_geometry(x, view, cutoff)
    # Padding edges have zero vectors, which e3nn maps to zero harmonics
    # (l > 0) with finite gradients; their envelope is zero.
    sh = e3nn.spherical_harmonics(
        list(range(lmax + 1)), e3nn.IrrepsArray("1o", edge.vectors),
        normalize=True, normalization="component")
    # Of d / cutoff: values of order one (root mean square 1.7 over
    # neighbours spread evenly within the cutoff).
    return dict(senders=edges["senders"], receivers=edges["receivers"],
                sh=sh.array, radial=e3nn.bessel(edge.d / cutoff, num_radial),
                envelope=edge.envelope)


def _convolution(layer: "NequIPLayer", edges: dict, features: jax.Array,
                 x: jax.Array, graph: jraph.GraphsTuple
                 ) -> tuple[dict, None]:
  """The layer's per-edge work on some of the edges, summed into atoms.

  Args:
    layer: the calling `NequIPLayer` (its radial MLP is created here).
    edges: the given edges' inputs as `_edge_terms` returns them or, in
      chunks, their senders, receivers, cell_shifts and mask, from which
      the terms are computed here (and recomputed in the backward pass),
      so that no per-edge array of all edges is kept.
    features: float32 [n_node, irreps_in.dim], W_up h of every atom.
    x: float32 [n_node, 3] positions.
    graph: the padded batch.

  Returns:
    ({"messages": float32 [n_node, messages.dim]}, None): sums over the
    given edges into their receivers, in `weighted_products`' layout.
  """
  # Named scopes label the compiled ops (benchmarks/nequip_profile.py).
  if "sh" not in edges:
    edges = _edge_terms(x, graph, edges, layer.cutoff, layer.num_radial,
                        layer.lmax)
  blocks = layer.blocks()
  # One weight per path and channel, zero at the cutoff and beyond.
  with jax.named_scope("radial_mlp"):
    w = edges["radial"]
    for k in range(layer.radial_layers):
      w = _silu(nn.Dense(layer.radial_hidden, use_bias=False,
                         dtype=layer.dtype, name=f"radial_{k}")(w))
    num_weights = sum(b.mul * len(b.paths) for b in blocks)
    w = nn.Dense(num_weights, use_bias=False, dtype=layer.dtype,
                 name="radial_out")(w)
    w = w.astype(jnp.float32) * edges["envelope"][:, None]
  with jax.named_scope("gather"):
    senders = features[edges["senders"]]
  with jax.named_scope("tensor_product"):
    m = weighted_products(blocks, senders, edges["sh"], w)
  with jax.named_scope("scatter"):
    # Receivers are sorted (centre-major edges, batched in order).
    messages = jax.ops.segment_sum(m, edges["receivers"],
                                   num_segments=features.shape[0],
                                   indices_are_sorted=True)
  return {"messages": messages}, None


class NequIPLayer(nn.Module):
  """One interaction layer: features [n_node, irreps_in.dim] in, features
  [n_node, out.dim] out (see `layer_irreps`).

  The edge work runs through `edge_sums.scan_edges`: at once, in chunks of
  `edge_chunk` edges, or on this device's edges of `edge_axis`.
  """
  irreps_in: str
  target: str
  lmax: int
  radial_hidden: int
  radial_layers: int
  avg_num_neighbors: float
  cutoff: float
  num_radial: int
  dtype: Any = jnp.float32
  edge_chunk: int = 0
  edge_axis: str | tuple[str, ...] | None = None

  def blocks(self) -> tuple[ProductBlock, ...]:
    """The edge tensor product's `product_blocks`."""
    out = layer_irreps(e3nn.Irreps(self.irreps_in), e3nn.Irreps(self.target),
                       self.lmax)[2]
    return product_blocks(self.irreps_in, self.lmax, str(out))

  @nn.compact
  def __call__(self, h: jax.Array, x: jax.Array, edges: dict,
               graph: jraph.GraphsTuple) -> jax.Array:
    irreps_in = e3nn.Irreps(self.irreps_in)
    messages_irreps, pre_gate, out = layer_irreps(
        irreps_in, e3nn.Irreps(self.target), self.lmax)
    h = e3nn.IrrepsArray(irreps_in, h)
    linear = functools.partial(EquivariantLinear, dtype=self.dtype)
    up = linear(str(irreps_in), name="linear_up")(h)
    init = {"messages": jnp.zeros((h.shape[0], messages_irreps.dim),
                                  jnp.float32)}
    sums, _ = edge_sums.scan_edges(
        self, _convolution, init, edges, (up.array, x, graph),
        chunk=self.edge_chunk, axis=self.edge_axis)
    m = assemble(self.blocks(), sums["messages"] / self.avg_num_neighbors)
    assert m.irreps == messages_irreps, (m.irreps, messages_irreps)
    y = (linear(str(pre_gate), name="linear_down")(m)
         + linear(str(pre_gate), name="self_connection")(h))
    y = e3nn.gate(y, even_act=jax.nn.silu, odd_act=jnp.tanh,
                  even_gate_act=jax.nn.sigmoid, odd_gate_act=jnp.tanh)
    y = y.regroup()
    assert y.irreps == out, (y.irreps, out)
    # Residual on the irreps input and output share (all of them in the
    # middle layers, the even scalars in the first and last).
    same = {(mul, ir): chunk for (mul, ir), chunk in zip(h.irreps, h.chunks)}
    chunks = [c if c is None or (mul, ir) not in same
              or same[mul, ir] is None else c + same[mul, ir]
              for (mul, ir), c in zip(y.irreps, y.chunks)]
    return e3nn.from_chunks(out, chunks, y.shape[:-1], jnp.float32).array


@registry.register("nequip")
class NequIP(registry.EnergyModel):
  """NequIP giving one invariant scalar per atom (and head).

  Attributes:
    hidden_irreps: irreps of the hidden features, e.g. "32x0e + 16x1o +
      8x2e"; layers get those their tensor products can reach. Its even
      scalars (0e) set the species embedding's width.
    num_layers: interaction layers (the last outputs only even scalars).
    lmax: highest degree of the edge spherical harmonics.
    cutoff: radius in Å of the envelope (use the dataset's cutoff).
    num_radial: Bessel functions in the distance expansion.
    radial_hidden: width of the radial MLP's hidden layers.
    radial_layers: hidden layers of the radial MLP.
    avg_num_neighbors: divides summed messages, keeping activations O(1).
    readout_hidden: width of the per-atom output MLP.
    num_species: size of the atom-type embedding table (Z < num_species).
    remat: rematerialise each layer with this policy (see `models.remat`).
    dtype: computation dtype of the radial MLPs, the readout and the
      scalar channels of the linear maps (jnp.bfloat16 for mixed
      precision); tensor products, l > 0 channels, parameters, positions,
      sums and outputs stay float32 (see the module docstring).
  """
  hidden_irreps: str = "32x0e + 16x1o + 8x2e"
  num_layers: int = 4
  lmax: int = 2
  cutoff: float = 6.0
  num_radial: int = 8
  radial_hidden: int = 32
  radial_layers: int = 2
  avg_num_neighbors: float = 32.0
  readout_hidden: int = 16
  num_species: int = 119
  remat: str = ""

  head_modules = ("readout", "readout_out")

  def _targets(self) -> list[e3nn.Irreps]:
    """Each layer's requested irreps: the hidden ones, even scalars last."""
    if self.num_layers < 1 or self.lmax < 0:
      raise ValueError(f"nequip: num_layers must be at least 1 and lmax at "
                       f"least 0, got {self.num_layers} and {self.lmax}")
    target = e3nn.Irreps(self.hidden_irreps).regroup()
    scalars = target.count("0e")
    if not scalars:
      raise ValueError(f"nequip: hidden_irreps {self.hidden_irreps!r} has no "
                       "even scalars (0e), which the embedding and readout "
                       "need")
    return ([target] * (self.num_layers - 1)
            + [e3nn.Irreps(f"{scalars}x0e")])

  def feature_irreps(self) -> list[e3nn.Irreps]:
    """Irreps of the embedding and of each layer's output (the sown
    "features_<layer>"), num_layers + 1 of them."""
    targets = self._targets()
    irreps = [e3nn.Irreps(f"{targets[-1].count('0e')}x0e")]
    for target in targets:
      irreps.append(layer_irreps(irreps[-1], target, self.lmax)[2])
    return irreps

  @nn.compact
  def __call__(self, graph: jraph.GraphsTuple,
               positions: jax.Array | None = None) -> jax.Array:
    """Per-atom outputs.

    Args:
      graph: padded batch (see `matsci_jax.data.batching.collate`).
      positions: float [n_node, 3] to use instead of `graph.nodes
        ["positions"]` (forces differentiate with respect to these).

    Returns:
      float32 [n_node] (or [n_node, num_heads]), zero on padding nodes.
      Each layer's features [n_node, irreps.dim] are sown as
      "intermediates" named "features_<layer>" (their irreps are
      `feature_irreps()[layer + 1]`).
    """
    x = graph.nodes["positions"] if positions is None else positions
    chunk = edge_sums.chunk_size(self.edge_chunk, graph.senders.shape[0])
    edges = dict(senders=graph.senders, receivers=graph.receivers,
                 cell_shifts=graph.edges["cell_shifts"],
                 mask=graph.edges["mask"])
    if not chunk:  # Computed once for all layers; in chunks, per chunk.
      edges = _edge_terms(x, graph, edges, self.cutoff, self.num_radial,
                          self.lmax)

    irreps = self.feature_irreps()
    h = nn.Embed(self.num_species, irreps[0].dim, name="embed")(
        graph.nodes["atomic_numbers"])
    layer = remat.wrap(NequIPLayer, self.remat)
    for i in range(self.num_layers):
      h = layer(str(irreps[i]), str(self._targets()[i]), self.lmax,
                self.radial_hidden, self.radial_layers,
                self.avg_num_neighbors, self.cutoff, self.num_radial,
                dtype=self.dtype, edge_chunk=chunk, edge_axis=self.edge_axis,
                name=f"layer_{i}")(h, x, edges, graph)
      self.sow("intermediates", f"features_{i}", h)
    dense = functools.partial(nn.Dense, dtype=self.dtype)
    out = dense(self.num_heads, name="readout_out")(
        jax.nn.silu(dense(self.readout_hidden, name="readout")(h)))
    out = out.astype(jnp.float32) * graph.nodes["mask"][:, None]
    return self.heads_output(out)
