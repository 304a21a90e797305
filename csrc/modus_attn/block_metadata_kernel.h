// Block-metadata kernels: per-key-block bounds of lo/hi and the tile lists the attention
// kernels walk. modus_mega/ops/block_metadata.py is the specification (and the CPU
// implementation); the GPU tests check that both produce identical tensors.
//
// Classification of the tile (query block i, keys of block j), over the absolute query rows
// [r0, r1) with r0 = q_offset + i * Bq, r1 = q_offset + min((i + 1) * Bq, Tq):
//   skipped  iff lo_min(j) >= r1 or hi_max(j) <= r0    (no key interval meets [r0, r1))
//   full     iff lo_max(j) <= r0 and hi_min(j) >= r1   (every key interval covers [r0, r1))
//   partial  otherwise.
// "full" is exact. "skipped" is exact whenever every key sees itself (lo[k] <= k < hi[k], which
// the packer guarantees, padding included) and conservative otherwise: a tile reported partial
// may be empty, never the reverse.
#pragma once

#include <cstdint>

#include "modus_attn.h"

namespace modus_attn {

constexpr int kListWarps = 4;  // outer blocks per thread block of tile_lists_kernel

__device__ __forceinline__ int warp_min(int x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2)
    x = min(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}
__device__ __forceinline__ int warp_max(int x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2)
    x = max(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// One warp per key block: bounds[j] = {lo_min, lo_max, hi_min, hi_max} after clamping lo, hi
// into [0, T] and mapping empty intervals to (T, 0).
__global__ void __launch_bounds__(32)
    key_block_bounds_kernel(const int32_t* lo, const int32_t* hi, int num_tokens, int block_k,
                            int32_t* bounds) {
  // Neutral elements: clamped values lie in [0, T].
  int lo_min = num_tokens;
  int lo_max = 0;
  int hi_min = num_tokens;
  int hi_max = 0;
  const int key0 = blockIdx.x * block_k;
  const int key1 = min(key0 + block_k, num_tokens);
  for (int key = key0 + static_cast<int>(threadIdx.x); key < key1; key += 32) {
    int l = min(max(lo[key], 0), num_tokens);
    int h = min(max(hi[key], 0), num_tokens);
    if (l >= h) {  // sees no row: never makes a tile non-empty, always makes it non-full
      l = num_tokens;
      h = 0;
    }
    lo_min = min(lo_min, l);
    lo_max = max(lo_max, l);
    hi_min = min(hi_min, h);
    hi_max = max(hi_max, h);
  }
  lo_min = warp_min(lo_min);
  lo_max = warp_max(lo_max);
  hi_min = warp_min(hi_min);
  hi_max = warp_max(hi_max);
  if (threadIdx.x == 0) {
    int32_t* out = bounds + 4 * static_cast<int64_t>(blockIdx.x);
    out[0] = lo_min;
    out[1] = lo_max;
    out[2] = hi_min;
    out[3] = hi_max;
  }
}

// 0 = skipped, 1 = full, 2 = partial; b = {lo_min, lo_max, hi_min, hi_max}.
__device__ __forceinline__ int classify_tile(const int32_t* b, int r0, int r1) {
  if (b[0] >= r1 || b[3] <= r0) return 0;
  if (b[1] <= r0 && b[2] >= r1) return 1;
  return 2;
}

// One warp per outer block (a query block, or a key block when by_key); the warp scans the
// inner blocks 32 at a time and compacts the non-skipped ones in ascending order with a
// ballot. Row layout: `count` entries (inner << 1) | partial, then -1.
__global__ void __launch_bounds__(32 * kListWarps)
    tile_lists_kernel(const int32_t* bounds, int num_queries, int q_offset, int block_q,
                      bool by_key, int num_outer, int num_inner, int32_t* blocks,
                      int32_t* counts) {
  const int outer = blockIdx.x * kListWarps + static_cast<int>(threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (outer >= num_outer) return;  // whole warps leave together
  int32_t* row = blocks + static_cast<int64_t>(outer) * num_inner;
  int count = 0;
  for (int base = 0; base < num_inner; base += 32) {
    const int inner = base + lane;
    int cls = 0;
    if (inner < num_inner) {
      const int q_block = by_key ? inner : outer;
      const int k_block = by_key ? outer : inner;
      const int r0 = q_offset + q_block * block_q;
      const int r1 = q_offset + min((q_block + 1) * block_q, num_queries);
      cls = classify_tile(bounds + 4 * static_cast<int64_t>(k_block), r0, r1);
    }
    const unsigned hits = __ballot_sync(0xffffffffu, cls != 0);
    if (cls != 0) {
      const int slot = count + __popc(hits & ((1u << lane) - 1u));
      row[slot] = (inner << 1) | (cls == 2 ? 1 : 0);
    }
    count += __popc(hits);
  }
  for (int slot = count + lane; slot < num_inner; slot += 32) row[slot] = -1;
  if (lane == 0) counts[outer] = count;
}

}  // namespace modus_attn
