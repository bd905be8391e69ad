r"""Compiles the real DiT train step for a TPU topology on a CPU host: memory per chip, FLOPs, step time.

  python tools/aot_compile.py --config=configs/tiny_t2v.py --topology=v5p-64 [--config.a.b=value ...]
  python tools/aot_compile.py --config=configs/dit_wan1p3b.py --topology=v5p:2x2x1

Nothing is allocated: the train state comes from `train_dit.create(..., abstract=True)` and the packed batch
is ShapeDtypeStructs sharded like `mesh.global_batch`; libtpu's compiler sees the topology through
`jax.experimental.topologies`. Prints per-chip memory (arguments, outputs, temporaries, total vs HBM), the
analytic FLOPs, and the compiler's cost estimate. A `lax.scan` body is costed once by the compiler, so with
`--cost=extrapolate` (default) FLOPs and time come from two extra compiles with 1 and 2 unrolled layers:
cost(depth) = c1 + (depth - 1) * (c2 - c1), with XLA's windowed einsum off (its loops over shards would also
be costed once; see COST_COMPILER_OPTIONS). A Pallas kernel (splash attention) has no cost estimate and counts
as zero unless `--kernel_costs=declare` (default): then every splash kernel (forward, dq, dkv) is given a
declared cost while compiling, the FLOPs of its matmuls (forward 4 H Lq Lk D; dq 6, recomputing the scores;
dkv 8, or 10 when it also forms dq) and the bytes it moves (q, k, v, the outputs, and k, v read again for
every block of queries, or q for every block of keys in dkv), which the cost model turns into time as it
does for any op: what a kernel at the chip's roofline would take. `attention_costed` in the output says
whether attention is in the time. With attention costed the output has `estimated_mfu` (analytic FLOPs over
the estimated time); without, `estimated_mfu_without_attention` (the analytic FLOPs outside attention scores
and values over the attention-free time).

Exit status 1 with one line on stderr when the step does not fit. The last line is one JSON object.
"""
import contextlib
import functools
import json
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The compiler only: no TPU is attached, so the lock that guards a real chip is not needed; CPU is the host.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (python, get_config(arg)).",
                                          lock_config=False)
_TOPOLOGY = flags.DEFINE_string("topology", "v5p-8", "v5p-64 (cores, as Cloud TPU names it), v5e-16, v6e-8 "
                                "(chips) or an explicit libtpu name like v5p:2x2x1.")
_COST = flags.DEFINE_enum("cost", "extrapolate", ["extrapolate", "direct", "none"],
                          "extrapolate: FLOPs/time from 1- and 2-layer unrolled compiles; direct: the compile "
                          "as configured (a scanned body counts once); none: memory only.")
_KERNEL_COSTS = flags.DEFINE_enum("kernel_costs", "declare", ["declare", "none"],
                                  "declare: give splash attention's Pallas kernels their FLOPs and bytes so the "
                                  "compiler's time includes attention; none: they count as free.")
_HBM_GIB = flags.DEFINE_float("hbm_gib", None, "Override the chip's HBM in GiB.")
flags.mark_flags_as_required(["config"])

GIB = 2**30
# Per chip: TensorCores (Cloud TPU names v4/v5p slices by cores), HBM bytes.
CHIPS = {"v4": (2, 32 * GIB), "v5p": (2, 95 * GIB), "v5e": (1, 16 * GIB), "v6e": (1, 32 * GIB)}


