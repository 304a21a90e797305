// Backward kernels. With P = exp(scale * q k^T - lse) (masked entries 0), the gradients are
//   dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   delta = rowsum(dO * O) - dLSE,
//   dQ = scale * dS K,   dK = scale * dS^T Q
// (dLSE, the gradient flowing into the returned log-sum-exp, enters through delta because
// d lse / d s = P). Kernels, in launch order:
//   1. delta_kernel: delta [Hq, T].
//   2. dkdv_kernel<kAtomicDq>: one thread block per key block of kBwdBlockK = 128 keys and
//      key-value head; it owns dK, dV of its keys in registers (warp w: keys [16w, 16w+16)),
//      and walks every query head of the GQA group and every query block of kBwdBlockQ = 64
//      rows in its list. dK/dV therefore need no cross-block reduction and are deterministic.
//      With kAtomicDq it also forms dQ = dS K for the 64 rows through shared memory and adds
//      it into the fp32 workspace dq_accum with atomics (fast, order not deterministic).
//   3a. (default) dq_convert_kernel: dq = scale * dq_accum in the input precision.
//   3b. (deterministic) dq_kernel: one thread block per query block of 128 rows and query
//      head recomputes S and dP over the forward's key-block list and accumulates dQ in
//      registers: each dQ element has one writer and a fixed summation order.
#pragma once

#include "device_utils.h"
#include "modus_attn.h"

