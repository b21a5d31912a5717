"""C++ CPU kernel of the dynamic-decay neuron: gates, scan, spikes and backward each in one pass over time.

Forward, per batch row and block of channels, one step t at a time (vectorised over the channels):
    z_t = b + Σ_j w_j ⊙ [window; X]_{t+j},   a_t = σ(z_t),   H_t = a_t·H_{t−1} + (1 − a_t)·X_t,
    S_t = Θ(H_t − θ)                           (binary spikes)
Backward, t from T−1 down, with g_t = dH_t + dS_t·σ'(H_t − θ) + a_{t+1}·g_{t+1} (σ' the ATan surrogate):
    dz_t = g_t·(H_{t−1} − X_t)·a_t(1 − a_t),   dX_t = (1 − a_t)·g_t + Σ_j w_j dz_{t+k−1−j},
    dw_j += dz_t·[window; X]_{t+j},   db += dz_t,   dθ −= dS_t·σ'(H_t − θ),   dh0 = a_0·g_0,
    dwindow_e = Σ_{j≤e} w_j dz_{e−j}
(the adjoint `nord.neurons.dynamic._DynamicDecay` and the spike's surrogate compute in eager ops). The
eager path makes ~15 passes over memory forward and ~30 backward; these loops read each input once
(bench/neurons.py).

The kernel is compiled with `torch.utils.cpp_extension.load_inline` (g++ and ninja) once per machine
into ~/.cache/nord/kernels/<hash of source, flags, torch, python>.so and imported by every later process.
`NORD_NEURON_KERNEL` chooses: auto (default: the kernel where built; the first use starts the build in a
background thread and runs eager meanwhile), cpp (build now if needed; an error if it cannot be built),
eager (never compile). Without a compiler, or if the build fails, one warning is logged and the eager
path runs, numerically the same to float32 rounding.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

KERNEL_ENV = "NORD_NEURON_KERNEL"
KERNEL_MODES = ("auto", "cpp", "eager")

_SOURCE = r"""
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kBlock = 256;  // channels per work item: 1 KiB rows of float32

// exp for float: 2^n · p(r), r = x − n·ln2 ∈ [−ln2/2, ln2/2], p the degree-7 Taylor polynomial (error
// < 1e−7 relative); plain arithmetic so that the compiler vectorises it over the channels.
inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = static_cast<float>(static_cast<int32_t>(x * 1.44269504f + (x >= 0.0f ? 0.5f : -0.5f)));
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float sigmoid(float z) { return 1.0f / (1.0f + exp_approx(-z)); }
inline double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

// Row e of [window; X] for one batch row: the window's k−1 rows come first.
template <typename T>
inline const T* ext_row(const T* window, const T* x, int64_t e, int64_t k, int64_t D) {
  return e < k - 1 ? window + e * D : x + (e - (k - 1)) * D;
}

// a = σ(z), H_t = a·H_{t−1} + (1 − a)·X_t, S_t = Θ(H_t − θ). g++ vectorises a loop like this one only with
// every pointer a __restrict parameter, hence the helpers.
template <typename T>
inline void gate_step(const T* __restrict z, const T* __restrict hp, const T* __restrict xt,
                      const T* __restrict theta, T* __restrict at, T* __restrict ht, T* __restrict st,
                      int64_t n) {
  for (int64_t d = 0; d < n; ++d) {
    const T s = sigmoid(z[d]);
    const T h = s * hp[d] + (T(1) - s) * xt[d];
    at[d] = s;
    ht[d] = h;
    st[d] = h - theta[d] >= T(0) ? T(1) : T(0);
  }
}

template <typename T>
void forward_block(const T* x, const T* window, const T* taps, const T* bias, const T* h0, const T* theta,
                   T* a, T* h, T* spikes, int64_t steps, int64_t D, int64_t k, int64_t n, T* __restrict z) {
  const T* prev = h0;
  for (int64_t t = 0; t < steps; ++t) {
    for (int64_t d = 0; d < n; ++d) z[d] = bias[d];
    for (int64_t j = 0; j < k; ++j) {
      const T* __restrict src = ext_row(window, x, t + j, k, D);
      const T* __restrict w = taps + j * D;
      for (int64_t d = 0; d < n; ++d) z[d] += w[d] * src[d];
    }
    gate_step(z, prev, x + t * D, theta, a + t * D, h + t * D, spikes + t * D, n);
    prev = h + t * D;
  }
}

