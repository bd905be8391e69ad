r"""DiT training step (forward + backward + AdamW): sora_jax's DiT vs diffusers `WanTransformer3DModel`.

  python3 -m venv /tmp/benchvenv && /tmp/benchvenv/bin/pip install -e '.[test,parity]' torch==2.13.0
  JAX_PLATFORMS=cpu PYTHONPATH=. .venv/bin/python tools/bench_dit.py --ref_python=/tmp/benchvenv/bin/python \
      [--breakdown]

  # a few seconds' smoke run
  JAX_PLATFORMS=cpu PYTHONPATH=. .venv/bin/python tools/bench_dit.py --ref_python=/tmp/benchvenv/bin/python \
      --layers=1 --width=64 --heads=2 --mlp=256 --text_dim=64 --latent=1x8x8 --text_tokens=8 --steps=2 \
      --rounds=1 --warmup=1 --peak_n=512

Both sides at one configuration (defaults: width 384, 6 heads of 64, 12 layers, MLP 1536, 16 latent channels,
patch 1x2x2, latent 5x32x32 = 1280 tokens per sample, batch 2, 64 text tokens of width 384, fp32), random
weights, one whole training step timed:
- ours: the real `train_dit.make_train_step` (flow-matching loss with logit-normal t and the resolution
  shift, `value_and_grad`, clip by global norm 1.0, AdamW) on a one-device mesh, built from
  `configs/tiny_t2v.py` by `make_config`. The text side is precomputed: the batch carries `text_states`
  [B, 64, text_dim] and `text_pooled`, so the step never calls the text encoder (the step's own path for
  frozen, precomputed encoders). The config's trainable encoder is the bare embedding (depth 0, byte vocab:
  258 x text_dim parameters, counted separately as `ours_text_params`); it gets zero gradients but is still
  in the AdamW update, 0.25% of the parameters. No EMA, no frame conditioning (mask strategy 'none').
- peer: diffusers' `WanTransformer3DModel` (Wan2.1's DiT), the same loss (x_t = (1 - t) x0 + t noise,
  MSE against noise - x0, timestep 1000 t), `clip_grad_norm_(1.0)`, `torch.optim.AdamW` (betas (0.9, 0.99)
  and weight decay 0.01, as ours).
Each side lives in its own worker process (ours in this interpreter, with mimalloc preloaded as `make demo`
runs it, `--ours_allocator`; the peer in `--ref_python`, a venv with torch and diffusers), both pinned to the
same `--threads` cores (sched_setaffinity: XLA sizes its pool from it; torch.set_num_threads). Workers build,
compile and warm up once, then the parent alternates them for `--rounds` rounds of `--steps` timed steps (the
order flips every round; `--round_warmup` untimed steps first, on both sides), so both see the same noise on a
shared machine; the idle worker blocks on a pipe. Each timed step also records the share of the machine's
pinned cores' time that other processes took meanwhile (/proc/stat busy time of those cores less the worker's
own CPU time). Reported step times are medians over the quiet steps (share under `--quiet`) when each side has
at least 3 of them, else over all steps (`step_times_from` says which); medians over all steps and minima are
reported too. Contention matters more than noise here: torch's OpenMP threads slow down several-fold when
another process takes a core, XLA's thread pool much less.

Throughput: the analytic training FLOPs of one step (`sora_jax/train/flops.py`, 3x forward, matmuls only,
the same count for both sides) over the step time, as a fraction of the machine's matmul peak: the best
GFLOP/s of a `--peak_n`-square fp32 matmul in jax and in torch, measured by each worker after every round.
`--breakdown` then times, in each worker, the loss forward, forward + backward, and self-attention alone
at the model's shapes (ours: the backend `--attention` resolves to, plain and with QK-norm and RoPE in the
attention call or in JAX before it; peer: torch SDPA); `--peer_adamw` picks
torch's AdamW implementation (default: what torch picks for CPU tensors, the for-loop one).
The last line is one JSON object: `step_time_ratio` (ours / peer), `fraction_of_matmul_peak` (ours),
`peer_fraction_of_matmul_peak`, both step times, parameter counts, threads, the peak and the host's CPU
(`host`: the ratio depends on it, experiments/scaling/README.md).
"""
import ast
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_env  # noqa: E402  (tools/, next to this script)

_MARK = "BENCH_DIT "  # prefix of the workers' result lines (libraries may print to stdout too)


