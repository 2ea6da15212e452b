"""The ASE reader gives, frame by frame, what `ase.io.read` gives.

Extended XYZ frames with the common columns are parsed without building
`ase.Atoms`; these tests hold that reading to ASE's: the same structures
and the same frames rejected.
"""

import dataclasses
import shutil

import ase.io
import numpy as np
import pytest
from ase.build import add_adsorbate, bulk, fcc100, molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

from matsci_jax.data import ase_reader
from matsci_jax.data.ase_reader import AseReader, structure_from_atoms
from matsci_jax.data.structure import DataError

# Frames written by hand: unusual but valid values, and frames ASE
# rejects (an unknown element, a bad integer, a short line, a bad
# lattice, a column named twice) or reads in its own way (move_mask
# with three columns).
_LATTICE = 'Lattice="4 0 0 0 4 0 0 0 4"'
_BASIC = "Properties=species:S:1:pos:R:3"
_FRAMES = [
    (f"{_LATTICE} {_BASIC}:Z:I:1:move_mask:L:1:tags:I:1 energy=T "
     'pbc="T T F" sid=3 extra', "cu 0 0 0 29 1 1 junk more",
     "o 1 1_0 1 8 0 2"),
    (f"{_LATTICE} {_BASIC}:forces:R:3 y=1.5", "Cu 0 0 0 1 2 3",
     "O 1 1 1 nan inf -inf"),
    (f"{_BASIC}:move_mask:L:3", "Cu 0 0 0 T T F", "O 1 1 1 F F F"),
    (f"{_LATTICE} {_BASIC}", "Cu 0 0 0", "Xx 1 1 1"),
    (f"{_LATTICE} {_BASIC}:tags:I:1", "Cu 0 0 0 1", "O 1 1 1.5 2.5"),
    (f"{_LATTICE} {_BASIC}:tags:I:1", "Cu 0 0 0 1", "O 1 1 1"),
    (f"{_LATTICE} {_BASIC}:tags:I:1", "Cu 0 0 0 1", "O 1 1 1 99999999999"),
    (f'Lattice="4 0 0 0 4 0 0 0" {_BASIC}', "Cu 0 0 0", "O 1 1 1"),
    (f"{_LATTICE} {_BASIC}:pos:R:3", "Cu 0 0 0 0 0 0", "O 1 1 1 1 1 1"),
    (f'pbc="T T T" {_BASIC}:move_mask:L:1', "Cu 0 0 0 0", "O 1 1 1 True"),
    ("", "Cu 0 0 0", "O 1 1 1"),
    (f"{_LATTICE} {_BASIC}:energies:R:1 free_energy=2 energy=abc",
     "Cu 0 0 0 5", "O 1 1 1 6"),
    # Stress and virial are 3x3 (an asymmetric stress: the triangle ASE
    # keeps); 6 Voigt values, which ASE refuses here, are in test_stress.
    (f'{_LATTICE} {_BASIC}:energies:R:1 free_energy=2 '
     'stress="1 2 3 4 5 6 7 8 9"', "Cu 0 0 0 5", "O 1 1 1 6"),
    (f'{_LATTICE} {_BASIC} energy=1 virial="1 2 3 2 5 6 3 6 9"',
     "Cu 0 0 0", "O 1 1 1"),
    (f'{_LATTICE} {_BASIC} energy=1 stress="1 2 3 4"', "Cu 0 0 0",
     "O 1 1 1"),
]
HAND = "".join(f"{len(f) - 1}\n" + "\n".join(f) + "\n" for f in _FRAMES)


