// 2-D convolutions on CPU through oneDNN, as XLA FFI handlers (see resnet_jax/ops/extension.py).
//
// Layouts are JAX's: activations NHWC, kernels HWIO (for `groups` > 1, I is the per-group input
// width and O = groups * per-group outputs). Padding is symmetric, as in torch. Activations are
// handed to oneDNN as they are (its nhwc kernels); kernels go through a reorder into the layout
// the chosen implementation wants, which costs little beside the convolution itself.
//
// Primitive descriptors are slow to build (implementation search), so each shape's primitives
// are built once and kept in a map guarded by a mutex. XLA calls the handlers from several
// threads; each brings its own scratchpad.
//
// Threads: oneDNN runs on its OpenMP team (one thread per core) beside XLA's own thread pool,
// and one convolution runs at a time (a mutex): when XLA starts two independent ones at once
// (an input and a kernel gradient), two OpenMP teams would otherwise share the cores
// (benchmarks/RESULTS.md has the measurement).

#include <sys/mman.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace resnet_jax {
std::mutex& OneAtATime();  // defined at the end of this file
}  // namespace resnet_jax

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
  dnnl::reorder::primitive_desc pd(Engine(), from, Engine(), to);
  return std::make_unique<dnnl::reorder>(pd);
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

// A per-thread buffer, grown as needed and reused. It is mapped apart from malloc's heap: left
// there, it would sit above the first step's XLA buffers and split the space the next step's
// buffers are meant to reuse (resnet_jax/runtime/memory.py).
class Scratch {
 public:
  Scratch() = default;
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() { Release(); }

  void* Get(size_t bytes) {
    if (bytes <= size_) return data_;
    Release();
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    data_ = p;
    size_ = bytes;
    return data_;
  }

 private:
  void Release() {
    if (data_ != nullptr) munmap(data_, size_);
    data_ = nullptr;
    size_ = 0;
  }
  void* data_ = nullptr;
  size_t size_ = 0;
};

dnnl::stream& Stream() {
  thread_local dnnl::stream stream(Engine());
  return stream;
}

// XLA's status for a failed allocation, which the command lines report as out of memory.
ffi::Error OutOfMemory() {
  return ffi::Error(ffi::ErrorCode::kResourceExhausted, "oneDNN convolution: out of memory");
}

// Runs one pass. x: NHWC input (or its gradient), kernel: HWIO kernel (or its gradient),
// y: NHWC output (or its gradient); which of the three is written depends on the pass.
ffi::Error Run(Pass pass, const Geometry& g, void* x, void* kernel, void* y) {
  thread_local Scratch kernel_buffer, workspace;
  try {
    const Plan& plan = GetPlan(pass, g);
    dnnl::stream& stream = Stream();
    memory user_kernel(Hwio(g), Engine(), kernel);
    memory conv_kernel = user_kernel;
    if (plan.kernel_reorder) {
      const size_t bytes = plan.kernel_desc.get_size();
      conv_kernel = memory(plan.kernel_desc, Engine(), kernel_buffer.Get(bytes));
    }
    memory xs(Activations(g.n, g.h, g.w, g.c), Engine(), x);
    memory ys(Activations(g.n, g.ho(), g.wo(), g.o), Engine(), y);
    memory scratch(plan.scratchpad, Engine(), workspace.Get(plan.scratchpad.get_size()));
    std::lock_guard<std::mutex> serial(resnet_jax::OneAtATime());  // see "Threads" at the top
    if (pass == Pass::kForward) {
      if (plan.kernel_reorder) plan.kernel_reorder->execute(stream, user_kernel, conv_kernel);
      plan.conv.execute(stream, {{DNNL_ARG_SRC, xs}, {DNNL_ARG_WEIGHTS, conv_kernel},
                                 {DNNL_ARG_DST, ys}, {DNNL_ARG_SCRATCHPAD, scratch}});
    } else if (pass == Pass::kInputGrad) {
      if (plan.kernel_reorder) plan.kernel_reorder->execute(stream, user_kernel, conv_kernel);
      plan.conv.execute(stream, {{DNNL_ARG_DIFF_SRC, xs}, {DNNL_ARG_WEIGHTS, conv_kernel},
                                 {DNNL_ARG_DIFF_DST, ys}, {DNNL_ARG_SCRATCHPAD, scratch}});
    } else {
      plan.conv.execute(stream, {{DNNL_ARG_SRC, xs}, {DNNL_ARG_DIFF_WEIGHTS, conv_kernel},
                                 {DNNL_ARG_DIFF_DST, ys}, {DNNL_ARG_SCRATCHPAD, scratch}});
      if (plan.kernel_reorder) plan.kernel_reorder->execute(stream, conv_kernel, user_kernel);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    if (e.status == dnnl_out_of_memory) return OutOfMemory();
    return ffi::Error::Internal(std::string("oneDNN convolution: ") + e.what());
  } catch (const std::bad_alloc&) {  // the scratch buffers, the plan cache
    return OutOfMemory();
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

namespace resnet_jax {
// Held while a convolution or a BatchNorm sum runs its OpenMP team (see "Threads" at the top).
std::mutex& OneAtATime() {
  static std::mutex mutex;
  return mutex;
}
}  // namespace resnet_jax

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
