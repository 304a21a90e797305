// Tile-level helpers of the modus_attn kernels, built on the PTX wrappers of ptx.h: the
// shared-memory swizzle, fragment loads, asynchronous tile loads and quad reductions.
//
// Shared-memory tiles are row-major with rows of COLS elements (COLS = 64 or 128, i.e. 8 or
// 16 chunks of 16 bytes); chunk c of row r is stored at chunk position c ^ (r & 7). The 8
// row addresses of one ldmatrix 8x8 matrix then fall in 8 distinct 16-byte bank groups, and
// so do the 8 rows a warp writes when it stores a C fragment (conflict-free both ways).
#pragma once

#include <cstdint>

#include "ptx.h"

namespace modus_attn {

constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }

// ---------------------------------------------------------------------------------------------
// Shared memory: swizzle and fragment loads.

// Element offset of (row, 16-byte chunk) in a swizzled tile with COLS elements per row.
template <int COLS>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  static_assert(COLS == 64 || COLS == 128, "swizzle needs 8 or 16 chunks per row");
  return row * COLS + ((chunk ^ (row & 7)) << 3);
}

// A fragment of rows [row0, row0+16) x cols [16ks, 16ks+16) of a row-major tile.
template <int COLS>
__device__ __forceinline__ void load_a_frag(uint32_t (&a)[4], const void* tile, int row0, int ks,
                                            int lane) {
  const int row = row0 + (lane & 15);
  const int chunk = 2 * ks + (lane >> 4);
  ldmatrix_x4(a, smem_u32(static_cast<const uint16_t*>(tile) + swizzle<COLS>(row, chunk)));
}

// B fragments of two n-tiles where the tile stores B transposed, i.e. rows = n, cols = k
// (K in Q K^T): n in [n0, n0+16), k in [16ks, 16ks+16).
// b[0], b[1] = n-tile n0..n0+7; b[2], b[3] = n-tile n0+8..n0+15.
template <int COLS>
__device__ __forceinline__ void load_b_frags_nk(uint32_t (&b)[4], const void* tile, int n0, int ks,
                                                int lane) {
  const int row = n0 + ((lane >> 4) << 3) + (lane & 7);
  const int chunk = 2 * ks + ((lane >> 3) & 1);
  ldmatrix_x4(b, smem_u32(static_cast<const uint16_t*>(tile) + swizzle<COLS>(row, chunk)));
}

// B fragments of two n-tiles where the tile stores B as is, i.e. rows = k, cols = n
// (V in P V): k in [k0, k0+16), n in [8 nc, 8 nc + 16) (nc = 16-byte chunk, even).
// b[0], b[1] = n-tile at chunk nc; b[2], b[3] = n-tile at chunk nc+1.
template <int COLS>
__device__ __forceinline__ void load_b_frags_kn(uint32_t (&b)[4], const void* tile, int k0, int nc,
                                                int lane) {
  const int row = k0 + (lane & 7) + (((lane >> 3) & 1) << 3);
  const int chunk = nc + (lane >> 4);
  ldmatrix_x4_trans(b, smem_u32(static_cast<const uint16_t*>(tile) + swizzle<COLS>(row, chunk)));
}

// A fragment where the tile stores A transposed (rows = k, cols = m): m in [16 mt, 16 mt + 16),
// k in [k0, k0+16). Used for dS in dQ = dS K with dS^T in shared memory.
template <int COLS>
__device__ __forceinline__ void load_a_frag_km(uint32_t (&a)[4], const void* tile, int k0, int mt,
                                               int lane) {
  const int row = k0 + (lane & 7) + ((lane >> 4) << 3);
  const int chunk = 2 * mt + ((lane >> 3) & 1);
  ldmatrix_x4_trans(a, smem_u32(static_cast<const uint16_t*>(tile) + swizzle<COLS>(row, chunk)));
}

// ---------------------------------------------------------------------------------------------
// cp.async (sm_80+): global -> shared without registers.

// Asynchronously loads rows [row0, row0 + ROWS) x COLS of a [T, heads, COLS] tensor (already
// offset to one head) into a swizzled tile; rows >= num_rows are zero-filled.
template <int ROWS, int COLS, int NTHREADS, typename Elem>
__device__ __forceinline__ void load_tile_async(Elem* tile, const Elem* src, int64_t row_stride,
                                                int row0, int num_rows) {
  constexpr int kChunksPerRow = COLS / 8;
  constexpr int kChunks = ROWS * kChunksPerRow;
  static_assert(kChunks % NTHREADS == 0, "tile chunks must split evenly over the threads");
#pragma unroll
  for (int i = 0; i < kChunks / NTHREADS; ++i) {
    const int c = i * NTHREADS + static_cast<int>(threadIdx.x);
    const int r = c / kChunksPerRow;
    const int chunk = c % kChunksPerRow;
    const int row = row0 + r;
    const bool valid = row < num_rows;
    const Elem* g = src + static_cast<int64_t>(valid ? row : 0) * row_stride + chunk * 8;
    cp_async_16(smem_u32(tile + swizzle<COLS>(r, chunk)), g, valid);
  }
}

// Asynchronously loads ROWS floats src[row0 .. row0 + ROWS) (zero past num_rows); threads
// first_thread .. first_thread + ROWS - 1 issue one copy each.
template <int ROWS>
__device__ __forceinline__ void load_vec_async(float* dst, const float* src, int row0, int num_rows,
                                               int first_thread) {
  const int r = static_cast<int>(threadIdx.x) - first_thread;
  if (r >= 0 && r < ROWS) {
    const int row = row0 + r;
    const bool valid = row < num_rows;
    cp_async_4(smem_u32(dst + r), src + (valid ? row : 0), valid);
  }
}

// ---------------------------------------------------------------------------------------------
// Math.

// Zeroes N C fragments (accumulators of N m16n8 tiles).
template <int N>
__device__ __forceinline__ void zero_fragments(float (&c)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    c[i][0] = c[i][1] = c[i][2] = c[i][3] = 0.f;
  }
}

// Reductions over the 4 lanes of a quad (the lanes that share one C-fragment row).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace modus_attn
