"""Records a benchmark's JSON result in benchmarks/RESULTS.md.

Each benchmark owns one section, delimited by HTML comments, which `record`
replaces, so that re-running a benchmark updates its numbers in place.
"""

import json
import os
import platform

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
_HEADER = ("# Benchmark results\n\nWritten by the scripts in this folder "
           "(`--record`); each section holds the JSON a script printed.\n")


def cpu_model() -> str:
  """The CPU's model name (machines differ up to 3x; results name theirs)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def memory_status() -> dict:
  """This process's resident memory now (VmRSS) and at its peak (VmHWM),
  in bytes, from /proc/self/status."""
  out = {}
  with open("/proc/self/status") as f:
    for line in f:
      key, _, value = line.partition(":")
      if key in ("VmHWM", "VmRSS"):
        out[key] = int(value.split()[0]) * 1024
  return out


def machine() -> dict:
  import jax
  return {"platform": platform.platform(), "python": platform.python_version(),
          "cpu": cpu_model(), "cpu_count": os.cpu_count(),
          "jax": jax.__version__,
          "devices": [str(d) for d in jax.devices()]}


def record(name: str, title: str, result: dict, notes: str = "") -> None:
  """Replaces (or appends) the section `name` of RESULTS.md."""
  begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
  body = (f"{begin}\n## {title}\n\n{notes}\n\n```json\n"
          f"{json.dumps(result, indent=1)}\n```\n{end}")
  text = open(RESULTS).read() if os.path.exists(RESULTS) else _HEADER
  if begin in text and end in text:
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    text = head + body + tail
  else:
    text = text.rstrip("\n") + "\n\n" + body + "\n"
  with open(RESULTS, "w") as f:
    f.write(text)


def report(name: str, title: str, result: dict, notes: str = "",
           save: bool = False) -> None:
  """Adds the machine, prints the JSON and, with `save`, records it."""
  result["machine"] = machine()
  print(json.dumps(result, indent=1))
  if save:
    record(name, title, result, notes)