// dz = g·(H_{t−1} − X_t)·a(1 − a), dX_t = (1 − a)·g (its direct part), db += dz
template <typename T>
inline void gate_grads(const T* __restrict at, const T* __restrict hp, const T* __restrict xt,
                       const T* __restrict g, T* __restrict dz, T* __restrict dxt, T* __restrict db,
                       int64_t n) {
  for (int64_t d = 0; d < n; ++d) {
    const T keep = T(1) - at[d];
    dz[d] = g[d] * (hp[d] - xt[d]) * at[d] * keep;
    dxt[d] = keep * g[d];
    db[d] += dz[d];
  }
}

// g += dH + dS·σ'(H − θ) with the ATan surrogate σ'(v) = (α/2) / (1 + (π/2·α·v)²), dθ −= dS·σ'(H − θ)
template <typename T>
inline void spike_grads(const T* __restrict dht, const T* __restrict dst, const T* __restrict ht,
                        const T* __restrict theta, T* __restrict g, T* __restrict dtheta, T half_alpha,
                        T slope, int64_t n) {
  for (int64_t d = 0; d < n; ++d) {
    const T u = slope * (ht[d] - theta[d]);
    const T through_spike = dst[d] * half_alpha / (T(1) + u * u);
    g[d] += dht[d] + through_spike;
    dtheta[d] -= through_spike;
  }
}

// dtaps (k rows of stride D) and dbias accumulate; ring holds dz of the steps t..t+k−1 (row s % k).
template <typename T>
void backward_block(const T* dh, const T* ds, const T* x, const T* window, const T* taps, const T* a,
                    const T* h, const T* h0, const T* theta, T alpha, T* dx, T* dwindow, T* dtaps, T* dbias,
                    T* dtheta, T* dh0, int64_t steps, int64_t D, int64_t k, int64_t n, T* __restrict g,
                    T* ring) {
  const T half_alpha = alpha / 2, slope = T(M_PI / 2) * alpha;
  for (int64_t t = steps - 1; t >= 0; --t) {
    const T* __restrict at = a + t * D;
    const T* __restrict dht = dh + t * D;
    const T* __restrict xt = x + t * D;
    const T* __restrict hp = t > 0 ? h + (t - 1) * D : h0;
    T* __restrict dxt = dx + t * D;
    T* __restrict dz = ring + (t % k) * n;
    if (t + 1 < steps) {
      const T* __restrict an = a + (t + 1) * D;
      for (int64_t d = 0; d < n; ++d) g[d] = an[d] * g[d];
    } else {
      for (int64_t d = 0; d < n; ++d) g[d] = T(0);
    }
    spike_grads(dht, ds + t * D, h + t * D, theta, g, dtheta, half_alpha, slope, n);
    gate_grads(at, hp, xt, g, dz, dxt, dbias, n);
    for (int64_t j = 0; j < k; ++j) {
      const T* __restrict w = taps + j * D;
      const int64_t later = t + k - 1 - j;  // the step whose z tap j reads X_t into
      if (later < steps) {
        const T* __restrict dz_later = ring + (later % k) * n;
        for (int64_t d = 0; d < n; ++d) dxt[d] += w[d] * dz_later[d];
      }
      const T* __restrict src = ext_row(window, x, t + j, k, D);
      T* __restrict dw = dtaps + j * D;
      for (int64_t d = 0; d < n; ++d) dw[d] += dz[d] * src[d];
    }
  }
  for (int64_t d = 0; d < n; ++d) dh0[d] = a[d] * g[d];
  for (int64_t e = 0; e + 1 < k; ++e) {  // window row e fed z_{e−j} through tap j
    T* __restrict dwin = dwindow + e * D;
    for (int64_t j = 0; j <= e; ++j) {
      if (e - j >= steps) continue;
      const T* __restrict w = taps + j * D;
      const T* __restrict dz = ring + ((e - j) % k) * n;
      for (int64_t d = 0; d < n; ++d) dwin[d] += w[d] * dz[d];
    }
  }
}

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
}

}  // namespace