def topology_name(name: str) -> tuple[str, str]:
  """'v5p-64' -> ('v5p', 'v5p:2x4x4'); 'v5p:2x2x1' passes through. Shapes follow Cloud TPU slices."""
  if ":" in name:
    return name.split(":")[0], name
  m = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name)
  if not m:
    raise ValueError(f"--topology={name!r}: expected e.g. v5p-64, v6e-8 or v5p:2x2x1")
  kind, n = m.group(1), int(m.group(2))
  chips = n // CHIPS[kind][0]
  if chips < 1 or chips & (chips - 1):
    raise ValueError(f"--topology={name!r}: {chips} chips is not a power of two")
  if kind in ("v4", "v5p"):  # 3D torus, grown from 2x2x1 by doubling the smallest dimension
    dims = [2, 2, 1] if chips >= 4 else [chips, 1, 1]
    while math.prod(dims) < chips:
      dims[dims.index(min(dims))] *= 2
    dims = sorted(dims[:2]) + [dims[2]] if dims[2] == 1 else sorted(dims)
  else:  # 2D
    a = 2 ** (int(math.log2(chips)) // 2)
    dims = [a, chips // a]
  return kind, f"{kind}:{'x'.join(map(str, dims))}"


def abstract_batch(config, mesh):
  """The packed batch (docs/ARCHITECTURE.md) as sharded ShapeDtypeStructs; the keys the step reads."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from sora_jax.models import t2v  # pylint: disable=g-import-not-at-top
  from sora_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  c = config.train_dit
  B, L, Lt, S = c.batch_size, c.seq_len, c.text_seq_len, c.max_segments
  shapes = {
      "tokens": ((B, L, t2v.patch_dim(config)), jnp.float32),
      "tokens_segment_ids": ((B, L), jnp.int32),
      "coords": ((B, L, 3), jnp.int32),
      "text": ((B, Lt), jnp.int32),
      "text_segment_ids": ((B, Lt), jnp.int32),
      "text_positions": ((B, Lt), jnp.int32),
      "grid": ((B, S, 3), jnp.int32),
      "grid_segment_ids": ((B, S), jnp.int32),
      "given": ((B, S), jnp.int32),
  }
  return {k: jax.ShapeDtypeStruct(s, d, sharding=mesh_lib.batch_sharding(mesh, len(s)))
          for k, (s, d) in shapes.items()}


def splash_kernel_cost(name: str, args, out_shape, grid) -> tuple[int, int, int]:
  """(flops, transcendentals, bytes) of one splash attention kernel call, from its name and operands.

  q [H, Lq, D] and k [H, Lk, D] are the first two 3-D floating operands (head-dim-minor layout). The grid is
  (heads, query blocks, key blocks) in the forward and dq kernels, (heads, key blocks, query blocks) in dkv.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  arrays = [a for a in args
            if hasattr(a, "shape") and len(a.shape) == 3 and jax.numpy.issubdtype(a.dtype, jax.numpy.floating)]
  q, k = arrays[0], arrays[1]
  h, lq, d = q.shape
  lk = k.shape[1]
  nbytes = lambda a: int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize  # noqa: E731
  outs = [o for o in jax.tree.leaves(out_shape) if hasattr(o, "shape")]
  out_bytes = sum(nbytes(o) for o in outs)
  in_bytes = sum(nbytes(a) for a in args if hasattr(a, "shape"))
  scores = h * lq * lk * d
  if "_dkv" in name:
    fused_dq = any(tuple(o.shape[1:]) == tuple(q.shape) for o in outs)  # dq per key block, formed here too
    flops = (10 if fused_dq else 8) * scores
    reread = (grid[1] - 1) * 2 * nbytes(q)  # q and dO again for every block of keys
  elif "_dq" in name:
    flops = 6 * scores
    reread = (grid[1] - 1) * 2 * nbytes(k)  # k and v again for every block of queries
  else:
    flops = 4 * scores
    reread = (grid[1] - 1) * 2 * nbytes(k)
  return int(flops), int(h * lq * lk), int(in_bytes + out_bytes + reread)


class declared_splash_costs:  # pylint: disable=invalid-name
  """While active, splash attention's `pallas_call`s carry a `CostEstimate` from `splash_kernel_cost`."""

  def __enter__(self):
    from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib  # pylint: disable=g-import-not-at-top

    class Costed:
      def __getattr__(self, attr):
        return getattr(pl, attr)

      @staticmethod
      def pallas_call(kernel, *a, name="", cost_estimate=None, out_shape=None, grid_spec=None, **kw):
        call = functools.partial(pl.pallas_call, kernel, *a, name=name, out_shape=out_shape, grid_spec=grid_spec,
                                 **kw)
        if cost_estimate is not None or not name.startswith("splash_"):
          return call(cost_estimate=cost_estimate)

        def with_cost(*args):
          flops, trans, nbytes = splash_kernel_cost(name, args, out_shape, grid_spec.grid)
          estimate = pl.CostEstimate(flops=flops, transcendentals=trans, bytes_accessed=nbytes)
          return call(cost_estimate=estimate)(*args)
        return with_cost

    self._lib, self._pl = kernel_lib, kernel_lib.pl
    kernel_lib.pl = Costed()
    return self

  def __exit__(self, *exc):
    self._lib.pl = self._pl


def attention_costed(backend: str, kernel_costs: str) -> bool:
  """Whether the compiler's time includes attention: XLA's own ops always, splash's kernels when declared."""
  return backend == "xla" or (backend in ("splash", "splash_fused") and kernel_costs == "declare")


# The cost compiles turn off XLA's windowed einsum (collective matmul): on larger meshes it splits an
# all-gather or reduce-scatter and its matmul into a while loop over shards, and the cost model counts a loop
# body once, so those matmuls would count for one shard only (on v5p-64 the 1-layer step read 6.3e12 FLOPs
# per chip against 1.1e13 on v5p-8 for the same per-chip work). Without it every matmul is counted and the
# collectives are not overlapped with them: an estimate on the safe side of the real program.
COST_COMPILER_OPTIONS = {"xla_jf_spmd_threshold_for_windowed_einsum_mib": 1_000_000}


def compile_step(config, devices, compiler_options=None):
  """Lowers and compiles `train_dit.make_train_step` for `devices`; returns the compiled executable."""
  from sora_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from sora_jax.train import train_dit  # pylint: disable=g-import-not-at-top
  mesh = mesh_lib.make_mesh(config.mesh, devices=devices)
  created, tx = train_dit.create(config, mesh, abstract=True)
  costs = declared_splash_costs() if _KERNEL_COSTS.value == "declare" else contextlib.nullcontext()
  with mesh_lib.use(mesh, mesh_lib.DIT_RULES), costs:
    step = train_dit.make_train_step(config, created.graphdef, tx, created.shardings)
    lowered = step.lower(created.state, abstract_batch(config, mesh))
    return lowered.compile(compiler_options=compiler_options), created


def cost(compiled) -> dict:
  c = compiled.cost_analysis()
  c = c[0] if isinstance(c, (list, tuple)) else c
  return {"flops": float(c.get("flops", 0.0)), "seconds": float(c.get("optimal_seconds", float("nan"))),
          "bytes_accessed": float(c.get("bytes accessed", 0.0))}


def memory(compiled) -> dict:
  m = compiled.memory_analysis()
  out = {"argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
         "alias_bytes": m.alias_size_in_bytes, "temp_bytes": m.temp_size_in_bytes,
         "code_bytes": m.generated_code_size_in_bytes}
  # Donated outputs reuse their argument buffers (alias), so they are counted once.
  out["per_chip_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                           + out["temp_bytes"] + out["code_bytes"])
  return out


def extrapolated_cost(config, devices) -> dict:
  """Cost of the configured depth from unrolled 1- and 2-layer compiles (scan bodies count once)."""
  costs = []
  for depth in (1, 2):
    c = config.copy_and_resolve_references()
    c.dit.depth, c.dit.scan_layers = depth, False
    costs.append(cost(compile_step(c, devices, COST_COMPILER_OPTIONS)[0]))
  depth = config.dit.depth
  return {k: costs[0][k] + (depth - 1) * (costs[1][k] - costs[0][k]) for k in costs[0]}


def _bytes_from_oom(message: str) -> int | None:
  """Bytes the compiler wanted, from its out-of-memory message (two phrasings seen from libtpu)."""
  m = (re.search(r"Used ([\d.]+)([KMGT])? of", message) or
       re.search(r"memory required for HLO temporaries \(([\d.]+)([KMGT])?\)", message))
  if not m:
    return None
  return int(float(m.group(1)) * {None: 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2)])


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  from sora_jax import configs_lib  # pylint: disable=g-import-not-at-top
  from sora_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from sora_jax.train import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from sora_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  configs_lib.validate(config)
  kind, name = topology_name(_TOPOLOGY.value)
  hbm = int(_HBM_GIB.value * GIB) if _HBM_GIB.value else CHIPS[kind][1]
  devices = topologies.get_topology_desc(platform="tpu", topology_name=name).devices
  sizes = mesh_lib.mesh_shape(config.mesh, len(devices))
  report = {"topology": name, "chips": len(devices), "device_kind": devices[0].device_kind,
            "mesh": dict(zip(mesh_lib.AXES, sizes)), "attention": config.attention, "remat": config.dit.remat,
            "cost": _COST.value, "kernel_costs": _KERNEL_COSTS.value, "hbm_bytes": hbm}
  try:
    compiled, created = compile_step(config, devices)
  except Exception as e:  # pylint: disable=broad-except
    if "RESOURCE_EXHAUSTED" not in str(e) and "Ran out of memory" not in str(e):
      raise
    used = _bytes_from_oom(str(e))
    report.update(fits=False, per_chip_bytes=used, error=str(e).splitlines()[0][:300])
    wanted = "an unknown amount" if used is None else f"{used / GIB:.1f} GiB"
    print(f"aot_compile: does not fit on {name}: the compiler ran out of HBM ({wanted} wanted, "
          f"{hbm / GIB:.1f} GiB per chip)", file=sys.stderr)
    print(json.dumps(report))
    sys.exit(1)

  mem = memory(compiled)
  report.update(mem)
  report["params"] = state_lib.num_params(created.state.params)
  report["fits"] = mem["per_chip_bytes"] <= hbm
  analytic = flops_lib.train_flops_per_step(config)
  report["analytic_flops_per_step"] = analytic
  report["analytic_flops_per_chip"] = analytic / len(devices)
  if _COST.value != "none":
    c = extrapolated_cost(config, devices) if _COST.value == "extrapolate" else cost(compiled)
    # XLA attention is costed by the compiler, splash by its declared kernel costs; blockwise loops are scan
    # bodies (costed once).
    from sora_jax.models import attention as attention_lib  # pylint: disable=g-import-not-at-top
    with mesh_lib.use(mesh_lib.make_mesh(config.mesh, devices=devices), mesh_lib.DIT_RULES):
      backend = attention_lib.resolve_backend(config.attention, config.train_dit.seq_len,
                                              config.train_dit.seq_len, config.dit.width // config.dit.num_heads)
    report["attention_backend"] = backend
    report.update(compiler_flops_per_chip=c["flops"], compiler_bytes_accessed=c["bytes_accessed"],
                  estimated_step_s=c["seconds"],
                  attention_costed=attention_costed(backend, _KERNEL_COSTS.value),
                  layers_costed=_COST.value == "extrapolate" or not config.dit.scan_layers)
    peak = flops_lib.PEAK_FLOPS.get(kind)
    if peak and c["seconds"] > 0:
      if report["attention_costed"]:
        report["estimated_mfu"] = analytic / len(devices) / (c["seconds"] * peak)
      else:
        # The estimated time leaves attention out, so only the FLOPs it covers may be divided by it (the
        # analytic total over that time can exceed 100%).
        costed = analytic - flops_lib.attention_flops_per_step(config)
        report["estimated_mfu_without_attention"] = costed / len(devices) / (c["seconds"] * peak)

  for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "per_chip_bytes"):
    print(f"{k:>24s}: {mem[k] / GIB:9.3f} GiB")
  print(f"{'hbm_bytes':>24s}: {hbm / GIB:9.3f} GiB ({report['device_kind']}, {len(devices)} chips)")
  for k in ("params", "analytic_flops_per_chip", "compiler_flops_per_chip", "estimated_step_s", "estimated_mfu",
            "estimated_mfu_without_attention"):
    if k in report:
      print(f"{k:>24s}: {report[k]:.4g}")
  if not report["fits"]:
    print(f"aot_compile: does not fit on {name}: {mem['per_chip_bytes'] / GIB:.1f} GiB per chip > "
          f"{hbm / GIB:.1f} GiB HBM", file=sys.stderr)
  print(json.dumps(report))
  if not report["fits"]:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