namespace modus_attn {

// ---------------------------------------------------------------------------------------------
// 1. delta = rowsum(dout * out) - grad_lse, one (token, head) row per D/8 threads.

template <typename Elem, int D>
__global__ void __launch_bounds__(kNumThreads) delta_kernel(const BwdParams p) {
  using Traits = ElemTraits<Elem>;
  constexpr int kThreadsPerRow = D / 8;
  constexpr int kRowsPerBlock = kNumThreads / kThreadsPerRow;
  const int64_t row =
      static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreadsPerRow;
  const int part = threadIdx.x % kThreadsPerRow;
  const int64_t num_rows = static_cast<int64_t>(p.num_tokens) * p.num_q_heads;
  float acc = 0.f;
  int token = 0;
  int head = 0;
  if (row < num_rows) {
    token = static_cast<int>(row / p.num_q_heads);
    head = static_cast<int>(row % p.num_q_heads);
    const Elem* o = static_cast<const Elem*>(p.out) + token * p.out_layout.row_stride +
                    head * p.out_layout.head_stride + 8 * part;
    const Elem* d = static_cast<const Elem*>(p.dout) + token * p.dout_layout.row_stride +
                    head * p.dout_layout.head_stride + 8 * part;
    const uint4 ov = *reinterpret_cast<const uint4*>(o);
    const uint4 dv = *reinterpret_cast<const uint4*>(d);
    const uint32_t o_regs[4] = {ov.x, ov.y, ov.z, ov.w};
    const uint32_t d_regs[4] = {dv.x, dv.y, dv.z, dv.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 of = Traits::unpack(o_regs[i]);
      const float2 df = Traits::unpack(d_regs[i]);
      acc += of.x * df.x + of.y * df.y;
    }
  }
  // The kThreadsPerRow lanes of one row are consecutive and aligned inside the warp.
#pragma unroll
  for (int offset = kThreadsPerRow / 2; offset > 0; offset /= 2) {
    acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  }
  if (row < num_rows && part == 0) {
    const int64_t idx = static_cast<int64_t>(head) * p.num_tokens + token;
    p.delta[idx] = acc - (p.grad_lse != nullptr ? p.grad_lse[idx] : 0.f);
  }
}

// ---------------------------------------------------------------------------------------------
// 2. dK, dV (and atomic dQ).
//
// Shared memory (Elem unless noted):
//   sK [128][D] | sV [128][D] | sQ [2][64][D] | sdO [2][64][D] | sLse f32 [2][64] |
//   sDelta f32 [2][64] | sdS [128][64] (kAtomicDq only; dS^T, rows = keys)
// D = 128: 32 + 32 + 32 + 32 + 1 + 16 KiB = 145 KiB; D = 64: 81 KiB.

template <typename Elem, int D, bool kAtomicDq>
struct DkdvTile {
  static constexpr int kBlockK = kBwdBlockK;
  static constexpr int kBlockQ = kBwdBlockQ;
  static constexpr int kKVElems = kBlockK * D;
  static constexpr int kQElems = kBlockQ * D;
  static constexpr int kDsElems = kAtomicDq ? kBlockK * kBlockQ : 0;
  static constexpr int kSmemBytes =
      (2 * kKVElems + 4 * kQElems + kDsElems) * static_cast<int>(sizeof(Elem)) +
      4 * kBlockQ * static_cast<int>(sizeof(float));
  static_assert(kBlockK == 16 * (kNumThreads / 32), "one warp per 16 keys");
  static_assert(kBlockQ == 64, "the dS^T tile is swizzled as 64-column rows");
  static_assert(2 * kBlockQ <= kNumThreads, "one thread per lse and per delta element");
};

template <typename Elem, int D, bool kAtomicDq>
__global__ void __launch_bounds__(kNumThreads, 1) dkdv_kernel(const BwdParams p) {
  using Tile = DkdvTile<Elem, D, kAtomicDq>;
  using Traits = ElemTraits<Elem>;
  constexpr int kBlockK = Tile::kBlockK;
  constexpr int kBlockQ = Tile::kBlockQ;
  constexpr int kDSteps = D / 16;       // k-steps over the head dim
  constexpr int kQTiles = kBlockQ / 8;  // n-tiles of a 16 x 64 score block (8)
  constexpr int kDTiles = D / 8;        // n-tiles of a 16 x D gradient block

  extern __shared__ __align__(128) unsigned char smem[];
  Elem* sK = reinterpret_cast<Elem*>(smem);                      // [kBlockK][D]
  Elem* sV = sK + Tile::kKVElems;                                // [kBlockK][D]
  Elem* sQ = sV + Tile::kKVElems;                                // [2][kBlockQ][D]
  Elem* sdO = sQ + 2 * Tile::kQElems;                            // [2][kBlockQ][D]
  Elem* sdS = sdO + 2 * Tile::kQElems;                           // [kBlockK][kBlockQ] (kAtomicDq)
  float* sLse = reinterpret_cast<float*>(sdS + Tile::kDsElems);  // [2][kBlockQ]
  float* sDelta = sLse + 2 * kBlockQ;                            // [2][kBlockQ]

  const int num_tokens = p.num_tokens;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int key_block = p.bwd_list.order[blockIdx.x];
  const int kv_head = blockIdx.y;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int grp = lane / 4;
  const int quad = lane % 4;
  const int key0 = key_block * kBlockK;

  const int count = p.bwd_list.counts[key_block];
  const int32_t* tiles =
      p.bwd_list.blocks + static_cast<int64_t>(key_block) * p.bwd_list.row_stride;
  const int num_items = count * group;  // item i = (query head i / count, tile i % count)

  const Elem* k = static_cast<const Elem*>(p.k) + kv_head * p.k_layout.head_stride;
  const Elem* v = static_cast<const Elem*>(p.v) + kv_head * p.v_layout.head_stride;

  auto load_item = [&](int stage, int item) {
    const int head = kv_head * group + item / count;
    const int qrow0 = (tiles[item % count] >> 1) * kBlockQ;
    const Elem* q = static_cast<const Elem*>(p.q) + head * p.q_layout.head_stride;
    const Elem* dout = static_cast<const Elem*>(p.dout) + head * p.dout_layout.head_stride;
    load_tile_async<kBlockQ, D, kNumThreads>(sQ + stage * Tile::kQElems, q, p.q_layout.row_stride,
                                             qrow0, num_tokens);
    load_tile_async<kBlockQ, D, kNumThreads>(sdO + stage * Tile::kQElems, dout,
                                             p.dout_layout.row_stride, qrow0, num_tokens);
    const int64_t head_offset = static_cast<int64_t>(head) * num_tokens;
    load_vec_async<kBlockQ>(sLse + stage * kBlockQ, p.lse + head_offset, qrow0, num_tokens, 0);
    load_vec_async<kBlockQ>(sDelta + stage * kBlockQ, p.delta + head_offset, qrow0, num_tokens,
                            kBlockQ);
  };

  // Prologue: group 0 = K, V; group 1 = item 0 (empty when there is none).
  load_tile_async<kBlockK, D, kNumThreads>(sK, k, p.k_layout.row_stride, key0, num_tokens);
  load_tile_async<kBlockK, D, kNumThreads>(sV, v, p.v_layout.row_stride, key0, num_tokens);
  cp_async_commit();
  if (num_items > 0) load_item(0, 0);
  cp_async_commit();

  // This thread's two keys (rows grp and grp + 8 of the warp's 16). A key past T gets an empty
  // interval; hi is clamped to T so rows >= T are never visible.
  int key_lo[2];
  int key_hi[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int key = key0 + 16 * warp + grp + 8 * half;
    const bool real = key < num_tokens;
    key_lo[half] = real ? __ldg(p.lo + key) : 1;
    key_hi[half] = real ? min(__ldg(p.hi + key), num_tokens) : 0;
  }

  float dk_acc[kDTiles][4];
  float dv_acc[kDTiles][4];
  zero_fragments(dk_acc);
  zero_fragments(dv_acc);
  const float scale_log2 = p.scale * kLog2e;

  for (int item = 0; item < num_items; ++item) {
    const int stage = item & 1;
    const int head = kv_head * group + item / count;
    const int entry = tiles[item % count];
    const int qrow0 = (entry >> 1) * kBlockQ;
    // Stage stage ^ 1 was last read in iteration item - 1, which ended with __syncthreads().
    if (item + 1 < num_items) load_item(stage ^ 1, item + 1);
    cp_async_commit();
    cp_async_wait<1>();  // K, V and this item's tiles have landed
    __syncthreads();

    const Elem* tQ = sQ + stage * Tile::kQElems;
    const Elem* tdO = sdO + stage * Tile::kQElems;
    const float* tLse = sLse + stage * kBlockQ;
    const float* tDelta = sDelta + stage * kBlockQ;

    // S^T = K Q^T and dP^T = V dO^T, this warp's 16 keys x 64 query rows.
    float s[kQTiles][4];
    float dp[kQTiles][4];
    zero_fragments(s);
    zero_fragments(dp);
#pragma unroll
    for (int ks = 0; ks < kDSteps; ++ks) {
      uint32_t a_k[4];
      uint32_t a_v[4];
      load_a_frag<D>(a_k, sK, 16 * warp, ks, lane);
      load_a_frag<D>(a_v, sV, 16 * warp, ks, lane);
#pragma unroll
      for (int np = 0; np < kQTiles / 2; ++np) {
        uint32_t b[4];
        load_b_frags_nk<D>(b, tQ, 16 * np, ks, lane);
        Traits::mma(s[2 * np], a_k, b[0], b[1]);
        Traits::mma(s[2 * np + 1], a_k, b[2], b[3]);
        load_b_frags_nk<D>(b, tdO, 16 * np, ks, lane);
        Traits::mma(dp[2 * np], a_v, b[0], b[1]);
        Traits::mma(dp[2 * np + 1], a_v, b[2], b[3]);
      }
    }

    // Mask partial tiles and tiles that run past T on either side.
    if ((entry & 1) || qrow0 + kBlockQ > num_tokens || key0 + kBlockK > num_tokens) {
#pragma unroll
      for (int nt = 0; nt < kQTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int row = qrow0 + 8 * nt + 2 * quad + e;
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            if (!(key_lo[half] <= row && row < key_hi[half])) s[nt][2 * half + e] = neg_inf();
          }
        }
      }
    }

