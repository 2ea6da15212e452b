"""Peak arithmetic of accelerators (for MFU)."""

from matsci_jax import accelerators


def test_peaks_by_device_kind_and_precision():
  assert accelerators.peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
  assert accelerators.peak_flops("NVIDIA H200", "float32") == 494.5e12
  assert accelerators.peak_flops("NVIDIA A100-SXM4-40GB", "bf16") == 312e12
  # "TPU v5 lite" is v5e, not v5p.
  assert accelerators.peak_flops("TPU v5 lite", "bf16") == 197e12
  assert accelerators.peak_flops("TPU v5p", "bf16") == 459e12
  assert accelerators.peak_flops("cpu") is None
  # This job's devices are CPUs: no MFU.
  assert accelerators.mesh_peak_flops("bf16") is None
