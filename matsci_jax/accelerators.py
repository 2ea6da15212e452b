"""Peak arithmetic of accelerators, for model FLOP utilisation (MFU).

MFU = model FLOP/s (XLA's cost analysis of the compiled training step,
times steps per second) / the devices' peak. Peaks are the vendors' dense
numbers (no structured sparsity) per chip, in FLOP/s: "bf16" for mixed
precision, "float32" for full precision (TF32 tensor cores where the
hardware uses them for float32 matrix products by default on TPUs and
through XLA's default precision on NVIDIA GPUs). A device kind not listed
has no MFU; model FLOP/s are still logged.
"""

from __future__ import annotations

import jax

# (substring of jax.Device.device_kind, peak bf16, peak float32) per chip.
PEAKS = (
    ("H200", 989e12, 494.5e12),
    ("H100", 989e12, 494.5e12),   # SXM; the PCIe card is about 0.76 of it.
    ("GH200", 989e12, 494.5e12),
    ("B200", 2250e12, 1125e12),
    ("A100", 312e12, 156e12),
    ("L40S", 362e12, 183e12),
    ("A10G", 70e12, 35e12),
    ("L4", 121e12, 60e12),
    ("V100", 125e12, 15.7e12),    # Tensor cores take float16, not bf16.
    ("TPU v6", 918e12, 918e12),   # Trillium (v6e).
    ("TPU v5p", 459e12, 459e12),
    ("TPU v5", 197e12, 197e12),   # v5e ("TPU v5 lite").
    ("TPU v4", 275e12, 275e12),
    ("TPU v3", 123e12, 123e12),
)


def peak_flops(device_kind: str, precision: str = "float32"
               ) -> float | None:
  """Peak FLOP/s of one device of `device_kind`, or None when unknown
  (CPUs, unlisted accelerators)."""
  for name, bf16, f32 in PEAKS:
    if name.lower() in device_kind.lower():
      return bf16 if precision == "bf16" else f32
  return None


def mesh_peak_flops(precision: str = "float32") -> float | None:
  """Peak FLOP/s of all devices of this job, or None when any is
  unknown."""
  peaks = [peak_flops(d.device_kind, precision) for d in jax.devices()]
  return None if any(p is None for p in peaks) else float(sum(peaks))
