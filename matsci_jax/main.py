r"""Command-line entry point: parses flags and calls `train_and_evaluate`.

    python -m matsci_jax.main --config=configs/s2ef.py [--workdir=DIR] \
        [--config.model.hidden_dim=64 --config.train.num_steps=500 ...]
"""

import datetime
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Folder for checkpoints and logs (default: a new folder "
    "under ./runs/). Reusing a workdir resumes its run.")


def _fresh_workdir() -> str:
  """A new folder under ./runs/ (never an existing run, which would resume)."""
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  path, k = os.path.join("runs", stamp), 1
  while os.path.exists(path):
    k += 1
    path = os.path.join("runs", f"{stamp}-{k}")
  os.makedirs(path)
  return path


def main(argv):
  # Imported here, not above: worker processes that build the dev set start
  # by importing this module, and need neither jax nor the trainer.
  import jax

  from matsci_jax import parallel, train

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Library INFO logs (checkpointing) would bury the progress bar.
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/s2ef.py")
  parallel.initialize_distributed(config)
  if jax.process_count() > 1 and not _WORKDIR.value:
    raise app.UsageError("runs over several processes need --workdir, a "
                         "folder every process can reach")
  workdir = _WORKDIR.value or _fresh_workdir()
  logging.info("workdir: %s", os.path.abspath(workdir))
  result = train.train_and_evaluate(config, workdir)
  metrics = result["metrics"]
  lines = [f"finished step {result['step']} in {os.path.abspath(workdir)}"]
  if result["init"] or result["frozen_params"]:
    lines.append(f"  parameters: {result['trainable_params']:,} trainable, "
                 f"{result['frozen_params']:,} frozen"
                 + (f"; started from {result['init']['checkpoint']}"
                    if result["init"] else ""))
  for name, value in sorted(metrics.items()):
    lines.append(f"  {name:28s} {value:.5g}")
  for split, base in result["baselines"].items():
    for name, value in base.items():
      lines.append(f"  {split}/baseline_{name:19s} {value:.5g}")
  lines.append(f"  padding efficiency (nodes)   "
               f"{result['padding_efficiency']['nodes']:.3f}")
  lines.append(f"  compilations after warm-up   "
               f"{result['recompiles_after_warmup']}")
  if jax.process_index() == 0:
    print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
