// CPU emulation of the modus_attn kernels, for CI machines without a GPU.
//
// The kernel headers (attn_fwd_kernel.h, attn_bwd_kernel.h, block_metadata_kernel.h) are
// compiled unchanged by the host compiler; this header supplies what they take from CUDA:
//   * every CUDA thread is a fiber on one OS thread (entered once through ucontext, then
//     switched with _setjmp/_longjmp, which skip the signal-mask syscalls); a thread block
//     runs until all its fibers finish, blocks run one after another;
//   * __syncthreads / __syncwarp are barriers over the block's / warp's fibers; warp
//     collectives (__shfl_xor_sync, __ballot_sync, ldmatrix, mma) exchange operands through
//     a per-warp buffer between two barriers, following the PTX fragment layouts (ptx.h);
//   * ptx.h is replaced wholesale (its include guard is defined first): cp.async copies are
//     queued per thread and land only when that thread waits on their group (the latest
//     moment the hardware allows, so a missing wait reads stale data); shared memory starts
//     poisoned; mma accumulates in double and rounds to fp32; ex2 is exact.
// The runner at the bottom is a small command-line program over binary files, which
// tests/kernels/test_cuda_attention.py drives. Build (one translation unit):
//   #include "cpu_emulation.h"
//   int main(int argc, char** argv) { return modus_attn::emulation::main(argc, argv); }
//   g++ -std=c++20 -O1 -U_FORTIFY_SOURCE -Wno-attributes -Wno-unknown-pragmas
//       -I csrc/modus_attn -I $CUDA/include
// (-U_FORTIFY_SOURCE: the fortified longjmp refuses to jump between stacks.)
#pragma once

#if defined(_FORTIFY_SOURCE) && _FORTIFY_SOURCE > 0
#error "cpu_emulation.h switches fibers with longjmp: compile with -U_FORTIFY_SOURCE"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <functional>
#include <numeric>
#include <string>
#include <vector>

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

// The kernels' `extern __shared__ unsigned char smem[]` names this buffer.
namespace modus_attn {
alignas(128) inline unsigned char smem[256 * 1024];
}

inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace modus_attn::emulation {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cpu_emulation: %s (block %u,%u thread %u)\n", what, blockIdx.x, blockIdx.y,
               threadIdx.x);
  std::abort();
}

struct Barrier {
  int expected = 0;
  int arrived = 0;
  unsigned generation = 0;
};

struct AsyncCopy {
  uint32_t dst;     // shared-memory offset
  const void* src;  // global address (unused when !valid)
  int bytes;
  bool valid;  // false: zero-fill
};

struct Fiber {
  ucontext_t context;  // first entry only
  jmp_buf resume_point;
  bool started = false;
  std::vector<char> stack;
  uint3 thread_index;
  bool done = false;
  std::vector<AsyncCopy> open_group;
  std::deque<std::vector<AsyncCopy>> committed;  // oldest first
};

// Operands of one warp collective, one row per lane.
struct WarpExchange {
  uint32_t words[32][6];
};

struct BlockState {
  ucontext_t scheduler;
  jmp_buf scheduler_point;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<WarpExchange> exchange;
  std::function<void()> body;
};

inline BlockState g_block;

inline int lane() { return static_cast<int>(threadIdx.x % 32); }
inline int warp() { return static_cast<int>(threadIdx.x / 32); }

// Back to the scheduler; resume() jumps back here.
inline void yield() {
  if (_setjmp(g_block.current->resume_point) == 0) _longjmp(g_block.scheduler_point, 1);
}

inline void arrive_and_wait(Barrier& barrier) {
  const unsigned generation = barrier.generation;
  if (++barrier.arrived == barrier.expected) {
    barrier.arrived = 0;
    ++barrier.generation;
    return;
  }
  while (barrier.generation == generation) yield();
}

inline void warp_sync() { arrive_and_wait(g_block.warp_barriers[warp()]); }

inline void fiber_main() {
  g_block.body();
  g_block.current->done = true;
  _longjmp(g_block.scheduler_point, 1);
}

// Runs `fiber` until it yields or finishes. Its first entry goes through ucontext (a fresh
// stack); later ones jump back to where it yielded.
[[gnu::noinline]] inline void resume(Fiber* fiber) {
  g_block.current = fiber;
  threadIdx = fiber->thread_index;
  if (_setjmp(g_block.scheduler_point) != 0) return;  // the fiber yielded or finished
  if (fiber->started) _longjmp(fiber->resume_point, 1);
  fiber->started = true;
  swapcontext(&g_block.scheduler, &fiber->context);
}

