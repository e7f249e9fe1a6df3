// 2-D convolutions on CPU through oneDNN, as XLA FFI handlers (see resnet_jax/kernels.py).
//
// Layouts are JAX's: activations NHWC, kernels HWIO (for `groups` > 1, I is the per-group input
// width and O = groups * per-group outputs). Padding is symmetric, as in torch. Activations are
// handed to oneDNN as they are (its nhwc kernels); kernels go through a reorder into the layout
// the chosen implementation wants, which costs little beside the convolution itself.
//
// Primitive descriptors are slow to build (implementation search), so each shape's primitives
// are built once and kept in a map guarded by a mutex; executing a primitive is thread-safe.
//
// Threads: oneDNN runs single-threaded in each thread, and a call splits its batch into slices
// that the calling thread and one helper per further core take in turn (chunks.h). With
// oneDNN's own OpenMP team of 2 threads, a ResNet-50 training step on the shared 2-core machine
// ran at 0.71x XLA's: OpenMP threads spin beside XLA's thread pool and wait at every barrier
// for a partner the OS has descheduled; here a late helper only means the caller takes its slice.

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include <omp.h>

#include "chunks.h"
#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

enum class Pass { kForward, kInputGrad, kKernelGrad };

// Everything that fixes a primitive: pass, N, H, W, C (input), O, K, stride, padding, groups.
using Key = std::tuple<int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                       int64_t, int64_t>;

struct Geometry {
  int64_t n, h, w, c, o, k, stride, padding, groups;
  int64_t ho() const { return (h + 2 * padding - k) / stride + 1; }
  int64_t wo() const { return (w + 2 * padding - k) / stride + 1; }
};

// A primitive with its kernel reorder (from/to HWIO) when the kernel layout differs.
struct Plan {
  dnnl::primitive conv;
  memory::desc kernel_desc;  // the layout the convolution reads or writes its kernel in
  memory::desc scratchpad;   // per-execution workspace, ours so that threads can share `conv`
  std::unique_ptr<dnnl::reorder> kernel_reorder;  // HWIO -> kernel_desc, or back for gradients
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

memory::desc Activations(int64_t n, int64_t h, int64_t w, int64_t c) {
  return memory::desc({n, c, h, w}, memory::data_type::f32, tag::nhwc);
}

// The HWIO kernel as oneDNN's logical (O, I, KH, KW), or (G, O/G, I/G, KH, KW) when grouped.
memory::desc Hwio(const Geometry& g) {
  const int64_t per_group_in = g.c / g.groups;
  if (g.groups == 1) {
    return memory::desc({g.o, g.c, g.k, g.k}, memory::data_type::f32, tag::hwio);
  }
  return memory::desc({g.groups, g.o / g.groups, per_group_in, g.k, g.k},
                      memory::data_type::f32, tag::hwigo);
}

memory::desc AnyKernel(const Geometry& g) {
  const int64_t per_group_in = g.c / g.groups;
  memory::dims dims = g.groups == 1
                          ? memory::dims{g.o, g.c, g.k, g.k}
                          : memory::dims{g.groups, g.o / g.groups, per_group_in, g.k, g.k};
  return memory::desc(dims, memory::data_type::f32, tag::any);
}

// A primitive's scratchpad in the library's keeping is shared by all threads that execute it;
// in ours, each thread brings its own (Workspace below).
dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  const memory::dims strides{g.stride, g.stride}, pad{g.padding, g.padding};
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      Activations(g.n, g.h, g.w, g.c), AnyKernel(g), Activations(g.n, g.ho(), g.wo(), g.o),
      strides, pad, pad, UserScratchpad());
}

std::unique_ptr<dnnl::reorder> ReorderIfNeeded(const memory::desc& from, const memory::desc& to) {
  if (from == to) return nullptr;
  return std::make_unique<dnnl::reorder>(dnnl::reorder::primitive_desc(Engine(), from, Engine(), to));
}