def _write_inputs(folder):
  frames = []
  for k in range(3):
    slab = fcc100("Cu", (2, 2, 3), vacuum=6.0)
    add_adsorbate(slab, "O", 1.6 + 0.1 * k, "hollow")
    slab.pbc = True
    layer = slab.get_tags()
    tags = np.where(layer == 0, 2, np.where(layer == 1, 1, 0))
    slab.set_tags(tags)
    slab.set_constraint(FixAtoms(mask=tags == 0))
    slab.calc = EMT()
    slab.get_forces()
    del slab.info["adsorbate_info"]
    slab.info.update(sid=7, fid=k, energy_relaxed=-1.5)
    frames.append(slab)
  ase.io.write(folder / "emt.extxyz", frames)
  water = molecule("H2O")
  water.info.update(y=3, free_energy=2.5)
  tilted = molecule("H2O")
  tilted.info["energy"] = -1.0
  tilted.pbc = (True, False, True)
  tilted.cell = [[5, 0, 0], [0, 6, 0], [1, 0, 7]]
  forces_only = bulk("Cu") * (2, 1, 1)
  forces_only.calc = SinglePointCalculator(forces_only,
                                           forces=np.ones((2, 3)))
  moving = bulk("NaCl", "rocksalt", a=5.6)
  moving.set_velocities(np.ones((2, 3)))
  ase.io.write(folder / "misc.extxyz", [water, tilted, forces_only, moving])
  ethanol = molecule("CH3CH2OH")
  ase.io.write(folder / "plain.xyz", [ethanol, ethanol], format="xyz")
  (folder / "hand.extxyz").write_text(HAND)
  return ["emt.extxyz", "misc.extxyz", "plain.xyz", "hand.extxyz"]


def _assert_same(a, b):
  for field in dataclasses.fields(a):
    x, y = getattr(a, field.name), getattr(b, field.name)
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
      assert (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)
              and x.dtype == y.dtype and x.shape == y.shape
              and np.array_equal(x, y, equal_nan=True)), field.name
    else:
      assert type(x) is type(y) and (x == y or x != x and y != y), (
          field.name, x, y)


def _check_file(path, subtract_reference=False):
  """Compares every frame with ASE's reading; returns how many frames
  took the fast path."""
  calls = {"fast": 0}
  parse = ase_reader._parse_extxyz_frame

  def counting(lines):
    frame = parse(lines)
    calls["fast"] += frame is not None
    return frame

  reader = AseReader(str(path), subtract_reference=subtract_reference)
  try:
    everything = ase.io.read(path, index=":")
  except Exception:  # noqa: BLE001 - a bad frame: read them one by one.
    everything = None
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(ase_reader, "_parse_extxyz_frame", counting)
    for i in range(len(reader)):
      sid, fid, ref = reader._oc20[i] if reader._oc20 else (-1, i, 0.0)
      try:
        atoms = (everything[i] if everything
                 else ase.io.read(path, index=i))
        want = structure_from_atoms(
            atoms, str(path), i, sid=sid, fid=fid,
            energy_offset=ref if subtract_reference else 0.0)
      except Exception:  # noqa: BLE001 - any rejection by ASE.
        with pytest.raises(DataError, match=rf"entry {i}: "):
          reader[i]
        continue
      _assert_same(reader[i], want)
  return calls["fast"]


def test_frames_match_ase(tmp_path):
  names = _write_inputs(tmp_path)
  fast = {name: _check_file(tmp_path / name) for name in names}
  # The common frames take the fast path; the others are read by ASE.
  assert fast["emt.extxyz"] == 3 and fast["plain.xyz"] == 2
  assert fast["misc.extxyz"] == 3 and fast["hand.extxyz"] >= 4


def test_oc20_chunk_matches_ase(shared_data, tmp_path):
  for suffix in ("extxyz", "txt"):
    shutil.copy(shared_data / f"oc20_s2ef_toy/source/0.{suffix}",
                tmp_path / f"0.{suffix}")
  for subtract in (False, True):
    assert _check_file(tmp_path / "0.extxyz", subtract) == 101


def test_blocks_read_each_frame_once(tmp_path):
  """Frames are read in blocks from their byte offsets, not by ASE
  scanning the file from its start for every block."""
  frames = [bulk("Cu") * (1, 1, k + 1) for k in range(600)]
  for k, atoms in enumerate(frames):
    atoms.info["energy"] = float(k)
  ase.io.write(tmp_path / "many.extxyz", frames)
  reader = AseReader(str(tmp_path / "many.extxyz"))
  seen = []
  with pytest.MonkeyPatch.context() as mp:
    parse = ase_reader._parse_extxyz_frame
    mp.setattr(ase_reader, "_parse_extxyz_frame",
               lambda lines: seen.append(int(lines[0])) or parse(lines))
    energies = [reader[i].energy for i in range(len(reader))]
  assert energies == [float(k) for k in range(600)]
  assert seen == [k + 1 for k in range(600)]