// kernel<<<grid, block, smem_bytes>>>(args...), synchronously.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, size_t smem_bytes, Args... args) {
  if (smem_bytes > sizeof(modus_attn::smem) || block.x % 32 != 0 || block.y != 1 || block.z != 1) {
    fail("unsupported launch shape");
  }
  gridDim = grid;
  blockDim = block;
  const int num_threads = static_cast<int>(block.x);
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      blockIdx = uint3{bx, by, 0};
      std::memset(modus_attn::smem, 0x7f, sizeof(modus_attn::smem));  // poison: bf16 ~3e38
      g_block.fibers = std::vector<Fiber>(num_threads);
      g_block.block_barrier = Barrier{num_threads, 0, 0};
      g_block.warp_barriers.assign(num_threads / 32, Barrier{32, 0, 0});
      g_block.exchange.assign(num_threads / 32, WarpExchange{});
      g_block.body = [&]() { kernel(args...); };
      for (int t = 0; t < num_threads; ++t) {
        Fiber& fiber = g_block.fibers[t];
        fiber.stack.resize(256 * 1024);
        fiber.thread_index = uint3{static_cast<unsigned>(t), 0, 0};
        getcontext(&fiber.context);
        fiber.context.uc_stack.ss_sp = fiber.stack.data();
        fiber.context.uc_stack.ss_size = fiber.stack.size();
        fiber.context.uc_link = nullptr;
        makecontext(&fiber.context, fiber_main, 0);
      }
      for (bool running = true; running;) {
        running = false;
        for (Fiber& fiber : g_block.fibers) {
          if (fiber.done) continue;
          resume(&fiber);
          running = running || !fiber.done;
        }
      }
      for (Fiber& fiber : g_block.fibers) {
        threadIdx = fiber.thread_index;
        bool pending = !fiber.open_group.empty();
        for (const auto& group : fiber.committed) pending = pending || !group.empty();
        if (pending) fail("thread exits with cp.async copies never waited for");
      }
    }
  }
}

inline uint16_t bf16_bits(float x) {
  if (std::isnan(x)) return 0x7fc0;
  const uint32_t u = std::bit_cast<uint32_t>(x);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // round to nearest even
}
inline float bf16_float(uint16_t bits) {
  return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16);
}
inline uint16_t f16_bits(float x) { return std::bit_cast<uint16_t>(static_cast<_Float16>(x)); }
inline float f16_float(uint16_t bits) { return static_cast<float>(std::bit_cast<_Float16>(bits)); }

template <bool kBF16>
float half_of(uint32_t word, int high) {
  const auto bits = static_cast<uint16_t>(high ? word >> 16 : word & 0xffffu);
  return kBF16 ? bf16_float(bits) : f16_float(bits);
}

// mma.sync.m16n8k16.row.col with the fragment layouts of ptx.h.
template <bool kBF16>
void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  auto& words = g_block.exchange[warp()].words;
  std::copy(a, a + 4, words[lane()]);
  words[lane()][4] = b0;
  words[lane()][5] = b1;
  warp_sync();
  float A[16][16];
  float B[16][8];
  for (int t = 0; t < 32; ++t) {
    const int grp = t / 4, quad = t % 4;
    for (int h = 0; h < 2; ++h) {
      A[grp][2 * quad + h] = half_of<kBF16>(words[t][0], h);
      A[grp + 8][2 * quad + h] = half_of<kBF16>(words[t][1], h);
      A[grp][8 + 2 * quad + h] = half_of<kBF16>(words[t][2], h);
      A[grp + 8][8 + 2 * quad + h] = half_of<kBF16>(words[t][3], h);
      B[2 * quad + h][grp] = half_of<kBF16>(words[t][4], h);
      B[8 + 2 * quad + h][grp] = half_of<kBF16>(words[t][5], h);
    }
  }
  warp_sync();
  const int grp = lane() / 4, quad = lane() % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = grp + 8 * (i / 2), col = 2 * quad + i % 2;
    double acc = c[i];
    for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[row][k]) * B[k][col];
    c[i] = static_cast<float>(acc);
  }
}

}  // namespace modus_attn::emulation

// ---------------------------------------------------------------------------------------------
// CUDA builtins the kernels call.

