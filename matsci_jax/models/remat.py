"""Rematerialisation (activation checkpointing) of interaction layers.

`config.model.remat` names what a layer keeps for the backward pass; the
rest is recomputed there, trading compute for activation memory:
* "" (default): keep everything (no rematerialisation);
* "full": keep only the layer's inputs;
* "dots": keep the results of matrix multiplications;
* "dots_no_batch": keep those without batch dimensions.
Gradients are the same as without it, up to floating-point reordering.

A layer is wrapped twice. S2EF losses differentiate forces, themselves a
gradient, so a training step differentiates each layer's backward pass:
with one wrapper, the forward pass that backward pass recomputes is plain
code to the outer derivative, which then keeps all its intermediates
(several [edges, width] arrays per layer). The second wrapper makes the
outer derivative recompute it too, so per layer only its inputs are kept.
That costs about 9% more FLOPs than one wrapper (an EGNN S2EF step: 1.97
against 1.80 times the step without remat, by XLA's count); first
derivatives (IS2RE) cost the same either way, the inner wrapper then only
evaluating.

Unrolled layers leave the compiler free to run every recomputation early,
which it may do for second derivatives whatever the scheduler; a model
that scans over its layers (EGNN's `scan_layers`) runs them in order, so
memory is bounded by one layer however deep the model
(benchmarks/plan_paper_sizes.py).

The saving depends on the compiler scheduling the recomputation late. GPU
and TPU schedulers do; XLA:CPU's default one favours concurrency and
recomputes early, which undoes it: on a CPU set
`XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false` (see
benchmarks/scaling.py).
"""

from __future__ import annotations

import flax.linen as nn
import jax

POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def wrap(layer: type[nn.Module], policy: str) -> type[nn.Module]:
  """`layer`, rematerialised with `policy` ("" returns it unchanged)."""
  if not policy:
    return layer
  if policy not in POLICIES:
    raise ValueError(f"remat must be '' or one of {sorted(POLICIES)}, got "
                     f"{policy!r}")
  return nn.remat(nn.remat(layer, policy=POLICIES[policy]),
                  policy=POLICIES[policy])
