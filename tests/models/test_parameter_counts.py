"""Every model config has the parameter count README states."""

import os
import re

import pytest

from configs import models as model_configs
from matsci_jax.models.counting import count_parameters

README = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "README.md")


def _readme_counts():
  rows = {}
  for line in open(README):
    m = re.match(r"\| `(\w+)`[^|]*\|[^|]*\|[^|]*"
                 r"\| ([\d,]+) \| ([\d,]+) \|", line)
    if m:
      rows[m.group(1)] = (int(m.group(2).replace(",", "")),
                          int(m.group(3).replace(",", "")))
  return rows


def test_readme_lists_every_model_config():
  assert set(_readme_counts()) == set(model_configs.names())


@pytest.mark.parametrize("name", model_configs.names())
def test_parameter_count_matches_readme(name):
  s2ef, is2re = _readme_counts()[name]
  # The representation comes from the model class.
  assert count_parameters(model_configs.model_config(name, "s2ef")) == s2ef
  assert count_parameters(model_configs.model_config(name, "is2re")) == is2re


def test_every_model_of_the_package_has_configs_in_readme():
  """A model added to matsci_jax.models (nequip, say) comes with configs
  and README rows, so its parameter counts are checked above."""
  from matsci_jax import models
  packaged = {name for name in models.names()
              if models.model_class(name).__module__.startswith(
                  "matsci_jax.models.")}
  listed = {model_configs.model_config(name, "s2ef").name
            for name in _readme_counts()}
  assert packaged == listed
  assert {"nequip", "nequip_reference"} <= set(_readme_counts())