inline void __syncthreads() {
  modus_attn::emulation::arrive_and_wait(modus_attn::emulation::g_block.block_barrier);
}
inline void __syncwarp(unsigned = 0xffffffffu) { modus_attn::emulation::warp_sync(); }

template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  namespace emu = modus_attn::emulation;
  auto& words = emu::g_block.exchange[emu::warp()].words;
  words[emu::lane()][0] = std::bit_cast<uint32_t>(value);
  emu::warp_sync();
  const T result = std::bit_cast<T>(words[emu::lane() ^ lane_mask][0]);
  emu::warp_sync();
  return result;
}

inline unsigned __ballot_sync(unsigned, int predicate) {
  namespace emu = modus_attn::emulation;
  auto& words = emu::g_block.exchange[emu::warp()].words;
  words[emu::lane()][0] = predicate ? 1u : 0u;
  emu::warp_sync();
  unsigned ballot = 0;
  for (int l = 0; l < 32; ++l) ballot |= words[l][0] << l;
  emu::warp_sync();
  return ballot;
}

inline int __popc(unsigned x) { return std::popcount(x); }
template <typename T>
T __ldg(const T* ptr) {
  return *ptr;
}
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline float __int_as_float(unsigned x) { return std::bit_cast<float>(x); }
using std::max;
using std::min;

// ---------------------------------------------------------------------------------------------
// ptx.h, emulated.
#define MODUS_ATTN_PTX_H_

namespace modus_attn {

template <typename Elem>
struct ElemTraits;

template <>
struct ElemTraits<__nv_bfloat16> {
  static uint32_t pack(float a, float b) {
    return emulation::bf16_bits(a) | (static_cast<uint32_t>(emulation::bf16_bits(b)) << 16);
  }
  static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    emulation::mma<true>(c, a, b0, b1);
  }
  static float2 unpack(uint32_t r) {
    return make_float2(emulation::half_of<true>(r, 0), emulation::half_of<true>(r, 1));
  }
};

template <>
struct ElemTraits<__half> {
  static uint32_t pack(float a, float b) {
    return emulation::f16_bits(a) | (static_cast<uint32_t>(emulation::f16_bits(b)) << 16);
  }
  static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    emulation::mma<false>(c, a, b0, b1);
  }
  static float2 unpack(uint32_t r) {
    return make_float2(emulation::half_of<false>(r, 0), emulation::half_of<false>(r, 1));
  }
};

inline uint32_t smem_u32(const void* ptr) {
  const auto* p = static_cast<const unsigned char*>(ptr);
  if (p < smem || p >= smem + sizeof(smem))
    emulation::fail("shared-memory address of a non-shared pointer");
  return static_cast<uint32_t>(p - smem);
}

inline void ldmatrix(uint32_t (&r)[4], uint32_t addr, bool trans) {
  namespace emu = emulation;
  if (addr % 16 != 0) emu::fail("ldmatrix row address not 16-byte aligned");
  auto& words = emu::g_block.exchange[emu::warp()].words;
  words[emu::lane()][0] = addr;
  emu::warp_sync();
  const int grp = emu::lane() / 4, quad = emu::lane() % 4;
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if (!trans) {  // (row grp, cols 2quad, 2quad + 1)
      const unsigned char* row = smem + words[8 * i + grp][0];
      std::memcpy(&lo, row + 4 * quad, 2);
      std::memcpy(&hi, row + 4 * quad + 2, 2);
    } else {  // (rows 2quad, 2quad + 1; col grp)
      std::memcpy(&lo, smem + words[8 * i + 2 * quad][0] + 2 * grp, 2);
      std::memcpy(&hi, smem + words[8 * i + 2 * quad + 1][0] + 2 * grp, 2);
    }
    r[i] = lo | (static_cast<uint32_t>(hi) << 16);
  }
  emu::warp_sync();
}
inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) { ldmatrix(r, addr, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) { ldmatrix(r, addr, true); }

inline void cp_async(uint32_t dst, const void* src, int bytes, bool valid) {
  if (dst % bytes != 0 || (valid && reinterpret_cast<uintptr_t>(src) % bytes != 0)) {
    emulation::fail("misaligned cp.async");
  }
  emulation::g_block.current->open_group.push_back(emulation::AsyncCopy{dst, src, bytes, valid});
}
inline void cp_async_16(uint32_t dst, const void* src, bool valid) {
  cp_async(dst, src, 16, valid);
}
inline void cp_async_4(uint32_t dst, const void* src, bool valid) { cp_async(dst, src, 4, valid); }

inline void cp_async_commit() {
  emulation::Fiber* fiber = emulation::g_block.current;
  fiber->committed.push_back(std::move(fiber->open_group));
  fiber->open_group.clear();
}

template <int N>
void cp_async_wait() {
  emulation::Fiber* fiber = emulation::g_block.current;
  while (static_cast<int>(fiber->committed.size()) > N) {
    for (const emulation::AsyncCopy& copy : fiber->committed.front()) {
      if (copy.valid) {
        std::memcpy(smem + copy.dst, copy.src, copy.bytes);
      } else {
        std::memset(smem + copy.dst, 0, copy.bytes);
      }
    }
    fiber->committed.pop_front();
  }
}

inline float fast_exp2(float x) { return std::exp2(x); }

inline void atomic_add_f32x2(float* ptr, float a, float b) {  // one OS thread: plain adds
  ptr[0] += a;
  ptr[1] += b;
}

}  // namespace modus_attn

