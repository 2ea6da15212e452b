"""How structures become graphs and point clouds: one definition of it.

A `GraphSpec` holds the settings that decide a model's input: the edge
cutoff and neighbour cap, the representation, and the point-cloud slots.
The converter writes it into a dataset's metadata (`to_dict`), training
reads it from there (`Dataset.graph_spec`), a trained model stores it in
its `model.json`, and inference builds graphs with it (`example`), so a
structure seen at prediction time is built exactly as in training.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from matsci_jax.data import schema
from matsci_jax.data.neighbors import Edges, neighbor_list
from matsci_jax.data.point_cloud import point_cloud
from matsci_jax.data.structure import Structure, validate

GRAPH, POINT_CLOUD, BOTH = schema.REPRESENTATIONS
_NO_EDGES = Edges(np.zeros(0, np.int32), np.zeros(0, np.int32),
                  np.zeros((0, 3), np.int32), None)


@dataclasses.dataclass(frozen=True)
class PointCloudSpec:
  """Point-cloud slots (see `matsci_jax.data.point_cloud`).

  Attributes:
    cutoff: slot radius in Å.
    num_neighbors: K, slots per centre.
    bulk_samples: bulk atoms sampled as extra centres per structure.
    seed: seed of that sample.
  """
  cutoff: float
  num_neighbors: int = 16
  bulk_samples: int = 8
  seed: int = 0

  def __post_init__(self):
    if not self.cutoff > 0:
      raise ValueError(f"point-cloud cutoff must be positive, got "
                       f"{self.cutoff}")
    if self.num_neighbors < 1 or self.bulk_samples < 0:
      raise ValueError(f"point clouds need num_neighbors >= 1 and "
                       f"bulk_samples >= 0, got {self.num_neighbors} and "
                       f"{self.bulk_samples}")


@dataclasses.dataclass(frozen=True)
class GraphSpec:
  """Graph settings of a dataset, or of the batches a model reads.

  Attributes:
    cutoff: radius in Å of graph edges (periodic images included).
    max_neighbors: nearest neighbours kept per atom; None keeps all (0 is
      read as None).
    representation: "graph" (edges), "point_cloud" (K slots per centre,
      stored as edges grouped K per centre) or "both" (a dataset holding
      both; a model reads one, see `select`).
    point_cloud: the slot settings; required unless the representation is
      "graph".
  """
  cutoff: float = 6.0
  max_neighbors: Optional[int] = 50
  representation: str = GRAPH
  point_cloud: Optional[PointCloudSpec] = None

  def __post_init__(self):
    if not self.cutoff > 0:
      raise ValueError(f"cutoff must be positive, got {self.cutoff}")
    if not self.max_neighbors:
      object.__setattr__(self, "max_neighbors", None)
    elif self.max_neighbors < 0:
      raise ValueError(f"max_neighbors must be >= 0 (0: all), got "
                       f"{self.max_neighbors}")
    if self.representation not in schema.REPRESENTATIONS:
      raise ValueError(f"representation must be one of "
                       f"{schema.REPRESENTATIONS}, got "
                       f"{self.representation!r}")
    if (self.point_cloud is None) != (self.representation == GRAPH):
      raise ValueError(f"representation {self.representation!r} "
                       + ("needs point-cloud settings"
                          if self.point_cloud is None else
                          "takes no point-cloud settings"))

  @property
  def representations(self) -> tuple[str, ...]:
    """The representations held: ("graph",), ("point_cloud",) or both."""
    return ((GRAPH, POINT_CLOUD) if self.representation == BOTH
            else (self.representation,))

  def select(self, representation: str) -> "GraphSpec":
    """The spec of batches in one of the representations held.

    Raises:
      ValueError: this spec does not hold `representation`.
    """
    if representation not in self.representations:
      raise ValueError(
          f"no {representation} representation here (only "
          f"{', '.join(self.representations)}); convert with "
          "--representation both")
    return dataclasses.replace(
        self, representation=representation,
        point_cloud=None if representation == GRAPH else self.point_cloud)

  @property
  def edge_cutoff(self) -> float:
    """Radius of the edges batches carry (graph edges or slots)."""
    return (self.point_cloud.cutoff if self.representation == POINT_CLOUD
            else self.cutoff)

  @property
  def edge_multiple(self) -> int:
    """Edges come in groups of this size (K slots per point-cloud centre),
    so edge budgets are multiples of it."""
    return (self.point_cloud.num_neighbors
            if self.representation == POINT_CLOUD else 1)

  def to_dict(self) -> dict:
    """The JSON form, as dataset metadata and `model.json` hold it."""
    return {"cutoff": float(self.cutoff),
            "max_neighbors": self.max_neighbors,
            "representation": self.representation,
            "point_cloud": (None if self.point_cloud is None
                            else dataclasses.asdict(self.point_cloud))}

  @classmethod
  def from_dict(cls, d: dict) -> "GraphSpec":
    """Reads `to_dict`'s form (other keys of `d` are ignored)."""
    representation = d.get("representation", GRAPH)
    # Graph batches use no slot settings, whatever else was recorded.
    pc = None if representation == GRAPH else d.get("point_cloud")
    return cls(cutoff=float(d["cutoff"]),
               max_neighbors=d.get("max_neighbors"),
               representation=representation,
               point_cloud=None if pc is None else PointCloudSpec(**pc))

  def stored_example(self, s: Structure, task: str,
                     rng: np.random.Generator | None = None,
                     stress: bool = False) -> dict:
    """The example a converted dataset stores for `s` (see `schema`).

    Args:
      s: a structure (validated here).
      task: "s2ef" or "is2re" (which targets are stored).
      rng: draws the point cloud's bulk centres (default: seeded with the
        spec's seed; the converter seeds one per entry).
      stress: store `s.stress` as `stress` (NaN without one), as datasets
        with stress do; without, a stress `s` has is neither stored nor
        checked (prediction needs none: ASE calculators such as EMT give
        one even for slabs that are not periodic in 3D).

    Raises:
      DataError: the structure is invalid.
    """
    if not stress and s.stress is not None:
      s = dataclasses.replace(s, stress=None)
    s = validate(s)
    edges = (_NO_EDGES if self.representation == POINT_CLOUD else
             neighbor_list(s.positions, s.cell, s.pbc, self.cutoff,
                           self.max_neighbors, distances=False))
    slots = None
    if self.point_cloud is not None:
      pc = self.point_cloud
      # The graph edges hold the slots when the radius is the same and the
      # cap keeps at least K: one neighbour search, not two.
      shared = (self.representation == BOTH and pc.cutoff == self.cutoff
                and (self.max_neighbors is None
                     or self.max_neighbors >= pc.num_neighbors))
      slots = point_cloud(s, pc.cutoff, pc.num_neighbors, pc.bulk_samples,
                          rng or np.random.default_rng(pc.seed),
                          edges if shared else None)
    return schema.to_example(s, edges, task, slots, stress)

  def example(self, s: Structure, task: str) -> dict:
    """`s` as a model reading this representation gets it: graph edges, or
    point-cloud slots as its edges (as `Dataset.split` gives them)."""
    if self.representation == BOTH:
      raise ValueError("a model reads one representation: select 'graph' "
                       "or 'point_cloud' first")
    ex = self.stored_example(s, task)
    return (schema.slots_as_edges(ex) if self.representation == POINT_CLOUD
            else ex)
