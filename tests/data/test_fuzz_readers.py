"""Seeded fuzzing of the restricted unpickler and the LMDB reader.

Real fixture values and files (../shared/data) are mutated by bit flips,
truncations, insertions and overwrites. Every case must decode or raise
`DataError` naming the file and entry: no other exception, no crash, no
allocation beyond a bound, and no code run by a pickle that names
`os.system` and the like.

The mutation loops run in a subprocess (this file run as a script), so
that a segfault or bus error fails the test instead of killing pytest, and
under an address-space limit, so that a runaway allocation fails as a
MemoryError instead of exhausting the machine. A failing case prints the
command that replays it alone, e.g.

    python tests/data/test_fuzz_readers.py values --data ../shared/data \
        --seed 0 --first 1234 --cases 1
"""

import argparse
import io
import json
import os
import pickle
import pickletools
import random
import re
import resource
import subprocess
import sys
import tracemalloc

import pytest

from matsci_jax.data import lmdb_reader
from matsci_jax.data.lmdb_reader import LmdbReader
from matsci_jax.data.structure import DataError, validate

# Fixture datasets whose files and values seed the mutations; the small
# files are mutated whole (every entry is read back after each mutation).
VALUE_SOURCES = (
    "oc20_s2ef_toy/edges", "oc20_s2ef_toy/noedges",
    "oc20_s2ef_toy/fairchem_core_1.9_edges_every10",
    "oc20_s2ef_toy_legacy/edges_every10", "oc20_is2re_toy/data.lmdb",
    "oc20_is2re_toy/pyg2_tutorial/data.lmdb", "matsciml_lips_devset")
FILE_SOURCES = (
    "oc20_s2ef_toy/noedges/data.0000.lmdb",
    "oc20_s2ef_toy/fairchem_core_1.9_noedges/data.0000.lmdb",
    "oc20_s2ef_toy_legacy/noedges/data.0000.lmdb",
    "oc20_is2re_toy/data.lmdb", "matsciml_lips_devset/data.lmdb")
VALUE_CASES = 2500
FILE_CASES = 400
# Most bytes one value case may allocate (tracemalloc peak). Fixture values
# take under 1 MB; a lying length field or memo index would ask for
# gigabytes.
VALUE_PEAK_BYTES = 32 << 20
# Address space a worker may add to what it holds after its imports.
WORKER_EXTRA_ADDRESS_SPACE = 1 << 30
_STORAGE_MAGIC = b"\x80\x02\x8a\x0a"  # A legacy torch.save stream's start.
_PAGE = 4096  # LMDB page size of the fixtures.


def _mutate(rng: random.Random, data: bytes) -> tuple[str, bytes]:
  """One random mutation of `data`: (kind, mutated bytes)."""
  kind = rng.choice(("flip", "truncate", "insert", "overwrite"))
  out = bytearray(data)
  if kind == "truncate":
    del out[rng.randrange(len(out)):]
    return kind, bytes(out)
  for _ in range(rng.randint(1, 4)):
    at = rng.randrange(len(out))
    if kind == "flip":
      out[at] ^= 1 << rng.randrange(8)
    elif kind == "insert":
      out[at:at] = rng.randbytes(rng.randint(1, 16))
    else:
      n = rng.randint(1, 16)
      out[at:at + n] = rng.randbytes(n)
  return kind, bytes(out)


class _OneValue(LmdbReader):
  """A reader whose only entry holds given bytes (no file), so that values
  go through exactly the decoding and error naming of `LmdbReader`."""

  PATH, KEY = "mutated.lmdb", "0"

  def __init__(self, value: bytes):
    self.path, self.files = self.PATH, [self.PATH]
    self._entries = [(0, self.KEY.encode())]
    self.value = value

  def raw(self, i: int) -> bytes:
    return self.value


def _fixture_values(data_dir: str) -> list[bytes]:
  """The first and last value of every value source, and a length key."""
  values = []
  for source in VALUE_SOURCES:
    reader = LmdbReader(os.path.join(data_dir, source))
    values += [reader.raw(0), reader.raw(len(reader) - 1)]
  values.append(pickle.dumps(101))  # What an S2EF `length` key holds.
  return values