#include "attn_bwd_kernel.h"
#include "attn_fwd_kernel.h"
#include "block_metadata_kernel.h"

// ---------------------------------------------------------------------------------------------
// Runner: `emulator DIR`. DIR/config.txt holds "MODE T Hq Hkv D DTYPE SCALE DETERMINISTIC
// HAS_DLSE TQ Q_OFFSET" (MODE metadata | forward | backward, DTYPE bf16 | fp16; TQ query rows
// at absolute positions Q_OFFSET ..., the backward needs TQ = T and Q_OFFSET = 0). Binary
// files NAME.bin, raw little-endian, shapes as in modus_attn.h:
//   metadata  reads lo, hi; writes {fwd,bwd}_{bounds,blocks,counts,order}
//   forward   reads q, k, v, lo, hi, fwd_{blocks,counts,order}; writes out, lse
//   backward  reads q, k, v, out, dout, lse, [dlse], lo, hi, {fwd,bwd}_{blocks,counts,order};
//             writes dq, dk, dv

namespace modus_attn::emulation {

template <typename T>
std::vector<T> read_file(const std::string& path, size_t count) {
  std::vector<T> data(count);
  std::ifstream file(path, std::ios::binary);
  file.read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(count * sizeof(T)));
  if (!file || file.peek() != EOF) {
    std::fprintf(stderr, "cpu_emulation: %s must hold exactly %zu values\n", path.c_str(), count);
    std::exit(2);
  }
  return data;
}

template <typename T>
void write_file(const std::string& path, const std::vector<T>& data) {
  std::ofstream file(path, std::ios::binary);
  file.write(reinterpret_cast<const char*>(data.data()),
             static_cast<std::streamsize>(data.size() * sizeof(T)));
}

struct Config {
  std::string mode, dtype;
  int num_tokens = 0, num_q_heads = 0, num_kv_heads = 0, head_dim = 0;
  float scale = 0.f;
  int deterministic = 0, has_dlse = 0;
  int num_queries = 0, q_offset = 0;
};

struct HostList {
  std::vector<int32_t> bounds, blocks, counts, order;
  int num_outer = 0, num_inner = 0;

  BlockList view() const {
    return BlockList{blocks.data(), counts.data(), order.data(), num_inner, num_outer};
  }
};

inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

inline HostList build_list(const std::vector<int32_t>& lo, const std::vector<int32_t>& hi,
                           int num_tokens, int num_queries, int q_offset, int block_q, int block_k,
                           bool by_key) {
  HostList list;
  const int num_k = ceil_div(num_tokens, block_k), num_q = ceil_div(num_queries, block_q);
  list.num_outer = by_key ? num_k : num_q;
  list.num_inner = by_key ? num_q : num_k;
  list.bounds.assign(4 * static_cast<size_t>(num_k), 0);
  list.blocks.assign(static_cast<size_t>(list.num_outer) * list.num_inner, 0);
  list.counts.assign(list.num_outer, 0);
  launch(key_block_bounds_kernel, dim3(num_k), dim3(32), 0, lo.data(), hi.data(), num_tokens,
         block_k, list.bounds.data());
  if (list.num_outer > 0) {  // the launcher's rule (block_metadata.cu)
    launch(tile_lists_kernel, dim3(ceil_div(list.num_outer, kListWarps)),
           dim3(32 * kListWarps), 0, static_cast<const int32_t*>(list.bounds.data()),
           num_queries, q_offset, block_q, by_key, list.num_outer, list.num_inner,
           list.blocks.data(), list.counts.data());
  }
  list.order.resize(list.num_outer);  // the binding's stable argsort, descending
  std::iota(list.order.begin(), list.order.end(), 0);
  std::stable_sort(list.order.begin(), list.order.end(),
                   [&](int a, int b) { return list.counts[a] > list.counts[b]; });
  return list;
}