Plan MakePlan(Pass pass, const Geometry& g) {
  const memory::dims strides{g.stride, g.stride}, pad{g.padding, g.padding};
  const memory::desc x = Activations(g.n, g.h, g.w, g.c);
  const memory::desc y = Activations(g.n, g.ho(), g.wo(), g.o);
  auto forward = ForwardDesc(g);
  Plan plan;
  if (pass == Pass::kForward) {
    plan.conv = dnnl::convolution_forward(forward);
    plan.kernel_desc = forward.weights_desc();
    plan.scratchpad = forward.scratchpad_desc();
    plan.kernel_reorder = ReorderIfNeeded(Hwio(g), plan.kernel_desc);
  } else if (pass == Pass::kInputGrad) {
    dnnl::convolution_backward_data::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, x, AnyKernel(g), y, strides, pad, pad,
        forward, UserScratchpad());
    plan.conv = dnnl::convolution_backward_data(pd);
    plan.kernel_desc = pd.weights_desc();
    plan.scratchpad = pd.scratchpad_desc();
    plan.kernel_reorder = ReorderIfNeeded(Hwio(g), plan.kernel_desc);
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, x, AnyKernel(g), y, strides, pad, pad,
        forward, UserScratchpad());
    plan.conv = dnnl::convolution_backward_weights(pd);
    plan.kernel_desc = pd.diff_weights_desc();
    plan.scratchpad = pd.scratchpad_desc();
    plan.kernel_reorder = ReorderIfNeeded(plan.kernel_desc, Hwio(g));
  }
  return plan;
}

const Plan& GetPlan(Pass pass, const Geometry& g) {
  static std::mutex mutex;
  static std::map<Key, Plan> plans;
  const Key key{static_cast<int>(pass), g.n, g.h, g.w, g.c, g.o, g.k, g.stride, g.padding,
                g.groups};
  std::lock_guard<std::mutex> lock(mutex);
  auto it = plans.find(key);
  if (it == plans.end()) it = plans.emplace(key, MakePlan(pass, g)).first;
  return it->second;  // std::map never moves its elements
}

// Per-thread buffers (a few per thread) for kernels in oneDNN's layout, grown and reused.
void* KernelScratch(int64_t index, size_t bytes) {
  thread_local std::vector<std::vector<char>> buffers;
  if (static_cast<int64_t>(buffers.size()) <= index) buffers.resize(index + 1);
  if (buffers[index].size() < bytes) buffers[index].resize(bytes);
  return buffers[index].data();
}

dnnl::stream& Stream() {
  thread_local dnnl::stream stream(Engine());
  return stream;
}

// Runs one pass on one batch slice. x: NHWC input (or its gradient), kernel: HWIO kernel, or for
// the kernel gradient a buffer in the plan's layout, y: NHWC output (or its gradient).
// oneDNN runs on `threads` OpenMP threads.
void RunSlice(Pass pass, const Geometry& g, float* x, void* kernel, float* y, int threads) {
  thread_local int current = 0;
  if (current != threads) omp_set_num_threads(current = threads);
  const Plan& plan = GetPlan(pass, g);
  dnnl::stream& stream = Stream();
  memory xs(Activations(g.n, g.h, g.w, g.c), Engine(), x);
  memory ys(Activations(g.n, g.ho(), g.wo(), g.o), Engine(), y);
  memory ks(plan.kernel_desc, Engine(), kernel);
  thread_local std::vector<char> workspace;
  if (workspace.size() < plan.scratchpad.get_size()) workspace.resize(plan.scratchpad.get_size());
  memory scratch(plan.scratchpad, Engine(), workspace.data());
  if (pass == Pass::kForward) {
    plan.conv.execute(stream, {{DNNL_ARG_SRC, xs}, {DNNL_ARG_WEIGHTS, ks}, {DNNL_ARG_DST, ys},
                               {DNNL_ARG_SCRATCHPAD, scratch}});
  } else if (pass == Pass::kInputGrad) {
    plan.conv.execute(stream, {{DNNL_ARG_DIFF_SRC, xs}, {DNNL_ARG_WEIGHTS, ks},
                               {DNNL_ARG_DIFF_DST, ys}, {DNNL_ARG_SCRATCHPAD, scratch}});
  } else {
    plan.conv.execute(stream, {{DNNL_ARG_SRC, xs}, {DNNL_ARG_DIFF_WEIGHTS, ks},
                               {DNNL_ARG_DIFF_DST, ys}, {DNNL_ARG_SCRATCHPAD, scratch}});
  }
  stream.wait();
}