    // P^T = exp2(scale_log2 * s - log2(e) * lse); a row without visible keys has lse = -inf
    // and P = 0 there, hence the +inf. Then dS^T = P^T * (dP^T - delta), in place in dp.
#pragma unroll
    for (int nt = 0; nt < kQTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = 8 * nt + 2 * quad + e;
        const float lse = tLse[col];
        const float lse_log2 = lse == neg_inf() ? pos_inf() : lse * kLog2e;
        const float delta = tDelta[col];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const float prob = fast_exp2(fmaf(s[nt][2 * half + e], scale_log2, -lse_log2));
          s[nt][2 * half + e] = prob;
          dp[nt][2 * half + e] = prob * (dp[nt][2 * half + e] - delta);
        }
      }
    }

    // dV += P^T dO and dK += dS^T Q (k = the 64 query rows, 4 steps of 16).
#pragma unroll
    for (int ks = 0; ks < kBlockQ / 16; ++ks) {
      const uint32_t a_p[4] = {Traits::pack(s[2 * ks][0], s[2 * ks][1]),
                               Traits::pack(s[2 * ks][2], s[2 * ks][3]),
                               Traits::pack(s[2 * ks + 1][0], s[2 * ks + 1][1]),
                               Traits::pack(s[2 * ks + 1][2], s[2 * ks + 1][3])};
      const uint32_t a_ds[4] = {Traits::pack(dp[2 * ks][0], dp[2 * ks][1]),
                                Traits::pack(dp[2 * ks][2], dp[2 * ks][3]),
                                Traits::pack(dp[2 * ks + 1][0], dp[2 * ks + 1][1]),
                                Traits::pack(dp[2 * ks + 1][2], dp[2 * ks + 1][3])};
#pragma unroll
      for (int np = 0; np < kDTiles / 2; ++np) {
        uint32_t b[4];
        load_b_frags_kn<D>(b, tdO, 16 * ks, 2 * np, lane);
        Traits::mma(dv_acc[2 * np], a_p, b[0], b[1]);
        Traits::mma(dv_acc[2 * np + 1], a_p, b[2], b[3]);
        load_b_frags_kn<D>(b, tQ, 16 * ks, 2 * np, lane);
        Traits::mma(dk_acc[2 * np], a_ds, b[0], b[1]);
        Traits::mma(dk_acc[2 * np + 1], a_ds, b[2], b[3]);
      }
    }

    if constexpr (kAtomicDq) {
      // dS^T -> shared memory (rows = keys), then dQ (64 rows x D) = dS K split over the
      // warps: warp w takes the 16 rows of m-tile w % 4 and the half (w / 4) of the head dim.
#pragma unroll
      for (int nt = 0; nt < kQTiles; ++nt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int r = 16 * warp + grp + 8 * half;
          *reinterpret_cast<uint32_t*>(sdS + swizzle<kBlockQ>(r, nt) + 2 * quad) =
              Traits::pack(dp[nt][2 * half], dp[nt][2 * half + 1]);
        }
      }
      __syncthreads();

      constexpr int kHalfDTiles = kDTiles / 2;
      const int mt = warp % 4;
      const int dtile0 = (warp / 4) * kHalfDTiles;
      float dq[kHalfDTiles][4];
      zero_fragments(dq);