inline HostList read_list(const std::string& dir, const std::string& prefix, int num_outer,
                          int num_inner) {
  HostList list;
  list.num_outer = num_outer;
  list.num_inner = num_inner;
  list.blocks = read_file<int32_t>(dir + "/" + prefix + "_blocks.bin",
                                   static_cast<size_t>(num_outer) * num_inner);
  list.counts = read_file<int32_t>(dir + "/" + prefix + "_counts.bin", num_outer);
  list.order = read_file<int32_t>(dir + "/" + prefix + "_order.bin", num_outer);
  return list;
}

template <typename Elem, int D>
int run_attention(const std::string& dir, const Config& c) {
  const int T = c.num_tokens, Tq = c.num_queries, Hq = c.num_q_heads, Hkv = c.num_kv_heads;
  const size_t q_size = static_cast<size_t>(Tq) * Hq * D;
  const size_t kv_size = static_cast<size_t>(T) * Hkv * D;
  const auto q = read_file<uint16_t>(dir + "/q.bin", q_size);
  const auto k = read_file<uint16_t>(dir + "/k.bin", kv_size);
  const auto v = read_file<uint16_t>(dir + "/v.bin", kv_size);
  const auto lo = read_file<int32_t>(dir + "/lo.bin", T);
  const auto hi = read_file<int32_t>(dir + "/hi.bin", T);
  const HostList fwd = read_list(dir, "fwd", ceil_div(Tq, kFwdBlockQ), ceil_div(T, kFwdBlockK));
  const TensorLayout q_layout{static_cast<int64_t>(Hq) * D, D};
  const TensorLayout kv_layout{static_cast<int64_t>(Hkv) * D, D};
  const int64_t num_rows = static_cast<int64_t>(Tq) * Hq;

  if (c.mode == "forward") {
    std::vector<uint16_t> out(q_size, 0xffff);
    std::vector<float> lse(num_rows, NAN);
    FwdParams p{};
    p.q = q.data();
    p.k = k.data();
    p.v = v.data();
    p.out = out.data();
    p.lse = lse.data();
    p.lo = lo.data();
    p.hi = hi.data();
    p.q_layout = p.out_layout = q_layout;
    p.k_layout = p.v_layout = kv_layout;
    p.fwd_list = fwd.view();
    p.num_tokens = T;
    p.num_queries = Tq;
    p.q_offset = c.q_offset;
    p.num_q_heads = Hq;
    p.num_kv_heads = Hkv;
    p.scale = c.scale;
    if (Tq > 0) {  // the launcher queues nothing for no query rows
      launch(attention_forward_kernel<Elem, D>, dim3(fwd.num_outer, Hq), dim3(kNumThreads),
             FwdTile<Elem, D>::kSmemBytes, p);
    }
    write_file(dir + "/out.bin", out);
    write_file(dir + "/lse.bin", lse);
    return 0;
  }

  if (Tq != T || c.q_offset != 0) {  // the binding's check (modus_attn_api.cpp)
    std::fprintf(stderr, "cpu_emulation: the backward needs TQ = T and Q_OFFSET = 0\n");
    return 2;
  }
  const auto out = read_file<uint16_t>(dir + "/out.bin", q_size);
  const auto dout = read_file<uint16_t>(dir + "/dout.bin", q_size);
  const auto lse = read_file<float>(dir + "/lse.bin", num_rows);
  std::vector<float> dlse;
  if (c.has_dlse) dlse = read_file<float>(dir + "/dlse.bin", num_rows);
  const HostList bwd = read_list(dir, "bwd", ceil_div(T, kBwdBlockK), ceil_div(T, kBwdBlockQ));
  std::vector<uint16_t> dq(q_size, 0xffff), dk(kv_size, 0xffff), dv(kv_size, 0xffff);
  std::vector<float> delta(num_rows, NAN);
  std::vector<float> dq_accum(c.deterministic ? 0 : q_size, 0.f);
  BwdParams p{};
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.out = out.data();
  p.dout = dout.data();
  p.lse = lse.data();
  p.grad_lse = c.has_dlse ? dlse.data() : nullptr;
  p.delta = delta.data();
  p.dq = dq.data();
  p.dk = dk.data();
  p.dv = dv.data();
  p.dq_accum = c.deterministic ? nullptr : dq_accum.data();
  p.lo = lo.data();
  p.hi = hi.data();
  p.q_layout = p.out_layout = p.dout_layout = p.dq_layout = q_layout;
  p.k_layout = p.v_layout = p.dk_layout = p.dv_layout = kv_layout;
  p.fwd_list = fwd.view();
  p.bwd_list = bwd.view();
  p.num_tokens = T;
  p.num_q_heads = Hq;
  p.num_kv_heads = Hkv;
  p.scale = c.scale;
  p.deterministic = c.deterministic != 0;
  // The launch sequence of attn_bwd.cu.
  constexpr int kRowsPerBlock = kNumThreads / (D / 8);
  launch(delta_kernel<Elem, D>,
         dim3(static_cast<unsigned>((num_rows + kRowsPerBlock - 1) / kRowsPerBlock)),
         dim3(kNumThreads), 0, p);
  if (p.deterministic) {
    launch(dkdv_kernel<Elem, D, false>, dim3(bwd.num_outer, Hkv), dim3(kNumThreads),
           DkdvTile<Elem, D, false>::kSmemBytes, p);
    launch(dq_kernel<Elem, D>, dim3(fwd.num_outer, Hq), dim3(kNumThreads),
           DqTile<Elem, D>::kSmemBytes, p);
  } else {
    launch(dkdv_kernel<Elem, D, true>, dim3(bwd.num_outer, Hkv), dim3(kNumThreads),
           DkdvTile<Elem, D, true>::kSmemBytes, p);
    launch(dq_convert_kernel<Elem>,
           dim3(static_cast<unsigned>(ceil_div(static_cast<int>(num_rows * D / 8), kNumThreads))),
           dim3(kNumThreads), 0, p, D);
  }
  write_file(dir + "/dq.bin", dq);
  write_file(dir + "/dk.bin", dk);
  write_file(dir + "/dv.bin", dv);
  return 0;
}