def _define_flags():
  """Registers the command-line flags (only when run as a script, so tests can import this module)."""
  flags.DEFINE_integer("width", 384, "Model width (Wan: num_attention_heads * attention_head_dim).")
  flags.DEFINE_integer("heads", 6, "Attention heads.")
  flags.DEFINE_integer("layers", 12, "Transformer blocks.")
  flags.DEFINE_integer("mlp", 1536, "MLP hidden width (Wan: ffn_dim).")
  flags.DEFINE_integer("channels", 16, "Latent channels in and out.")
  flags.DEFINE_string("latent", "5x32x32", "Latent frames x height x width of one sample.")
  flags.DEFINE_string("patch", "1x2x2", "Patch (t x h x w).")
  flags.DEFINE_integer("batch", 2, "Samples per step.")
  flags.DEFINE_integer("text_tokens", 64, "Text tokens per sample.")
  flags.DEFINE_integer("text_dim", 384, "Width of the text states.")
  flags.DEFINE_string("attention", "auto", "config.attention of ours (auto: cpu_flash on CPU above 1024 tokens).")
  flags.DEFINE_integer("warmup", 1, "Untimed steps per worker after build (and, for ours, the compile).")
  flags.DEFINE_integer("round_warmup", 0, "Untimed steps at the start of every round, both sides (their times "
                       "are printed and kept apart): the first step after the other side's round can pay for "
                       "the other process having run on the same cores.")
  flags.DEFINE_integer("steps", 3, "Timed steps per worker per round.")
  flags.DEFINE_integer("rounds", 3, "Alternating rounds.")
  flags.DEFINE_integer("threads", 2, "Cores each worker is pinned to (0: all of this process's cores).")
  flags.DEFINE_float("quiet", 0.1, "A step is quiet when other processes took less than this share of the "
                     "worker's cores during it; step times are medians over quiet steps when each side has 3.")
  flags.DEFINE_integer("peak_n", 2048, "Side of the square fp32 matmul that measures the peak.")
  flags.DEFINE_bool("trace", False, "With --breakdown: profile one step of ours (jax.profiler) and attribute "
                    "each XLA op's time to the sora_jax source line it came from, forward vs backward.")
  flags.DEFINE_multi_string("set", [], "KEY=VALUE override of ours' config (repeatable), e.g. "
                            "dit.scan_layers=False, for what-if runs; the FLOP count uses the same config.")
  flags.DEFINE_string("impls", "ours,peer", "Which sides to run.")
  flags.DEFINE_enum("ours_allocator", "auto", ["auto", "mimalloc", "system"],
                    "Allocator of ours' worker: mimalloc preloaded as `make demo` runs it (auto: when installed), "
                    "or the C library's malloc. The peer keeps this process's.")
  flags.DEFINE_multi_string("ours_env", [], "KEY=VALUE environment variable for ours' worker only (repeatable; "
                            "over --ours_allocator's); the peer keeps this process's environment.")
  flags.DEFINE_enum("peer_adamw", "default", ["default", "foreach", "fused"],
                    "torch AdamW implementation (default: what torch picks for CPU tensors).")
  flags.DEFINE_bool("breakdown", False, "After the rounds, time the step's parts in each worker: forward "
                    "(loss), forward + backward, and self-attention alone at the model's shapes.")
  flags.DEFINE_string("ref_python", "/tmp/benchvenv/bin/python", "Interpreter with torch + diffusers (peer).")
  flags.DEFINE_string("worker", "", "internal: ours|peer")


def _dims(s: str) -> tuple[int, ...]:
  return tuple(int(v) for v in s.split("x"))


# ---------------------------------------------------------------- the shared configuration (no torch, no jax)


def make_config(*, width=384, heads=6, layers=12, mlp=1536, channels=16, latent=(5, 32, 32), patch=(1, 2, 2),
                batch=2, text_tokens=64, text_dim=384, attention="auto", overrides=()):
  """configs/tiny_t2v.py resized to the benchmark's DiT; one sample per packed row, text precomputed.

  `overrides`: "a.b=value" strings applied last (values parsed as Python literals, else kept as strings).
  """
  from configs import tiny_t2v  # pylint: disable=g-import-not-at-top
  # The peer's layout: cross-attention to the text states, RoPE only.
  c = tiny_t2v.use_standard_schedule(tiny_t2v.use_cross_attention(tiny_t2v.get_config()))
  c.compilation_cache = ""
  c.attention = attention
  c.vae.latent_channels = channels
  # Text states come precomputed in the batch; the encoder that must exist is the bare byte embedding.
  c.text.update(encoder="trainable", tokenizer="bytes", depth=0, width=text_dim, num_heads=heads,
                max_len=text_tokens)
  # Wan's block layout: one modulation projection shared by all blocks plus a table per block, and the text
  # projected to the DiT's width once.
  c.dit.update(width=width, depth=layers, num_heads=heads, mlp_ratio=mlp / width, patch_size=tuple(patch),
               qk_norm=True, scan_layers=True, scan_unroll=layers, remat="none", dtype="float32",
               shared_modulation=True, text_proj=True)
  tokens = 1
  for s, p in zip(latent, patch):
    if s % p:
      raise ValueError(f"latent {latent} does not divide by patch {patch}")
    tokens *= s // p
  c.train_dit.update(batch_size=batch, seq_len=tokens, text_seq_len=text_tokens, max_segments=1,
                     ema_decay=0.0, grad_clip=1.0, weight_decay=0.01, warmup_steps=10, steps=1000)
  c.cond.mask_ratios = {"none": 1.0}
  for item in overrides:
    key, _, value = item.partition("=")
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass
    *parents, leaf = key.split(".")
    node = c
    for name in parents:
      node = node[name]
    if leaf not in node:
      raise KeyError(f"--set {item!r}: no config field {key!r}")
    node[leaf] = value
  return c