// x (B, T, D), window (B, k−1, D), taps (k, D), bias (D), h0 (B, D), threshold (D)
// -> [a, h, spikes], each (B, T, D)
std::vector<at::Tensor> neuron_forward(at::Tensor x, at::Tensor window, at::Tensor taps, at::Tensor bias,
                                       at::Tensor h0, at::Tensor threshold) {
  for (auto* t : {&x, &window, &taps, &bias, &h0, &threshold}) check(*t, "every input");
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2), k = taps.size(0);
  auto a = at::empty_like(x), h = at::empty_like(x), spikes = at::empty_like(x);
  const int64_t blocks = (D + kBlock - 1) / kBlock;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "neuron_forward", [&] {
    at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> z(kBlock);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / blocks, d0 = (item % blocks) * kBlock, n = std::min(kBlock, D - d0);
        const int64_t row = b * T * D + d0;
        auto p = [](at::Tensor& t, int64_t offset) { return t.data_ptr<scalar_t>() + offset; };
        forward_block<scalar_t>(p(x, row), p(window, b * (k - 1) * D + d0), p(taps, d0), p(bias, d0),
                                p(h0, b * D + d0), p(threshold, d0), p(a, row), p(h, row), p(spikes, row), T,
                                D, k, n, z.data());
      }
    });
  });
  return {a, h, spikes};
}

// dh, ds: the gradients of h and spikes -> [dx, dwindow, dtaps (k, D), dbias, dthreshold, dh0]
std::vector<at::Tensor> neuron_backward(at::Tensor dh, at::Tensor ds, at::Tensor x, at::Tensor window,
                                        at::Tensor taps, at::Tensor a, at::Tensor h, at::Tensor h0,
                                        at::Tensor threshold, double alpha) {
  for (auto* t : {&dh, &ds, &x, &window, &taps, &a, &h, &h0, &threshold}) check(*t, "every input");
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2), k = taps.size(0);
  auto dx = at::empty_like(x), dwindow = at::zeros_like(window), dh0 = at::empty_like(h0);
  auto dtaps = at::zeros({B, k, D}, x.options()), dbias = at::zeros({B, D}, x.options());  // per row, summed
  auto dtheta = at::zeros({B, D}, x.options());
  const int64_t blocks = (D + kBlock - 1) / kBlock;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "neuron_backward", [&] {
    at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> g(kBlock), ring(k * kBlock);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / blocks, d0 = (item % blocks) * kBlock, n = std::min(kBlock, D - d0);
        const int64_t row = b * T * D + d0, win = b * (k - 1) * D + d0;
        std::fill(ring.begin(), ring.end(), scalar_t(0));
        auto p = [](at::Tensor& t, int64_t offset) { return t.data_ptr<scalar_t>() + offset; };
        backward_block<scalar_t>(p(dh, row), p(ds, row), p(x, row), p(window, win), p(taps, d0), p(a, row),
                                 p(h, row), p(h0, b * D + d0), p(threshold, d0), scalar_t(alpha), p(dx, row),
                                 p(dwindow, win), p(dtaps, b * k * D + d0), p(dbias, b * D + d0),
                                 p(dtheta, b * D + d0), p(dh0, b * D + d0), T, D, k, n, g.data(),
                                 ring.data());
      }
    });
  });
  return {dx, dwindow, dtaps.sum(0), dbias.sum(0), dtheta.sum(0), dh0};
}
"""
_FUNCTIONS = ["neuron_forward", "neuron_backward"]

_lock = threading.Lock()
_loaded: dict[str, ModuleType | None] = {}  # build name -> module, or None where the build failed
_failures: dict[str, str] = {}  # build name -> why
_building: set[str] = set()  # build names compiling in a background thread
_build_lock = threading.Lock()


def kernel_mode() -> str:
    """`NORD_NEURON_KERNEL`, read at each call (no env reads at import): auto, cpp or eager."""
    mode = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
    if mode not in KERNEL_MODES:
        raise ValueError(f"{KERNEL_ENV} must be one of {', '.join(KERNEL_MODES)}; got {mode!r}")
    return mode


def _compile_flags() -> list[str]:
    """-O3, OpenMP, and the vector ISA torch itself dispatches to on this CPU (never -march=native: a
    cache directory shared between machines must not hold code another CPU cannot run)."""
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]  # as torch: lets g++ vectorise σ
    if platform.machine() in ("x86_64", "AMD64"):
        capability = torch.backends.cpu.get_cpu_capability()
        if capability in ("AVX2", "AVX512"):
            flags += ["-mavx2", "-mfma"]
        if capability == "AVX512":
            flags += ["-mavx512f", "-mavx512vl", "-mavx512dq", "-mprefer-vector-width=512"]
    return flags


def _build_name(flags: list[str]) -> str:
    key = "\n".join([_SOURCE, *flags, torch.__version__, sys.version.split()[0]])
    return "nord_neuron_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def cache_directory() -> Path:
    """Where built kernels live: $XDG_CACHE_HOME/nord/kernels (~/.cache/nord/kernels)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nord" / "kernels"