inline int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR (see cpu_emulation.h)\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  Config c;
  std::ifstream config(dir + "/config.txt");
  config >> c.mode >> c.num_tokens >> c.num_q_heads >> c.num_kv_heads >> c.head_dim >> c.dtype >>
      c.scale >> c.deterministic >> c.has_dlse >> c.num_queries >> c.q_offset;
  if (!config || c.num_tokens < 1 || c.num_queries < 0 || c.q_offset < 0 ||
      c.q_offset + c.num_queries > c.num_tokens) {
    std::fprintf(stderr, "cpu_emulation: bad %s/config.txt\n", dir.c_str());
    return 2;
  }
  if (c.mode == "metadata") {
    const auto lo = read_file<int32_t>(dir + "/lo.bin", c.num_tokens);
    const auto hi = read_file<int32_t>(dir + "/hi.bin", c.num_tokens);
    for (const bool by_key : {false, true}) {
      const HostList list =
          by_key ? build_list(lo, hi, c.num_tokens, c.num_queries, c.q_offset, kBwdBlockQ,
                              kBwdBlockK, true)
                 : build_list(lo, hi, c.num_tokens, c.num_queries, c.q_offset, kFwdBlockQ,
                              kFwdBlockK, false);
      const std::string prefix = dir + (by_key ? "/bwd_" : "/fwd_");
      write_file(prefix + "bounds.bin", list.bounds);
      write_file(prefix + "blocks.bin", list.blocks);
      write_file(prefix + "counts.bin", list.counts);
      write_file(prefix + "order.bin", list.order);
    }
    return 0;
  }
  if (c.mode != "forward" && c.mode != "backward") {
    std::fprintf(stderr, "cpu_emulation: unknown mode %s\n", c.mode.c_str());
    return 2;
  }
  const bool bf16 = c.dtype == "bf16";
  if (c.head_dim == 64)
    return bf16 ? run_attention<__nv_bfloat16, 64>(dir, c) : run_attention<__half, 64>(dir, c);
  if (c.head_dim == 128)
    return bf16 ? run_attention<__nv_bfloat16, 128>(dir, c) : run_attention<__half, 128>(dir, c);
  std::fprintf(stderr, "cpu_emulation: head_dim must be 64 or 128\n");
  return 2;
}

}  // namespace modus_attn::emulation