def step_flops(config) -> float:
  """Analytic training FLOPs of one step (all rows full): the numerator of both sides' GFLOP/s."""
  from sora_jax.train import flops as flops_lib  # pylint: disable=g-import-not-at-top
  return flops_lib.train_flops_per_step(config)


def make_batch(config, latent, seed=0) -> dict:
  """A packed batch of `batch_size` rows, one full sample each, with precomputed text states (numpy)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from sora_jax.data import packing  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  B, Lt, Dt = config.train_dit.batch_size, config.train_dit.text_seq_len, config.text.width
  rows = {k: [] for k in ("tokens", "coords", "grid")}
  for _ in range(B):
    x = rng.standard_normal((*latent, config.vae.latent_channels)).astype(np.float32)
    tokens, coords, grid = packing.patchify(x, config.dit.patch_size)
    rows["tokens"].append(tokens)
    rows["coords"].append(coords)
    rows["grid"].append(grid[None])
  L = config.train_dit.seq_len
  states = rng.standard_normal((B, Lt, Dt)).astype(np.float32)
  return {
      "tokens": np.stack(rows["tokens"]), "coords": np.stack(rows["coords"]),
      "tokens_segment_ids": np.ones((B, L), np.int32), "grid": np.stack(rows["grid"]),
      "text_segment_ids": np.ones((B, Lt), np.int32),
      "text_positions": np.broadcast_to(np.arange(Lt, dtype=np.int32), (B, Lt)).copy(),
      "text_states": states, "text_pooled": states.mean(axis=1, keepdims=True),
  }


# ---------------------------------------------------------------- workers


def _pin(threads: int) -> int:
  """Pins this process to `threads` cores (before jax / torch start their pools); returns the count."""
  cores = sorted(os.sched_getaffinity(0))
  if threads and threads < len(cores):
    cores = cores[:threads]
    os.sched_setaffinity(0, cores)
  for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = str(len(cores))
  return len(cores)


def _machine_busy_s() -> float:
  """Seconds of CPU time this process's cores (its affinity set) have spent busy, from /proc/stat."""
  cores = {f"cpu{c}" for c in os.sched_getaffinity(0)}
  busy = 0
  with open("/proc/stat") as f:
    for line in f:
      fields = line.split()
      if fields and fields[0] in cores:
        user, nice, system, _, _, irq, softirq, steal = (int(v) for v in fields[1:9])
        busy += user + nice + system + irq + softirq + steal
  return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
  t = os.times()
  return t.user + t.system


def _best_gflops(fn, flop: float, repeats: int = 5) -> float:
  fn()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return flop / best / 1e9