def _address_space_limit():
  """Caps this process at its current size plus WORKER_EXTRA_ADDRESS_SPACE
  (on Linux; elsewhere the value cases' tracemalloc bound remains)."""
  try:
    with open("/proc/self/status") as f:
      status = f.read()
  except OSError:
    return
  size = int(re.search(r"VmSize:\s+(\d+) kB", status).group(1)) * 1024
  limit = size + WORKER_EXTRA_ADDRESS_SPACE
  resource.setrlimit(resource.RLIMIT_AS,
                     (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def _emit(record: dict):
  print(json.dumps(record), flush=True)


def _read_all(reader: LmdbReader, outcomes: dict, check: bool = True):
  """Reads every entry, and validates it if `check`; DataError must name
  the file and the entry."""
  for i in range(len(reader)):
    path, key = reader.key(i)
    try:
      structure = reader[i]
      if check:
        validate(structure)
      outcomes["decoded"] += 1
    except DataError as e:
      if (e.path, e.key) != (path, key):
        raise AssertionError(f"DataError names {e.path}, entry {e.key!r} "
                             f"instead of {path}, entry {key!r}") from e
      outcomes["data_error"] += 1


def _value_cases(args) -> dict:
  values = _fixture_values(args.data)
  outcomes = {"decoded": 0, "data_error": 0, "max_peak": 0}
  tracemalloc.start()
  for case in range(args.first, args.first + args.cases):
    rng = random.Random(args.seed * 1_000_003 + case)
    kind, value = _mutate(rng, rng.choice(values))
    _emit({"case": case, "kind": kind})
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
      _read_all(_OneValue(value), outcomes)
    except Exception as e:  # Anything but DataError is a failure.
      _emit({"case": case, "kind": kind,
             "failure": f"{type(e).__name__}: {e}"[:500]})
      continue
    peak = tracemalloc.get_traced_memory()[1] - base
    outcomes["max_peak"] = max(outcomes["max_peak"], peak)
    if peak > VALUE_PEAK_BYTES:
      _emit({"case": case, "kind": kind,
             "failure": f"allocated {peak} bytes"})
  tracemalloc.stop()
  return outcomes


def _structure_pages(data: bytes) -> list[int]:
  """Offsets of the meta, branch and leaf pages (not overflow pages)."""
  pages, page = [], 0
  while page * _PAGE < len(data):
    start = page * _PAGE
    flags = int.from_bytes(data[start + 10:start + 12], "little")
    pages.append(start)
    if flags & 0x04:  # P_OVERFLOW: its count of pages follows the flags.
      pages.pop()
      page += max(int.from_bytes(data[start + 12:start + 16], "little"), 1)
    else:
      page += 1
  return pages


def _file_cases(args, tmp: str) -> dict:
  sources = [open(os.path.join(args.data, s), "rb").read()
             for s in FILE_SOURCES]
  pages = [_structure_pages(s) for s in sources]
  outcomes = {"decoded": 0, "data_error": 0, "file_error": 0}
  for case in range(args.first, args.first + args.cases):
    rng = random.Random(args.seed * 1_000_003 + case)
    index = rng.randrange(len(sources))
    kind, data = _mutate(rng, sources[index])
    if kind == "flip" and rng.random() < 0.5:
      # The B-tree's own pages, a few percent of a file, steer every read.
      data = bytearray(sources[index])
      for _ in range(rng.randint(1, 4)):
        at = rng.choice(pages[index]) + rng.randrange(_PAGE)
        data[at] ^= 1 << rng.randrange(8)
      kind, data = "flip_btree", bytes(data)
    path = os.path.join(tmp, f"case{case}.lmdb")
    with open(path, "wb") as f:
      f.write(data)
    _emit({"case": case, "kind": kind, "source": FILE_SOURCES[index]})
    try:
      try:
        reader = LmdbReader(path)
      except DataError as e:
        if e.path != path:
          raise AssertionError(f"DataError names {e.path}, not {path}") from e
        outcomes["file_error"] += 1
      else:
        # Values are checked in depth by the value cases.
        _read_all(reader, outcomes, check=False)
    except Exception as e:  # Anything but DataError is a failure.
      _emit({"case": case, "kind": kind, "source": FILE_SOURCES[index],
             "failure": f"{type(e).__name__}: {e}"[:500]})
    # Readers share one environment per file; drop it with the file.
    env = lmdb_reader._ENVS.pop(os.path.realpath(path), None)
    if env is not None:
      env.close()
    os.remove(path)
  return outcomes


def _worker(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("mode", choices=("values", "files"))
  parser.add_argument("--data", required=True)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--first", type=int, default=0)
  parser.add_argument("--cases", type=int, required=True)
  parser.add_argument("--tmp", default="/tmp")
  args = parser.parse_args(argv)
  _address_space_limit()
  if args.mode == "values":
    outcomes = _value_cases(args)
  else:
    outcomes = _file_cases(args, args.tmp)
  _emit({"done": outcomes})


def _run_worker(mode: str, data_dir, cases: int, tmp_path) -> dict:
  """Runs the cases of `mode` in a subprocess; fails on any bad case."""
  cmd = [sys.executable, __file__, mode, "--data", str(data_dir),
         "--seed", "0", "--cases", str(cases), "--tmp", str(tmp_path)]
  # The hang guard only; the test asserts nothing about speed.
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
  records = [json.loads(line) for line in proc.stdout.splitlines()
             if line.startswith("{")]
  cases_run = [r for r in records if "case" in r and "failure" not in r]
  failures = [r for r in records if "failure" in r]

  def replay(case):
    return (f"python {os.path.relpath(__file__)} {mode} --data {data_dir} "
            f"--seed 0 --first {case} --cases 1")

  if proc.returncode != 0:
    last = cases_run[-1] if cases_run else {}
    pytest.fail(f"the {mode} worker died with status {proc.returncode} "
                f"during case {last}; replay: {replay(last.get('case', 0))}"
                f"\n{proc.stderr[-3000:]}")
  assert not failures, (
      f"{len(failures)} of {cases} {mode} cases raised something other than "
      f"DataError or allocated too much, e.g. {failures[:5]}; replay: "
      f"{replay(failures[0]['case'])}")
  assert len(cases_run) == cases
  return records[-1]["done"]


def test_mutated_values_decode_or_raise_data_error(shared_data, tmp_path):
  outcomes = _run_worker("values", shared_data, VALUE_CASES, tmp_path)
  # Both outcomes occur: the mutations reach past the first byte.
  assert outcomes["decoded"] > 100 and outcomes["data_error"] > 1000
  assert outcomes["decoded"] + outcomes["data_error"] == VALUE_CASES
  assert outcomes["max_peak"] <= VALUE_PEAK_BYTES


def test_mutated_lmdb_files_never_crash(shared_data, tmp_path):
  outcomes = _run_worker("files", shared_data, FILE_CASES, tmp_path)
  assert outcomes["file_error"] > 20 and outcomes["data_error"] > 100
  assert outcomes["decoded"] > 1000


# --- Pickles that would run code -------------------------------------------

def _calls(marker: str) -> list[tuple[str, str, tuple]]:
  """(module, name, args) of calls that would create `marker`."""
  code = f"open({marker!r}, 'w').close()"
  return [("os", "system", (f"touch {marker}",)),
          ("posix", "system", (f"touch {marker}",)),
          ("subprocess", "call", (["touch", marker],)),
          ("subprocess", "Popen", (["touch", marker],)),
          ("builtins", "exec", (code,)),
          ("builtins", "eval", (code,)),
          ("builtins", "open", (marker, "w")),
          ("io", "open", (marker, "w")),
          ("__builtin__", "eval", (code,)),
          ("numpy", "save", (marker, [1]))]


def _call_ops(module: str, name: str, args: tuple, style: str) -> bytes:
  """Opcodes that call module.name(*args) and pop the result."""
  arg_ops = pickletools.optimize(pickle.dumps(args, protocol=2))[2:-1]
  if style == "global":
    return (b"c" + module.encode() + b"\n" + name.encode() + b"\n" + arg_ops
            + b"R0")
  if style == "stack_global":
    strings = b"".join(b"\x8c" + bytes([len(s)]) + s.encode()
                       for s in (module, name))
    return strings + b"\x93" + arg_ops + b"R0"
  # INST: the class named inline is called with the items after a MARK.
  items = b"".join(pickletools.optimize(pickle.dumps(a, protocol=2))[2:-1]
                   for a in args)
  return (b"(" + items + b"i" + module.encode() + b"\n" + name.encode()
          + b"\n0")


def _opcode_starts(data: bytes, pickles: int = 1) -> list[int]:
  starts, f = [], io.BytesIO(data)
  for _ in range(pickles):
    starts += [pos for _, _, pos in pickletools.genops(f)][1:]
  return starts


def _splice(data: bytes, start: int, stop: int, new: bytes) -> bytes:
  """`data[start:stop]` replaced by `new`, with the length of the protocol-4
  frame around `start` (if any) adjusted, so that the pickle stays valid."""
  out = data[:start] + new + data[stop:]
  for op, arg, pos in pickletools.genops(data):
    if op.name == "FRAME" and pos + 9 <= start < pos + 9 + arg:
      length = arg + len(new) - (stop - start)
      return out[:pos + 1] + length.to_bytes(8, "little") + out[pos + 9:]
  return out


def _with_storage(value: bytes, old: bytes, new: bytes) -> bytes:
  """`value` with the BINBYTES storage payload `old` replaced by `new`."""
  for op, arg, pos in pickletools.genops(value):
    if arg == old:
      head = 1 + (1 if op.name == "SHORT_BINBYTES" else
                  8 if op.name == "BINBYTES8" else 4)
      return _splice(value, pos, pos + head + len(old),
                     b"B" + len(new).to_bytes(4, "little") + new)
  raise AssertionError("storage payload not found")


def test_pickles_naming_dangerous_globals_run_nothing(shared_data, tmp_path):
  marker = str(tmp_path / "ran")
  rng = random.Random(0)
  values = _fixture_values(str(shared_data))[:-1]
  cases = 0
  for module, name, args in _calls(marker):
    for style in ("global", "stack_global", "inst"):
      ops = _call_ops(module, name, args, style)
      for _ in range(4):
        value = rng.choice(values)
        storages = [arg for _, arg, _ in pickletools.genops(value)
                    if isinstance(arg, bytes)
                    and arg.startswith(_STORAGE_MAGIC)]
        if storages and rng.random() < 0.5:
          # Inside a tensor's storage stream, read by a second unpickler.
          old = rng.choice(storages)
          at = rng.choice(_opcode_starts(old, pickles=5))
          value = _with_storage(value, old, old[:at] + ops + old[at:])
        else:
          at = rng.choice(_opcode_starts(value))
          value = _splice(value, at, at, ops)
        with pytest.raises(DataError) as err:
          _OneValue(value)[0]
        # Protocol-2 storage streams read `__builtin__` as `builtins`.
        assert (f"{module}.{name}" in str(err.value)
                or f"builtins.{name}" in str(err.value))
        assert "mutated.lmdb, entry '0'" in str(err.value)
        assert not os.path.exists(marker), (module, name, style)
        cases += 1
  assert cases == 120


def test_dangerous_call_ops_would_run_under_plain_pickle(tmp_path):
  """The attack opcodes are live: a plain unpickler would make the call."""
  called = []

  class Recorder(pickle.Unpickler):
    def find_class(self, module, name):
      return lambda *a: called.append((module, name, a))

  marker = str(tmp_path / "ran")
  for module, name, args in _calls(marker):
    for style in ("global", "stack_global", "inst"):
      body = _call_ops(module, name, args, style)
      Recorder(io.BytesIO(b"\x80\x02" + body + b"N.")).load()
      assert called.pop() == (module, name, args)


if __name__ == "__main__":
  _worker(sys.argv[1:])
