// Which decode kernel runs a Mamba-3 decode step (mamba3_decode_gpu.h): the process-wide choice and the dispatcher.
#include <mutex>
#include <string>

#include "cuda/env_switch.h"
#include "cuda/mamba3_decode_gpu.h"

namespace mamba3::cuda {
namespace {

std::mutex choice_mutex;
DecodeChoice& choice_slot() {
  static DecodeChoice c = [] {
    DecodeChoice d;
    const std::string k = env_choice("MAMBA3_DECODE_KERNEL", {"auto", "head", "stream"});
    d.kernel = k == "head" ? DecodeKernel::Head : k == "stream" ? DecodeKernel::Stream : DecodeKernel::Auto;
    d.stream_min_items = env_integer("MAMBA3_STREAM_DECODE_MIN", d.stream_min_items, 1, int64_t(1) << 40);
    d.stages = int(env_integer("MAMBA3_STREAM_DECODE_STAGES", d.stages, 2, 3));
    d.blocks_per_head = int(env_integer("MAMBA3_STREAM_DECODE_BLOCKS", d.blocks_per_head, 0, 1 << 16));
    d.head_tensor_cores = env_choice("MAMBA3_HEAD_DECODE_TC", {"1", "0"}) != "0";  // on unless "0"
    d.head_tc_min_items = env_integer("MAMBA3_HEAD_DECODE_TC_MIN", d.head_tc_min_items, 1, int64_t(1) << 40);
    d.early_state = env_choice("MAMBA3_DECODE_EARLY_STATE", {"1", "0"}) != "0";  // on unless "0"
    d.mimo_deferred_writes = env_choice("MAMBA3_DECODE_DEFER_MIMO", {"1", "0"}) != "0";  // on unless "0"
    return d;
  }();
  return c;
}

}  // namespace

DecodeChoice decode_choice() {
  std::lock_guard<std::mutex> lock(choice_mutex);
  return choice_slot();
}

void set_decode_choice(const DecodeChoice& c) {
  std::lock_guard<std::mutex> lock(choice_mutex);
  choice_slot() = c;
}

bool mamba3_decode_defers_writes(const Mamba3KernelShape& shape, const Mamba3GpuState& st) {
  const auto aligned16 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  Mamba3DecodeArgs args{};
  static_cast<Mamba3KernelShape&>(args) = shape;
  const DecodeChoice c = decode_choice();
  // SISO on the head kernel's FMA rows at N ≤ 128 (one float4 per lane: at N = 256 the pending k spill); MIMO on its
  // tensor-core rows (P = 64, N = 128) unless turned off, at every batch once deferring.
  const bool kernel = shape.R == 1 ? !shape.mimo && shape.N <= 128
                                   : head_decode_tc_fits(args) && c.head_tensor_cores && c.mimo_deferred_writes;
  return st.write_every > 1 && st.lazy && st.ring && aligned16(st.ring) && kernel &&
         mamba3_head_decode_reaches(shape) && aligned16(st.ssm16 ? static_cast<const void*>(st.ssm16) : st.ssm) &&
         aligned16(st.k) && c.kernel != DecodeKernel::Stream;
}

bool mamba3_decode_step_gpu(cudaStream_t s, const Mamba3DecodeArgs& a, int64_t batch) {
  const DecodeChoice c = decode_choice();
  const int64_t pairs = batch * a.H;
  // A deferring state reaches here only where mamba3_decode_defers_writes holds (GpuMamba3Layer::forward settles it
  // and drops the ring otherwise): the head kernel, SISO on its FMA rows, MIMO on its tensor-core rows.
  if (a.st.write_every > 1) return mamba3_head_decode_gpu(s, a, batch, /*tensor_cores=*/a.R > 1, c.early_state);
  if (a.st.ssm16) {  // the bf16-state mode: only the head kernel reads that state
    const bool tc = c.head_tensor_cores && (c.kernel == DecodeKernel::Head || pairs >= c.head_tc_min_items);
    return mamba3_head_decode_gpu(s, a, batch, tc, c.early_state);
  }
  if (c.kernel == DecodeKernel::Head) return mamba3_head_decode_gpu(s, a, batch, c.head_tensor_cores, c.early_state);
  if (c.kernel == DecodeKernel::Stream &&
      mamba3_stream_decode_gpu(s, a, batch, c.blocks_per_head, c.stages))
    return true;
  if (c.kernel == DecodeKernel::Auto) {
    // MIMO at P = 64, N = 128 from head_tc_min_items pairs on: the head kernel with tensor-core rows (H200, 1.5B MIMO
    // R = 4 b128: 5.73 ms per step against 6.06 for the streaming kernel and 6.65 for the FMA rows). Other MIMO shapes
    // from stream_min_items pairs on: the streaming kernel. SISO: the head kernel, faster at every batch measured
    // (b128: 5.16 vs 5.58–5.67 ms per step; in context 144.5 vs 163.5 µs per layer, 91 % of the copy bandwidth).
    if (c.head_tensor_cores && pairs >= c.head_tc_min_items && head_decode_tc_fits(a))
      return mamba3_head_decode_gpu(s, a, batch, true, c.early_state);
    if (a.R > 1 && pairs >= c.stream_min_items &&
        mamba3_stream_decode_gpu(s, a, batch, c.blocks_per_head, c.stages))
      return true;
  }
  return mamba3_head_decode_gpu(s, a, batch, false, c.early_state);
}

}  // namespace mamba3::cuda
