// Host interface of the modus_attn kernels: tile shapes, parameter blocks and launchers.
//
// This header needs only the CUDA runtime (no ATen), so every .cu file compiles standalone
// with nvcc; modus_attn_api.cpp turns torch tensors into these parameter blocks.
//
// Layouts (T = tokens (keys) of the packed micro-batch, Tq = query rows, Hq / Hkv = query /
// key-value heads, D = head dim, g = Hq / Hkv). Query row r sits at absolute position
// q_offset + r of the T keys (queries over a cache, forward only); the backward needs
// q_offset = 0 and Tq = T.
//   q, out, dout, dq      [Tq, Hq, D]  element (t, h, d) at t * row_stride + h * head_stride + d
//   k, v, dk, dv          [T, Hkv, D]  same; query head h reads key-value head h / g
//   lse, delta            [Hq, Tq]     fp32, natural-log log-sum-exp of the scaled scores
//   lo, hi                [T]          int32; key k is visible to the query rows at absolute
//                                      positions [lo[k], hi[k])
//   dq_accum              [T, Hq, D]   fp32 (non-deterministic backward only)
//   block lists           [num_outer, num_inner] int32, entry = (inner_block << 1) | partial,
//                         -1 after the first `counts[outer]` entries (see block_metadata.py)
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace modus_attn {

// Tile shapes. The block metadata is built for exactly these shapes (block_metadata.py keeps
// the same constants); changing one means rebuilding both.
constexpr int kFwdBlockQ = 128;   // query rows per forward / dQ tile (8 warps x 16 rows)
constexpr int kFwdBlockK = 64;    // keys per forward / dQ tile
constexpr int kBwdBlockQ = 64;    // query rows per dK/dV step
constexpr int kBwdBlockK = 128;   // keys per dK/dV thread block (8 warps x 16 keys)
constexpr int kNumThreads = 256;  // every attention kernel runs 8 warps

enum class DType : int { kBF16 = 0, kFP16 = 1 };

// Strides are in elements; the last dimension is contiguous.
struct TensorLayout {
  int64_t row_stride;   // between consecutive tokens
  int64_t head_stride;  // between consecutive heads
};

// Per-query-block (or per-key-block) list of the tiles that are not skipped.
struct BlockList {
  const int32_t* blocks;  // [num_outer, row_stride] entries (inner << 1) | partial
  const int32_t* counts;  // [num_outer] number of valid entries per row
  const int32_t* order;   // [num_outer] outer blocks, most tiles first (launch order)
  int row_stride;         // = number of inner blocks
  int num_outer;
};

struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  const int32_t* lo;
  const int32_t* hi;
  TensorLayout q_layout, k_layout, v_layout, out_layout;
  BlockList fwd_list;  // query blocks of kFwdBlockQ -> key blocks of kFwdBlockK
  int num_tokens;   // T, the keys
  int num_queries;  // Tq, the query rows; q_offset + num_queries <= num_tokens
  int q_offset;     // absolute position of query row 0
  int num_q_heads;
  int num_kv_heads;
  float scale;  // softmax scale applied to q . k
};

struct BwdParams {
  const void* q;
  const void* k;
  const void* v;
  const void* out;
  const void* dout;
  const float* lse;       // [Hq, T]
  const float* grad_lse;  // [Hq, T] or nullptr
  float* delta;           // [Hq, T] workspace: rowsum(dout * out) - grad_lse
  void* dq;
  void* dk;
  void* dv;
  float* dq_accum;  // [T, Hq, D] zero-initialised workspace; nullptr in deterministic mode
  const int32_t* lo;
  const int32_t* hi;
  TensorLayout q_layout, k_layout, v_layout, out_layout, dout_layout;
  TensorLayout dq_layout, dk_layout, dv_layout;
  BlockList fwd_list;  // used by the deterministic dQ kernel
  BlockList bwd_list;  // key blocks of kBwdBlockK -> query blocks of kBwdBlockQ
  int num_tokens;
  int num_q_heads;
  int num_kv_heads;
  float scale;
  bool deterministic;
};

// Each launcher returns the launch error (cudaSuccess when all kernels were queued).
// head_dim must be 64 or 128.
cudaError_t launch_attention_forward(const FwdParams& params, DType dtype, int head_dim,
                                     cudaStream_t stream);
cudaError_t launch_attention_backward(const BwdParams& params, DType dtype, int head_dim,
                                      cudaStream_t stream);

// Block metadata.
// bounds[j] = {lo_min, lo_max, hi_min, hi_max} over keys [j * block_k, min((j+1) * block_k, T))
// after clamping lo, hi into [0, T] and mapping empty intervals (lo >= hi) to (T, 0).
cudaError_t launch_key_block_bounds(const int32_t* lo, const int32_t* hi, int num_tokens,
                                    int block_k, int32_t* bounds, cudaStream_t stream);
// Tile lists from the bounds. by_key == false: one row per query block of block_q listing its
// key blocks of block_k; by_key == true: one row per key block listing its query blocks. The
// query rows are the absolute positions [q_offset, q_offset + num_queries) of the keys.
cudaError_t launch_tile_lists(const int32_t* bounds, int num_tokens, int num_queries,
                              int q_offset, int block_q, int block_k, bool by_key,
                              int32_t* blocks, int32_t* counts, cudaStream_t stream);

}  // namespace modus_attn