#pragma unroll
      for (int ks = 0; ks < kBlockK / 16; ++ks) {
        uint32_t a[4];
        load_a_frag_km<kBlockQ>(a, sdS, 16 * ks, mt, lane);
#pragma unroll
        for (int np = 0; np < kHalfDTiles / 2; ++np) {
          uint32_t b[4];
          load_b_frags_kn<D>(b, sK, 16 * ks, dtile0 + 2 * np, lane);
          Traits::mma(dq[2 * np], a, b[0], b[1]);
          Traits::mma(dq[2 * np + 1], a, b[2], b[3]);
        }
      }
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = qrow0 + 16 * mt + grp + 8 * half;
        if (row < num_tokens) {
          float* dst = p.dq_accum + (static_cast<int64_t>(row) * p.num_q_heads + head) * D;
#pragma unroll
          for (int nt = 0; nt < kHalfDTiles; ++nt) {
            atomic_add_f32x2(dst + 8 * (dtile0 + nt) + 2 * quad, dq[nt][2 * half],
                             dq[nt][2 * half + 1]);
          }
        }
      }
    }
    __syncthreads();  // the stage (and sdS) are free for the next iteration
  }

  // Epilogue: stage dK (scaled) and dV in this warp's own rows of sK and sV, store 16-byte
  // chunks. The wait covers the K/V group when the loop did not run.
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int nt = 0; nt < kDTiles; ++nt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = 16 * warp + grp + 8 * half;
      *reinterpret_cast<uint32_t*>(sK + swizzle<D>(r, nt) + 2 * quad) =
          Traits::pack(dk_acc[nt][2 * half] * p.scale, dk_acc[nt][2 * half + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(sV + swizzle<D>(r, nt) + 2 * quad) =
          Traits::pack(dv_acc[nt][2 * half], dv_acc[nt][2 * half + 1]);
    }
  }
  __syncwarp();
  Elem* dk = static_cast<Elem*>(p.dk) + kv_head * p.dk_layout.head_stride;
  Elem* dv = static_cast<Elem*>(p.dv) + kv_head * p.dv_layout.head_stride;
  constexpr int kChunksPerRow = D / 8;