class Ours:
  """sora_jax's real DiT train step on a one-device mesh."""

  def __init__(self, config, latent, peak_n):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from sora_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
    from sora_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
    from sora_jax.train import train_dit  # pylint: disable=g-import-not-at-top
    self._jax, self._mesh_lib = jax, mesh_lib
    self.mesh = mesh_lib.make_mesh([(a, -1 if a == "data" else 1) for a in mesh_lib.AXES],
                                   devices=jax.devices()[:1])
    created, tx = train_dit.create(config, self.mesh)
    self.config, self.graphdef, self.state = config, created.graphdef, created.state
    self.params = state_lib.num_params(self.state.params)
    self.text_params = state_lib.num_params(self.state.params["text"])
    with mesh_lib.use(self.mesh, mesh_lib.DIT_RULES):
      self.batch = mesh_lib.global_batch(make_batch(config, latent), self.mesh)
      self.train_step = train_dit.make_train_step(config, created.graphdef, tx, created.shardings)
    a = jnp.asarray(jax.random.normal(jax.random.key(0), (peak_n, peak_n)))
    b = jnp.asarray(jax.random.normal(jax.random.key(1), (peak_n, peak_n)))
    mm = jax.jit(jnp.matmul)
    self._peak = lambda: _best_gflops(lambda: mm(a, b).block_until_ready(), 2.0 * peak_n ** 3)

  def step(self) -> float:
    with self._mesh_lib.use(self.mesh, self._mesh_lib.DIT_RULES):
      t0 = time.perf_counter()
      self.state, metrics = self.train_step(self.state, self.batch)
      self._jax.block_until_ready((self.state, metrics))
      self.loss = float(metrics["loss"])
      return time.perf_counter() - t0

  def peak_gflops(self) -> float:
    return self._peak()

  def parts(self, reps: int) -> dict:
    """Median ms of the loss forward, forward + backward, and self-attention alone (fwd, fwd + bwd; with
    QK-norm, also fwd + bwd with the norm and RoPE in the attention call and in JAX)."""
    jax = self._jax
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from sora_jax.models import attention as attention_lib  # pylint: disable=g-import-not-at-top
    from sora_jax.models import rope as rope_lib  # pylint: disable=g-import-not-at-top
    from sora_jax.train import train_dit  # pylint: disable=g-import-not-at-top
    rng = jax.random.key(0)
    rest, batch = self.state.rest, self.batch

    def loss(params, batch):
      return train_dit.denoiser_loss(nnx.merge(self.graphdef, params, rest), batch, rng, self.config)

    c = self.config
    B, L, H = c.train_dit.batch_size, c.train_dit.seq_len, c.dit.num_heads
    q, k, v = (jax.random.normal(jax.random.key(i), (B, L, H, c.dit.width // H)) for i in range(3))
    seg = jnp.ones((B, L), jnp.int32)
    backend = attention_lib.resolve_backend(c.attention, L, L, c.dit.width // H)
    attn = lambda q, k, v: attention_lib.attention(q, k, v, seg, seg, backend=backend)  # noqa: E731
    fns = {"forward": (jax.jit(loss), (self.state.params, batch)),
           "forward_backward": (jax.jit(jax.value_and_grad(loss)), (self.state.params, batch)),
           f"attention_{backend}_forward": (jax.jit(attn), (q, k, v)),
           f"attention_{backend}_forward_backward": (
               jax.jit(jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v)), argnums=(0, 1, 2))), (q, k, v))}
    if c.dit.qk_norm:
      # Self-attention as the DiT calls it, QK-norm and RoPE first: passed to the attention call (cpu_flash
      # runs them inside its kernel), and applied in JAX before a plain call. Fwd + bwd, scales included.
      D = c.dit.width // H
      coords = jax.random.randint(jax.random.key(3), (B, L, 3), 0, 32)
      tables = rope_lib.rope_3d(coords, D)
      scales = (jnp.ones((D,)), jnp.ones((D,)))

      def with_prologue(in_attention):
        def f(q, k, v, qs, ks):
          p = attention_lib.QKNormRope(qs, ks, 1e-6, tables, tables)
          if in_attention:
            return jnp.sum(attention_lib.attention(q, k, v, seg, seg, backend=backend, qk_norm_rope=p))
          return jnp.sum(attn(*p.apply(q, k), v))
        return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4))), (q, k, v, *scales)

      fns[f"attention_{backend}_qk_norm_rope_in_call_forward_backward"] = with_prologue(True)
      fns[f"attention_{backend}_qk_norm_rope_in_jax_forward_backward"] = with_prologue(False)
    out = {}
    with self._mesh_lib.use(self.mesh, self._mesh_lib.DIT_RULES):
      for name, (fn, args) in fns.items():
        jax.block_until_ready(fn(*args))
        times = []
        for _ in range(reps):
          t0 = time.perf_counter()
          jax.block_until_ready(fn(*args))
          times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times) * 1e3
    return out


  def profile(self, top: int = 25) -> dict:
    """One traced step: XLA op time by the sora_jax function (file:line) that emitted the op, fwd / bwd.

    Ops are matched to the compiled HLO's stack frames; control flow (while, call, conditional) only
    contains other ops and is not counted. Op durations overlap when XLA runs independent ops on both
    threads, so the shares are of the summed op time (`op_ms`), next to the step's wall time.
    """
    jax = self._jax
    with self._mesh_lib.use(self.mesh, self._mesh_lib.DIT_RULES):
      hlo = self.train_step.lower(self.state, self.batch).compile().as_text()
    sources = hlo_op_sources(hlo)
    trace_dir = tempfile.mkdtemp(prefix="bench_dit_trace_")
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    wall = self.step()
    jax.profiler.stop_trace()
    import glob  # pylint: disable=g-import-not-at-top
    import gzip  # pylint: disable=g-import-not-at-top
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
      events = json.load(f)["traceEvents"]
    matmuls = hlo_matmuls(hlo)
    by_where, by_kind, total = {}, {"forward": 0.0, "backward": 0.0, "optimizer": 0.0, "other": 0.0}, 0.0
    by_matmul, spans = {}, []
    for e in events:
      op = (e.get("args") or {}).get("hlo_op")
      if e.get("ph") != "X" or not op or e["name"].startswith("end:") or op.split(".")[0] in _CONTAINERS:
        continue
      where, kind = sources.get(op, ("?", "other"))
      ms = e["dur"] / 1e3
      total += ms
      by_kind[kind] += ms
      key = f"{kind} {where}"
      by_where[key] = by_where.get(key, 0.0) + ms
      spans.append((e["ts"], e["ts"] + e["dur"]))
      if op in matmuls:
        # A plain dot runs on Eigen's thread pool and its event can end before its work does (GFLOP/s above
        # the machine's peak), so its row is marked; YNNPACK fusions' events cover their work.
        plain = " (plain dot: event ends before its work)" if op.startswith("dot") else ""
        row = by_matmul.setdefault(f"{kind} {matmuls[op][0]}{plain}", [0, 0.0, 0.0])
        row[0], row[1], row[2] = row[0] + 1, row[1] + ms, row[2] + matmuls[op][1]
    busy, end = 0.0, float("-inf")  # time covered by at least one op (the union of their spans)
    for a, b in sorted(spans):
      busy += max(0.0, b - max(a, end))
      end = max(end, b)
    ranked = sorted(by_where.items(), key=lambda kv: -kv[1])
    # Matmuls by shape: XLA:CPU runs independent ops at once, so a shape's GFLOP/s here can fall below what
    # the same matmul reaches alone (experiments/scaling/README.md).
    matmul_rows = {k: {"ops": n, "ms": round(ms, 1), "gflops": round(f / max(ms, 1e-6) / 1e6, 1)}
                   for k, (n, ms, f) in sorted(by_matmul.items(), key=lambda kv: -kv[1][1])[:top]}
    return {"wall_ms": wall * 1e3, "op_ms": total, "ops_busy_ms": busy / 1e3,
            "overlapped_op_ms": total - busy / 1e3, "by_kind_ms": by_kind, "top_ms": dict(ranked[:top]),
            "matmuls": matmul_rows, "matmul_ms": sum(ms for _, ms, _ in by_matmul.values()),
            "matmul_gflop": sum(f for _, _, f in by_matmul.values()) / 1e9, "trace": path}