// Runs one pass over the whole batch, in slices shared among threads (see the file comment).
ffi::Error Run(Pass pass, const Geometry& g, float* x, float* kernel, float* y) {
  try {
    // Equal slices (one plan, one kernel layout); a batch that does not split (batch 1,
    // odd batches) runs on oneDNN's own OpenMP team instead.
    int64_t slices = std::min<int64_t>(g.n, Workers());
    while (g.n % slices) --slices;
    const int threads = slices == 1 ? Workers() : 1;
    const int64_t per_slice = g.n / slices;
    Geometry part = g;
    part.n = per_slice;
    const int64_t x_step = per_slice * g.h * g.w * g.c;
    const int64_t y_step = per_slice * g.ho() * g.wo() * g.o;
        const Plan& plan = GetPlan(pass, part);
    const memory::desc hwio = Hwio(g);
    dnnl::stream& stream = Stream();
    if (pass != Pass::kKernelGrad) {
      void* ready = kernel;
      if (plan.kernel_reorder) {
        ready = KernelScratch(0, plan.kernel_desc.get_size());
        memory from(hwio, Engine(), kernel), to(plan.kernel_desc, Engine(), ready);
        plan.kernel_reorder->execute(stream, from, to);
        stream.wait();
      }
      ForEachChunk(slices, [&](int64_t i) {
        RunSlice(pass, part, x + i * x_step, ready, y + i * y_step, threads);
      });
      return ffi::Error::Success();
    }
    // Kernel gradient: each slice writes its own partial sum, then they are added up.
    const size_t bytes = plan.kernel_desc.get_size();
    std::vector<float*> partial(slices);
    for (int64_t i = 0; i < slices; ++i) {
      partial[i] = static_cast<float*>(
          (!plan.kernel_reorder && i == 0) ? kernel : KernelScratch(i, bytes));
    }
    ForEachChunk(slices, [&](int64_t i) {
      RunSlice(pass, part, x + i * x_step, partial[i], y + i * y_step, threads);
    });
    const size_t count = bytes / sizeof(float);
    for (int64_t i = 1; i < slices; ++i) {
      float* __restrict sum = partial[0];
      const float* __restrict part = partial[i];
      for (size_t j = 0; j < count; ++j) sum[j] += part[j];
    }
    if (plan.kernel_reorder) {
      memory from(plan.kernel_desc, Engine(), partial[0]), to(hwio, Engine(), kernel);
      plan.kernel_reorder->execute(stream, from, to);
      stream.wait();
    }
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN convolution: ") + e.what());
  }
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;

Geometry Shape(ffi::Span<const int64_t> input, ffi::Span<const int64_t> kernel, int64_t stride,
               int64_t padding, int64_t groups) {
  // input NHWC, kernel HWIO
  return {input[0], input[1], input[2], input[3], kernel[3], kernel[0], stride, padding, groups};
}

ffi::Error Forward(F32 x, F32 kernel, ffi::ResultBuffer<ffi::F32> y, int64_t stride,
                   int64_t padding, int64_t groups) {
  return Run(Pass::kForward, Shape(x.dimensions(), kernel.dimensions(), stride, padding, groups),
             x.typed_data(), kernel.typed_data(), y->typed_data());
}

ffi::Error InputGrad(F32 dy, F32 kernel, ffi::ResultBuffer<ffi::F32> dx, int64_t stride,
                     int64_t padding, int64_t groups) {
  return Run(Pass::kInputGrad,
             Shape(dx->dimensions(), kernel.dimensions(), stride, padding, groups),
             dx->typed_data(), kernel.typed_data(), dy.typed_data());
}

ffi::Error KernelGrad(F32 x, F32 dy, ffi::ResultBuffer<ffi::F32> dkernel, int64_t stride,
                      int64_t padding, int64_t groups) {
  return Run(Pass::kKernelGrad,
             Shape(x.dimensions(), dkernel->dimensions(), stride, padding, groups),
             x.typed_data(), dkernel->typed_data(), dy.typed_data());
}

}  // namespace

#define CONV_HANDLER(name, fn)                                        \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, fn,                             \
                                ffi::Ffi::Bind()                      \
                                    .Arg<F32>()                       \
                                    .Arg<F32>()                       \
                                    .Ret<F32>()                       \
                                    .Attr<int64_t>("stride")          \
                                    .Attr<int64_t>("padding")         \
                                    .Attr<int64_t>("groups"))

CONV_HANDLER(OnednnConvForward, Forward);
CONV_HANDLER(OnednnConvInputGrad, InputGrad);
CONV_HANDLER(OnednnConvKernelGrad, KernelGrad);