#pragma unroll
  for (int i = 0; i < 16 * kChunksPerRow / 32; ++i) {
    const int c = i * 32 + lane;
    const int r = 16 * warp + c / kChunksPerRow;
    const int chunk = c % kChunksPerRow;
    const int key = key0 + r;
    if (key < num_tokens) {
      *reinterpret_cast<uint4*>(dk + static_cast<int64_t>(key) * p.dk_layout.row_stride +
                                8 * chunk) =
          *reinterpret_cast<const uint4*>(sK + swizzle<D>(r, chunk));
      *reinterpret_cast<uint4*>(dv + static_cast<int64_t>(key) * p.dv_layout.row_stride +
                                8 * chunk) =
          *reinterpret_cast<const uint4*>(sV + swizzle<D>(r, chunk));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 3a. dq = scale * dq_accum, 8 elements per thread.

template <typename Elem>
__global__ void __launch_bounds__(kNumThreads) dq_convert_kernel(const BwdParams p, int head_dim) {
  using Traits = ElemTraits<Elem>;
  const int64_t num_chunks = static_cast<int64_t>(p.num_tokens) * p.num_q_heads * head_dim / 8;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kNumThreads + threadIdx.x;
  if (c >= num_chunks) return;
  const int64_t row = c / (head_dim / 8);  // token * Hq + head
  const int part = static_cast<int>(c % (head_dim / 8));
  const int token = static_cast<int>(row / p.num_q_heads);
  const int head = static_cast<int>(row % p.num_q_heads);
  const float4* src = reinterpret_cast<const float4*>(p.dq_accum + 8 * c);
  const float4 x = src[0];
  const float4 y = src[1];
  const uint4 packed = {
      Traits::pack(x.x * p.scale, x.y * p.scale), Traits::pack(x.z * p.scale, x.w * p.scale),
      Traits::pack(y.x * p.scale, y.y * p.scale), Traits::pack(y.z * p.scale, y.w * p.scale)};
  Elem* dst = static_cast<Elem*>(p.dq) + token * p.dq_layout.row_stride +
              head * p.dq_layout.head_stride + 8 * part;
  *reinterpret_cast<uint4*>(dst) = packed;
}

// ---------------------------------------------------------------------------------------------
// 3b. Deterministic dQ. Same tiling as the forward (128 rows x 64 keys, warp w owns rows
// [16w, 16w + 16)).
//
// Shared memory: sQ [128][D] | sdO [128][D] | sK [2][64][D] | sV [2][64][D]
// D = 128: 32 + 32 + 32 + 32 KiB = 128 KiB; D = 64: 64 KiB.

template <typename Elem, int D>
struct DqTile {
  static constexpr int kBlockQ = kFwdBlockQ;
  static constexpr int kBlockK = kFwdBlockK;
  static constexpr int kQElems = kBlockQ * D;
  static constexpr int kKVElems = kBlockK * D;
  static constexpr int kSmemBytes = (2 * kQElems + 4 * kKVElems) * static_cast<int>(sizeof(Elem));
  static_assert(kBlockQ == 16 * (kNumThreads / 32), "one warp per 16 query rows");
};

template <typename Elem, int D>
__global__ void __launch_bounds__(kNumThreads, 1) dq_kernel(const BwdParams p) {
  using Tile = DqTile<Elem, D>;
  using Traits = ElemTraits<Elem>;
  constexpr int kBlockQ = Tile::kBlockQ;
  constexpr int kBlockK = Tile::kBlockK;
  constexpr int kDSteps = D / 16;
  constexpr int kKTiles = kBlockK / 8;  // n-tiles of a 16 x 64 score block
  constexpr int kDTiles = D / 8;

  extern __shared__ __align__(128) unsigned char smem[];
  Elem* sQ = reinterpret_cast<Elem*>(smem);  // [kBlockQ][D]
  Elem* sdO = sQ + Tile::kQElems;            // [kBlockQ][D]
  Elem* sK = sdO + Tile::kQElems;            // [2][kBlockK][D]
  Elem* sV = sK + 2 * Tile::kKVElems;        // [2][kBlockK][D]

  const int num_tokens = p.num_tokens;
  const int q_block = p.fwd_list.order[blockIdx.x];
  const int head = blockIdx.y;
  const int kv_head = head / (p.num_q_heads / p.num_kv_heads);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int grp = lane / 4;
  const int quad = lane % 4;
  const int row0 = q_block * kBlockQ;

  const int num_tiles = p.fwd_list.counts[q_block];
  const int32_t* tiles = p.fwd_list.blocks + static_cast<int64_t>(q_block) * p.fwd_list.row_stride;

  const Elem* q = static_cast<const Elem*>(p.q) + head * p.q_layout.head_stride;
  const Elem* dout = static_cast<const Elem*>(p.dout) + head * p.dout_layout.head_stride;
  const Elem* k = static_cast<const Elem*>(p.k) + kv_head * p.k_layout.head_stride;
  const Elem* v = static_cast<const Elem*>(p.v) + kv_head * p.v_layout.head_stride;

  auto load_kv = [&](int stage, int key_block) {
    const int key0 = key_block * kBlockK;
    load_tile_async<kBlockK, D, kNumThreads>(sK + stage * Tile::kKVElems, k, p.k_layout.row_stride,
                                             key0, num_tokens);
    load_tile_async<kBlockK, D, kNumThreads>(sV + stage * Tile::kKVElems, v, p.v_layout.row_stride,
                                             key0, num_tokens);
  };

  // Prologue: group 0 = Q, dO; group 1 = the first K/V tile (empty when there is none).
  load_tile_async<kBlockQ, D, kNumThreads>(sQ, q, p.q_layout.row_stride, row0, num_tokens);
  load_tile_async<kBlockQ, D, kNumThreads>(sdO, dout, p.dout_layout.row_stride, row0, num_tokens);
  cp_async_commit();
  if (num_tiles > 0) load_kv(0, tiles[0] >> 1);
  cp_async_commit();

  const int my_row[2] = {row0 + 16 * warp + grp, row0 + 16 * warp + grp + 8};
  float lse_log2[2];  // +inf for rows without visible keys and rows >= T: P = 0 there
  float delta[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const bool real = my_row[half] < num_tokens;
    const int64_t idx = static_cast<int64_t>(head) * num_tokens + my_row[half];
    const float lse = real ? p.lse[idx] : neg_inf();
    lse_log2[half] = lse == neg_inf() ? pos_inf() : lse * kLog2e;
    delta[half] = real ? p.delta[idx] : 0.f;
  }

  cp_async_wait<1>();
  __syncthreads();
  uint32_t q_frag[kDSteps][4];
#pragma unroll
  for (int ks = 0; ks < kDSteps; ++ks) load_a_frag<D>(q_frag[ks], sQ, 16 * warp, ks, lane);

  float dq_acc[kDTiles][4];
  zero_fragments(dq_acc);
  const float scale_log2 = p.scale * kLog2e;

  for (int t = 0; t < num_tiles; ++t) {
    const int stage = t & 1;
    const int entry = tiles[t];
    if (t + 1 < num_tiles) load_kv(stage ^ 1, tiles[t + 1] >> 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const Elem* tK = sK + stage * Tile::kKVElems;
    const Elem* tV = sV + stage * Tile::kKVElems;
    const int key0 = (entry >> 1) * kBlockK;

    // S = Q K^T and dP = dO V^T, this warp's 16 rows x 64 keys.
    float s[kKTiles][4];
    float dp[kKTiles][4];
    zero_fragments(s);
    zero_fragments(dp);
#pragma unroll
    for (int ks = 0; ks < kDSteps; ++ks) {
      uint32_t a_do[4];
      load_a_frag<D>(a_do, sdO, 16 * warp, ks, lane);
#pragma unroll
      for (int np = 0; np < kKTiles / 2; ++np) {
        uint32_t b[4];
        load_b_frags_nk<D>(b, tK, 16 * np, ks, lane);
        Traits::mma(s[2 * np], q_frag[ks], b[0], b[1]);
        Traits::mma(s[2 * np + 1], q_frag[ks], b[2], b[3]);
        load_b_frags_nk<D>(b, tV, 16 * np, ks, lane);
        Traits::mma(dp[2 * np], a_do, b[0], b[1]);
        Traits::mma(dp[2 * np + 1], a_do, b[2], b[3]);
      }
    }

    if ((entry & 1) || key0 + kBlockK > num_tokens) {
#pragma unroll
      for (int nt = 0; nt < kKTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = key0 + 8 * nt + 2 * quad + e;
          const bool real = key < num_tokens;
          const int lo = real ? __ldg(p.lo + key) : 1;
          const int hi = real ? __ldg(p.hi + key) : 0;
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            if (!(lo <= my_row[half] && my_row[half] < hi)) s[nt][2 * half + e] = neg_inf();
          }
        }
      }
    }

    // dS = P * (dP - delta), in place in dp.
#pragma unroll
    for (int nt = 0; nt < kKTiles; ++nt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float prob = fast_exp2(fmaf(s[nt][2 * half + e], scale_log2, -lse_log2[half]));
          dp[nt][2 * half + e] = prob * (dp[nt][2 * half + e] - delta[half]);
        }
      }
    }

    // dQ += dS K (k = the 64 keys).
#pragma unroll
    for (int ks = 0; ks < kBlockK / 16; ++ks) {
      const uint32_t a[4] = {Traits::pack(dp[2 * ks][0], dp[2 * ks][1]),
                             Traits::pack(dp[2 * ks][2], dp[2 * ks][3]),
                             Traits::pack(dp[2 * ks + 1][0], dp[2 * ks + 1][1]),
                             Traits::pack(dp[2 * ks + 1][2], dp[2 * ks + 1][3])};
#pragma unroll
      for (int np = 0; np < kDTiles / 2; ++np) {
        uint32_t b[4];
        load_b_frags_kn<D>(b, tK, 16 * ks, 2 * np, lane);
        Traits::mma(dq_acc[2 * np], a, b[0], b[1]);
        Traits::mma(dq_acc[2 * np + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();
  }

  // Epilogue: stage in this warp's own rows of sQ (read only by this warp), store.
  __syncwarp();
#pragma unroll
  for (int nt = 0; nt < kDTiles; ++nt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = 16 * warp + grp + 8 * half;
      *reinterpret_cast<uint32_t*>(sQ + swizzle<D>(r, nt) + 2 * quad) =
          Traits::pack(dq_acc[nt][2 * half] * p.scale, dq_acc[nt][2 * half + 1] * p.scale);
    }
  }
  __syncwarp();
  Elem* dq = static_cast<Elem*>(p.dq) + head * p.dq_layout.head_stride;
  constexpr int kChunksPerRow = D / 8;
#pragma unroll
  for (int i = 0; i < 16 * kChunksPerRow / 32; ++i) {
    const int c = i * 32 + lane;
    const int r = 16 * warp + c / kChunksPerRow;
    const int chunk = c % kChunksPerRow;
    if (row0 + r < num_tokens) {
      *reinterpret_cast<uint4*>(dq + static_cast<int64_t>(row0 + r) * p.dq_layout.row_stride +
                                8 * chunk) =
          *reinterpret_cast<const uint4*>(sQ + swizzle<D>(r, chunk));
    }
  }
}

}  // namespace modus_attn