_CONTAINERS = ("while", "call", "conditional", "tuple", "get-tuple-element", "parameter", "constant")


def hlo_op_sources(hlo_text: str) -> dict:
  """HLO instruction name -> (innermost sora_jax 'file.py:function:line' or 'optax' / '?', kind).

  kind: 'optimizer' for optax frames, 'backward' for ops under a transpose (the VJP), else 'forward'. Uses
  the FileNames / FunctionNames / FileLocations / StackFrames tables that `as_text()` prints.
  """
  import re  # pylint: disable=g-import-not-at-top
  tables, section = {}, None
  for line in hlo_text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      section = tables.setdefault(line, {})
      continue
    m = re.match(r"^(\d+) (.*)$", line) if section is not None else None
    if m:
      section[int(m.group(1))] = m.group(2)
    else:
      section = None
  files = {k: v.strip('"') for k, v in tables.get("FileNames", {}).items()}
  funcs = {k: v.strip('"') for k, v in tables.get("FunctionNames", {}).items()}
  locs = {}
  for k, v in tables.get("FileLocations", {}).items():
    f = dict(re.findall(r"(\w+)=(\d+)", v))
    locs[k] = (files.get(int(f["file_name_id"]), "?"), funcs.get(int(f["function_name_id"]), "?"), int(f["line"]))
  frames = {}
  for k, v in tables.get("StackFrames", {}).items():
    f = dict(re.findall(r"(\w+)=(\d+)", v))
    frames[k] = (int(f["file_location_id"]), int(f.get("parent_frame_id", 0)))

  def where(frame_id):
    seen, optax = set(), False
    while frame_id and frame_id not in seen:
      seen.add(frame_id)
      loc_id, parent = frames.get(frame_id, (0, 0))
      path, func, line = locs.get(loc_id, ("?", "?", 0))
      if "/sora_jax/" in path and "/train/" not in path:
        return f"{os.path.basename(path)}:{func}:{line}", False
      optax = optax or "/optax/" in path
      frame_id = parent
    return ("optax" if optax else "?"), optax

  out = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{([^}]*)\}", hlo_text, re.M):
    name, meta = m.group(1), m.group(2)
    op_name = re.search(r'op_name="([^"]*)"', meta)
    frame = re.search(r"stack_frame_id=(\d+)", meta)
    loc, is_opt = where(int(frame.group(1))) if frame else ("?", False)
    kind = "optimizer" if is_opt else ("backward" if op_name and "transpose(" in op_name.group(1) else "forward")
    out[name] = (loc, kind)
  return out


def hlo_matmuls(hlo_text: str) -> dict:
  """HLO instruction name -> (signature 'MxK @ KxN', FLOPs) for every op that is or wraps matmuls.

  A dot's FLOPs are 2 x (output elements) x (contracted size); a fusion (e.g. XLA:CPU's YNNPACK fusions)
  counts the dots of the computation it calls. Operand shapes come from their definitions in the same
  computation.
  """
  import re  # pylint: disable=g-import-not-at-top
  comps, cur = {}, None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if head:
      cur = comps.setdefault(head.group(1), {})
    elif cur is not None:
      m = re.match(r"^\s*(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]\S* (.*)$", line)
      if m:
        cur[m.group(1)] = ([int(d) for d in m.group(2).split(",") if d], m.group(3))

  def dots(comp):
    found = {}
    for name, (shape, rest) in comp.items():
      d = re.match(r"dot\(%([\w.\-]+), %([\w.\-]+)\)", rest)
      if not d or d.group(1) not in comp or d.group(2) not in comp:
        continue
      lhs, rhs = comp[d.group(1)][0], comp[d.group(2)][0]
      contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
      k = math.prod(lhs[int(i)] for i in contract.group(1).split(",") if i) if contract else 1
      found[name] = (f"{'x'.join(map(str, lhs))} @ {'x'.join(map(str, rhs))}", 2.0 * math.prod(shape) * k)
    return found

  out = {}
  for comp in comps.values():
    out.update(dots(comp))
    for name, (_, rest) in comp.items():
      callee = re.search(r"calls=%([\w.\-]+)", rest) if rest.startswith("fusion(") else None
      inner = dots(comps.get(callee.group(1), {})) if callee else {}
      if inner:
        out[name] = (" + ".join(sig for sig, _ in inner.values()), sum(f for _, f in inner.values()))
  return out