def kernel(required: bool = False) -> ModuleType | None:
    """The compiled kernel module, or None while it is unavailable.

    A kernel built before (by any process) is imported from the cache. Otherwise `required` builds it
    now (a minute or two) and raises `RuntimeError` with the compiler's message if that fails; without
    `required` the build runs in a background thread and this returns None (the eager path) until it is
    done, so no caller ever waits for the compiler. A failed build logs one warning and is not retried.
    """
    flags = _compile_flags()
    name = _build_name(flags)
    with _lock:
        if name not in _loaded and (module := _import_built(name)) is not None:
            _loaded[name] = module
        if name not in _loaded:
            if required:
                _loaded[name] = _build(name, flags)
            elif name not in _building:
                _building.add(name)
                log.info("compiling the neuron kernel in the background (once per machine)")
                threading.Thread(target=_build_in_background, args=(name, flags), daemon=True).start()
        module = _loaded.get(name)
    if module is None and required:
        raise RuntimeError(f"{KERNEL_ENV}=cpp but the neuron kernel could not be built: {_failures[name]}")
    return module


def _import_built(name: str) -> ModuleType | None:
    path = cache_directory() / f"{name}.so"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build_in_background(name: str, flags: list[str]) -> None:
    module = _build(name, flags)
    with _lock:
        _loaded.setdefault(name, module)
        _building.discard(name)


def _build(name: str, flags: list[str]) -> ModuleType | None:
    """Build under a machine-wide lock (flock: released by the kernel if the builder dies, so never stale)
    in a private temporary directory, then rename the library into the cache. Whoever waited for the lock
    finds the library built and imports it: one compile per machine."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        _failures[name] = "no C++ compiler (set CXX or install g++)"
        log.warning("neuron kernel unavailable (%s); using the eager path", _failures[name])
        return None
    cache_directory().mkdir(parents=True, exist_ok=True)
    with open(cache_directory() / f"{name}.lock", "a") as lock, _build_lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        return _import_built(name) or _compile(name, flags)


def _find_ninja() -> None:
    """torch runs `ninja` from PATH; the pip package's binary may not be on it (a venv or pyenv not
    activated, no shell rehash since the install), so point PATH at it when no other ninja is found."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


def _compile(name: str, flags: list[str]) -> ModuleType | None:
    from torch.utils.cpp_extension import load_inline

    _find_ninja()
    build = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=cache_directory()))
    try:
        load_inline(name, cpp_sources=_SOURCE, functions=_FUNCTIONS, extra_cflags=flags,
                    extra_ldflags=["-fopenmp"], build_directory=str(build))  # fmt: skip
        (library,) = build.glob("*.so")
        os.replace(library, cache_directory() / f"{name}.so")
        return _import_built(name)
    except Exception as e:  # a compiler error, a missing ninja: the eager path still works
        last_line = (str(e).strip().splitlines() or [""])[-1]
        _failures[name] = f"{type(e).__name__}: {last_line}"
        log.warning("neuron kernel unavailable (%s); using the eager path", _failures[name])
        return None
    finally:
        shutil.rmtree(build, ignore_errors=True)