class Peer:
  """diffusers' WanTransformer3DModel, the same loss and update in torch."""

  def __init__(self, args, threads, peak_n):
    import torch  # pylint: disable=g-import-not-at-top
    from diffusers import WanTransformer3DModel  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    self._torch = torch
    self.model = WanTransformer3DModel(
        patch_size=_dims(args["patch"]), num_attention_heads=args["heads"],
        attention_head_dim=args["width"] // args["heads"], in_channels=args["channels"],
        out_channels=args["channels"], text_dim=args["text_dim"], freq_dim=256, ffn_dim=args["mlp"],
        num_layers=args["layers"], cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
        image_dim=None, added_kv_proj_dim=None).train()
    self.params = sum(p.numel() for p in self.model.parameters())
    impl = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[args.get("peer_adamw", "default")]
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.01, **impl)
    self.args = args
    B = args["batch"]
    self.x0 = torch.randn(B, args["channels"], *_dims(args["latent"]))
    self.text = torch.randn(B, args["text_tokens"], args["text_dim"])
    a, b = torch.randn(peak_n, peak_n), torch.randn(peak_n, peak_n)
    self._peak = lambda: _best_gflops(lambda: torch.mm(a, b), 2.0 * peak_n ** 3)

  def _loss(self):
    torch = self._torch
    t = torch.sigmoid(torch.randn(self.x0.shape[0]))  # logit-normal, as ours
    noise = torch.randn_like(self.x0)
    tt = t.view(-1, 1, 1, 1, 1)
    x_t = (1 - tt) * self.x0 + tt * noise
    pred = self.model(hidden_states=x_t, timestep=t * 1000, encoder_hidden_states=self.text,
                      return_dict=False)[0]
    return torch.nn.functional.mse_loss(pred, noise - self.x0)

  def step(self) -> float:
    torch = self._torch
    t0 = time.perf_counter()
    self.opt.zero_grad(set_to_none=True)
    loss = self._loss()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
    self.opt.step()
    self.loss = float(loss.detach())
    return time.perf_counter() - t0

  def peak_gflops(self) -> float:
    return self._peak()

  def parts(self, reps: int) -> dict:
    """Median ms of the loss forward (autograd on), forward + backward, and self-attention alone (SDPA)."""
    torch = self._torch
    a = self.args
    B, H = a["batch"], a["heads"]
    L = 1
    for s, p in zip(_dims(a["latent"]), _dims(a["patch"])):
      L *= s // p
    q, k, v = (torch.randn(B, H, L, a["width"] // H, requires_grad=True) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def fwd_bwd():
      self.model.zero_grad(set_to_none=True)
      self._loss().backward()

    def attn_fwd_bwd():
      sdpa(q, k, v).sum().backward()
      q.grad = k.grad = v.grad = None

    def attn_fwd():
      with torch.no_grad():
        sdpa(q, k, v)

    fns = {"forward": lambda: self._loss(), "forward_backward": fwd_bwd, "attention_sdpa_forward": attn_fwd,
           "attention_sdpa_forward_backward": attn_fwd_bwd}
    out = {}
    for name, fn in fns.items():
      fn()
      times = []
      for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
      out[name] = statistics.median(times) * 1e3
    return out


def _emit(obj: dict) -> None:
  print(_MARK + json.dumps(obj), flush=True)


def _config(args: dict):
  return make_config(**{k: args[k] for k in ("width", "heads", "layers", "mlp", "channels", "batch",
                                             "text_tokens", "text_dim", "attention")},
                     latent=_dims(args["latent"]), patch=_dims(args["patch"]), overrides=args["set"])


def run_worker(impl: str, args: dict) -> None:
  """Builds, warms up, then serves 'run' (timed steps + matmul peak) until 'quit' on stdin."""
  threads = _pin(args["threads"])
  t0 = time.perf_counter()
  latent = _dims(args["latent"])
  if impl == "ours":
    config = _config(args)
    bench = Ours(config, latent, args["peak_n"])
  else:
    bench = Peer(args, threads, args["peak_n"])
  build_s = time.perf_counter() - t0
  first_s = bench.step()  # ours: compile + one step
  for _ in range(args["warmup"] - 1):
    bench.step()
  _emit({"ready": True, "threads": threads, "params": bench.params,
         "text_params": getattr(bench, "text_params", 0), "build_s": build_s, "first_step_s": first_s,
         "loss": bench.loss})
  for line in sys.stdin:
    if line.strip() == "quit":
      return
    if line.strip() == "breakdown":
      _emit({"parts_ms": bench.parts(max(args["steps"], 1))})
      continue
    if line.strip() == "profile":
      _emit({"profile": bench.profile()})
      continue
    warm, warm_sys, warm_faults = [], [], []
    for _ in range(args["round_warmup"]):
      use0 = resource.getrusage(resource.RUSAGE_SELF)
      warm.append(bench.step())
      use1 = resource.getrusage(resource.RUSAGE_SELF)
      warm_sys.append(use1.ru_stime - use0.ru_stime)
      warm_faults.append(use1.ru_minflt - use0.ru_minflt)
    times, others, faults, sys_s = [], [], [], []
    for _ in range(args["steps"]):
      busy0, own0 = _machine_busy_s(), _own_cpu_s()
      use0 = resource.getrusage(resource.RUSAGE_SELF)
      times.append(bench.step())
      use1 = resource.getrusage(resource.RUSAGE_SELF)
      faults.append(use1.ru_minflt - use0.ru_minflt)
      sys_s.append(use1.ru_stime - use0.ru_stime)
      # CPU time other processes took on this worker's cores during the step, as a share of those cores'
      # time: 0 = the step had its cores to itself.
      others.append(max(0.0, (_machine_busy_s() - busy0) - (_own_cpu_s() - own0))
                    / (times[-1] * len(os.sched_getaffinity(0))))
    # Minor page faults: memory the step touched for the first time (fresh buffers from the OS).
    _emit({"step_s": times, "others": others, "page_faults": faults, "sys_s": sys_s, "warmup_step_s": warm,
           "warmup_sys_s": warm_sys, "warmup_page_faults": warm_faults,
           "peak_gflops": bench.peak_gflops(), "loss": bench.loss})


# ---------------------------------------------------------------- parent


class _Worker:

  def __init__(self, impl, python, argv, extra_env=None):
    self.impl = impl
    self.log = tempfile.NamedTemporaryFile("w+", prefix=f"bench_dit_{impl}_", suffix=".log", delete=False)
    env = dict(os.environ, JAX_PLATFORMS="cpu", **(extra_env or {}))
    self.proc = subprocess.Popen([python, os.path.abspath(__file__), f"--worker={impl}", *argv], env=env,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)

  def read(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith(_MARK):
        return json.loads(line[len(_MARK):])
    self.proc.wait()
    self.log.seek(0)
    tail = "".join(self.log.readlines()[-30:])
    raise RuntimeError(f"{self.impl} worker exited with {self.proc.returncode}; its log "
                       f"({self.log.name}) ends:\n{tail}")

  def send(self, cmd: str) -> None:
    self.proc.stdin.write(cmd + "\n")
    self.proc.stdin.flush()

  def close(self) -> None:
    if self.proc.poll() is None:
      self.send("quit")
      self.proc.wait(timeout=60)


def main(argv):
  del argv
  F = flags.FLAGS
  names = ("width", "heads", "layers", "mlp", "channels", "latent", "patch", "batch", "text_tokens",
           "text_dim", "attention", "warmup", "round_warmup", "steps", "rounds", "threads", "peak_n", "peer_adamw")
  args = {n: F[n].value for n in names}
  args["set"] = F.set
  if F.worker:
    run_worker(F.worker, args)
    return

  impls = [i for i in F.impls.split(",") if i and not (i == "peer" and not F.ref_python)]
  ours_env = {**bench_env.allocator_env(F.ours_allocator), **bench_env.parse_pairs(F.ours_env)}
  common = [f"--{n}={args[n]}" for n in names] + [f"--set={v}" for v in F.set]
  config = _config(args)
  flop = step_flops(config)
  load_start = os.getloadavg()[0]
  machine = bench_env.host()
  print(f"host: {machine['cpu_model']}, AVX-512 {'yes' if machine['avx512'] else 'no'}, "
        f"{machine['cores']} cores; ours' allocator: {ours_env.get('LD_PRELOAD') or 'the system malloc'}",
        flush=True)
  print(f"step: {flop / 1e9:.1f} GFLOP analytic (batch {args['batch']} x {config.train_dit.seq_len} video "
        f"+ {args['text_tokens']} text tokens, {args['layers']} layers of width {args['width']})", flush=True)

  workers, ready = {}, {}
  try:
    for impl in impls:  # one at a time, so neither build nor compile overlaps the other
      workers[impl] = _Worker(impl, sys.executable if impl == "ours" else F.ref_python, common,
                              ours_env if impl == "ours" else None)
      ready[impl] = workers[impl].read()
      print(f"{impl}: ready, {ready[impl]['params'] / 1e6:.2f}M params, {ready[impl]['threads']} threads, "
            f"build {ready[impl]['build_s']:.1f} s, first step {ready[impl]['first_step_s']:.1f} s", flush=True)
    times = {i: [] for i in impls}
    others = {i: [] for i in impls}
    faults = {i: [] for i in impls}
    warm = {i: [] for i in impls}
    peaks = {i: [] for i in impls}
    rounds = []
    for r in range(args["rounds"]):
      order = impls if r % 2 == 0 else impls[::-1]
      row = {}
      for impl in order:
        workers[impl].send("run")
        res = workers[impl].read()
        times[impl] += res["step_s"]
        others[impl] += res["others"]
        faults[impl] += res["page_faults"]
        peaks[impl].append(res["peak_gflops"])
        row[impl] = statistics.median(res["step_s"]) * 1e3
        warm[impl] += res["warmup_step_s"]
        print(f"round {r + 1}/{args['rounds']} {impl}: median {row[impl]:.0f} ms "
              f"(steps {', '.join(f'{t * 1e3:.0f}' for t in res['step_s'])}; others' CPU share "
              f"{', '.join(f'{o:.2f}' for o in res['others'])}; page faults "
              f"{', '.join(str(n) for n in res['page_faults'])}; system CPU s "
              f"{', '.join(f'{t:.2f}' for t in res['sys_s'])}), loss {res['loss']:.3f}, "
              f"matmul {res['peak_gflops']:.1f} GFLOP/s"
              + (f"; untimed first steps {', '.join(f'{t * 1e3:.0f}' for t in res['warmup_step_s'])} ms, "
                 f"system CPU {', '.join(f'{t:.2f}' for t in res['warmup_sys_s'])} s, "
                 f"page faults {', '.join(str(n) for n in res['warmup_page_faults'])}"
                 if res["warmup_step_s"] else ""), flush=True)
      rounds.append(row)
    breakdown = {}
    if F.breakdown:
      for impl in impls:
        workers[impl].send("breakdown")
        breakdown[impl] = workers[impl].read()["parts_ms"]
        print(f"breakdown {impl}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in breakdown[impl].items()),
              flush=True)
      if F.trace and "ours" in workers:
        workers["ours"].send("profile")
        prof = workers["ours"].read()["profile"]
        breakdown["ours_profile"] = prof
        print(f"profile ours: step {prof['wall_ms']:.0f} ms wall, {prof['op_ms']:.0f} ms of XLA ops: "
              + ", ".join(f"{k} {v:.0f}" for k, v in prof["by_kind_ms"].items()), flush=True)
        for k, v in prof["top_ms"].items():
          print(f"  {v:8.1f} ms {100 * v / prof['op_ms']:5.1f}%  {k}", flush=True)
        print(f"profile ours: ops overlap for {prof['overlapped_op_ms']:.0f} ms of op time; matmuls "
              f"{prof['matmul_ms']:.0f} ms for {prof['matmul_gflop']:.1f} GFLOP "
              f"({prof['matmul_gflop'] / max(prof['matmul_ms'], 1e-6) * 1e3:.0f} GFLOP/s), by shape:", flush=True)
        for k, v in prof["matmuls"].items():
          print(f"  {v['ms']:8.1f} ms {v['ops']:4d} ops {v['gflops']:6.1f} GFLOP/s  {k}", flush=True)
  finally:
    for w in workers.values():
      w.close()

  peak = max(max(p) for p in peaks.values())
  out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
         "load_average_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)], "host": machine,
         "threads": ready[impls[0]]["threads"], "step_gflop": flop / 1e9, "matmul_peak_gflops": peak,
         "matmul_peak_by_impl": {i: max(p) for i, p in peaks.items()}, "rounds": rounds,
         **({"breakdown_ms": breakdown} if breakdown else {}),
         "config": {**{k: args[k] for k in names if k not in ("warmup", "steps", "rounds")},
                    "tokens_per_sample": config.train_dit.seq_len, "set": F.set,
                    "xla_flags": os.environ.get("XLA_FLAGS", ""),
                    "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), **bench_env.sides(ours_env)}}
  quiet = {i: [t for t, o in zip(times[i], others[i]) if o < F.quiet] for i in impls}
  use_quiet = all(len(q) >= 3 for q in quiet.values())
  out["step_times_from"] = "quiet steps" if use_quiet else "all steps"
  for impl in impls:
    ms = statistics.median(quiet[impl] if use_quiet else times[impl]) * 1e3
    gflops = flop / 1e9 / (ms / 1e3)
    out[f"{impl}_step_ms"] = ms
    out[f"{impl}_step_ms_all_steps"] = statistics.median(times[impl]) * 1e3
    out[f"{impl}_step_ms_min"] = min(times[impl]) * 1e3
    out[f"{impl}_quiet_steps"] = len(quiet[impl])
    out[f"{impl}_steps_ms"] = [round(t * 1e3) for t in times[impl]]
    out[f"{impl}_others_cpu_share"] = [round(o, 3) for o in others[impl]]
    out[f"{impl}_page_faults_per_step"] = statistics.median(faults[impl])
    out[f"{impl}_round_warmup_steps_ms"] = [round(t * 1e3) for t in warm[impl]]
    out[f"{impl}_gflops"] = gflops
    out[f"{impl}_fraction_of_matmul_peak"] = gflops / peak
    out[f"{impl}_params"] = ready[impl]["params"]
    out[f"{impl}_timed_steps"] = len(times[impl])
  if "ours" in impls:
    out["ours_text_params"] = ready["ours"]["text_params"]
    out["ours_dit_params"] = ready["ours"]["params"] - ready["ours"]["text_params"]
    out["fraction_of_matmul_peak"] = out["ours_fraction_of_matmul_peak"]
  if len(impls) == 2:
    out["step_time_ratio"] = out["ours_step_ms"] / out["peer_step_ms"]
    out["step_time_ratio_all_steps"] = out["ours_step_ms_all_steps"] / out["peer_step_ms_all_steps"]
    out["step_time_ratio_min"] = out["ours_step_ms_min"] / out["peer_step_ms_min"]
    out["round_ratios"] = [r["ours"] / r["peer"] for r in rounds]
    print(f"ours {out['ours_step_ms']:.0f} ms vs peer {out['peer_step_ms']:.0f} ms ({out['step_times_from']}): ratio "
          f"{out['step_time_ratio']:.2f}; {100 * out['ours_fraction_of_matmul_peak']:.1f}% vs "
          f"{100 * out['peer_fraction_of_matmul_peak']:.1f}% of a {peak:.1f} GFLOP/s matmul peak", flush=True)
  print(json.dumps(out))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
