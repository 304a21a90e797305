// Forward kernel: out = softmax(scale * q k^T + mask) v over the tiles of the block list, and
// the log-sum-exp of every query row. Query row r sits at absolute position q_offset + r of the
// keys (queries over a cache); the mask compares absolute positions, everything else indexes
// query rows.
//
// Thread block = one query block of kFwdBlockQ = 128 rows x one query head; 8 warps, warp w
// owns rows [16w, 16w + 16) for the whole kernel (Q fragments, O accumulator, softmax state
// all in registers). The block walks its key blocks of kFwdBlockK = 64 keys from the list,
// two shared-memory stages deep (tile t + 1 loads while tile t computes).
//
// Shared memory (elements of Elem):  sQ [128][D] | sK [2][64][D] | sV [2][64][D]
// D = 128: 32 + 32 + 32 KiB = 96 KiB; D = 64: 48 KiB.
#pragma once

#include "device_utils.h"
#include "modus_attn.h"

namespace modus_attn {

template <typename Elem, int D>
struct FwdTile {
  static constexpr int kBlockQ = kFwdBlockQ;
  static constexpr int kBlockK = kFwdBlockK;
  static constexpr int kQElems = kBlockQ * D;
  static constexpr int kKVElems = kBlockK * D;
  static constexpr int kSmemBytes = (kQElems + 4 * kKVElems) * static_cast<int>(sizeof(Elem));
  static_assert(kBlockQ == 16 * (kNumThreads / 32), "one warp per 16 query rows");
  static_assert(kBlockK % 16 == 0 && D % 16 == 0, "mma tiles are 16 wide");
};

template <typename Elem, int D>
__global__ void __launch_bounds__(kNumThreads, 1) attention_forward_kernel(const FwdParams p) {
  using Tile = FwdTile<Elem, D>;
  using Traits = ElemTraits<Elem>;
  constexpr int kBlockQ = Tile::kBlockQ;
  constexpr int kBlockK = Tile::kBlockK;
  constexpr int kKSteps = D / 16;       // k-steps of q k^T
  constexpr int kSTiles = kBlockK / 8;  // n-tiles of one score row block (8)
  constexpr int kOTiles = D / 8;        // n-tiles of the output row block

  extern __shared__ __align__(128) unsigned char smem[];
  Elem* sQ = reinterpret_cast<Elem*>(smem);  // [kBlockQ][D]
  Elem* sK = sQ + Tile::kQElems;             // [2][kBlockK][D]
  Elem* sV = sK + 2 * Tile::kKVElems;        // [2][kBlockK][D]

  const int num_tokens = p.num_tokens;    // keys
  const int num_queries = p.num_queries;  // query rows
  const int q_block = p.fwd_list.order[blockIdx.x];
  const int head = blockIdx.y;
  const int kv_head = head / (p.num_q_heads / p.num_kv_heads);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int grp = lane / 4;
  const int quad = lane % 4;
  const int row0 = q_block * kBlockQ;  // first query row of the block

  const int num_tiles = p.fwd_list.counts[q_block];
  const int32_t* tiles = p.fwd_list.blocks + static_cast<int64_t>(q_block) * p.fwd_list.row_stride;

  const Elem* q = static_cast<const Elem*>(p.q) + head * p.q_layout.head_stride;
  const Elem* k = static_cast<const Elem*>(p.k) + kv_head * p.k_layout.head_stride;
  const Elem* v = static_cast<const Elem*>(p.v) + kv_head * p.v_layout.head_stride;

  auto load_kv = [&](int stage, int key_block) {
    const int key0 = key_block * kBlockK;
    load_tile_async<kBlockK, D, kNumThreads>(sK + stage * Tile::kKVElems, k, p.k_layout.row_stride,
                                             key0, num_tokens);
    load_tile_async<kBlockK, D, kNumThreads>(sV + stage * Tile::kKVElems, v, p.v_layout.row_stride,
                                             key0, num_tokens);
  };

  // Prologue: group 0 = Q, group 1 = the first K/V tile (empty when there is none).
  load_tile_async<kBlockQ, D, kNumThreads>(sQ, q, p.q_layout.row_stride, row0, num_queries);
  cp_async_commit();
  if (num_tiles > 0) load_kv(0, tiles[0] >> 1);
  cp_async_commit();
  cp_async_wait<1>();
  __syncthreads();

  uint32_t q_frag[kKSteps][4];  // this warp's 16 rows of Q, as A fragments
#pragma unroll
  for (int ks = 0; ks < kKSteps; ++ks) load_a_frag<D>(q_frag[ks], sQ, 16 * warp, ks, lane);

  // Row state for this thread's two rows grp and grp + 8 of the warp's 16: query rows, and
  // their absolute positions, which the mask compares with lo/hi.
  const int my_row[2] = {row0 + 16 * warp + grp, row0 + 16 * warp + grp + 8};
  const int my_pos[2] = {p.q_offset + my_row[0], p.q_offset + my_row[1]};
  float row_max[2] = {neg_inf(), neg_inf()};  // max raw score so far (-inf: nothing seen)
  float row_sum[2] = {0.f, 0.f};  // this thread's part of sum exp(scale * (s - row_max))
  float o_acc[kOTiles][4];
  zero_fragments(o_acc);

  const float scale_log2 = p.scale * kLog2e;

  for (int t = 0; t < num_tiles; ++t) {
    const int stage = t & 1;
    const int entry = tiles[t];
    // Stage stage ^ 1 was last read in iteration t - 1, which ended with __syncthreads().
    if (t + 1 < num_tiles) load_kv(stage ^ 1, tiles[t + 1] >> 1);
    cp_async_commit();
    cp_async_wait<1>();  // every group but the newest is done: K/V of tile t have landed
    __syncthreads();

    const Elem* tK = sK + stage * Tile::kKVElems;
    const Elem* tV = sV + stage * Tile::kKVElems;
    const int key0 = (entry >> 1) * kBlockK;

    // S = Q K^T for this warp's 16 rows x 64 keys.
    float s[kSTiles][4];
    zero_fragments(s);
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
#pragma unroll
      for (int np = 0; np < kSTiles / 2; ++np) {
        uint32_t b[4];
        load_b_frags_nk<D>(b, tK, 16 * np, ks, lane);
        Traits::mma(s[2 * np], q_frag[ks], b[0], b[1]);
        Traits::mma(s[2 * np + 1], q_frag[ks], b[2], b[3]);
      }
    }

    // Elementwise mask on partial tiles and on the key block that runs past T (its keys
    // >= T exist only as zero-filled rows). Rows >= Tq are never stored, so need no mask.
    if ((entry & 1) || key0 + kBlockK > num_tokens) {
#pragma unroll
      for (int nt = 0; nt < kSTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = key0 + 8 * nt + 2 * quad + e;
          const bool real = key < num_tokens;
          const int lo = real ? __ldg(p.lo + key) : 1;
          const int hi = real ? __ldg(p.hi + key) : 0;
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            if (!(lo <= my_pos[half] && my_pos[half] < hi)) s[nt][2 * half + e] = neg_inf();
          }
        }
      }
    }

    // Online softmax. A row with no visible key so far keeps row_max = -inf; it then uses 0
    // as the reference so exp2(-inf - 0) = 0 instead of exp2(-inf + inf) = NaN.
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float tile_max = neg_inf();
#pragma unroll
      for (int nt = 0; nt < kSTiles; ++nt) {
        tile_max = fmaxf(tile_max, fmaxf(s[nt][2 * half], s[nt][2 * half + 1]));
      }
      const float new_max = fmaxf(row_max[half], quad_max(tile_max));
      const float ref = new_max == neg_inf() ? 0.f : new_max * scale_log2;
      const float alpha = fast_exp2(row_max[half] * scale_log2 - ref);  // 0 when row_max = -inf
      row_max[half] = new_max;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kSTiles; ++nt) {
        s[nt][2 * half] = fast_exp2(fmaf(s[nt][2 * half], scale_log2, -ref));
        s[nt][2 * half + 1] = fast_exp2(fmaf(s[nt][2 * half + 1], scale_log2, -ref));
        sum += s[nt][2 * half] + s[nt][2 * half + 1];
      }
      row_sum[half] = row_sum[half] * alpha + sum;
#pragma unroll
      for (int nt = 0; nt < kOTiles; ++nt) {
        o_acc[nt][2 * half] *= alpha;
        o_acc[nt][2 * half + 1] *= alpha;
      }
    }

    // O += P V; the probabilities go from C to A fragments in registers.
#pragma unroll
    for (int ks = 0; ks < kBlockK / 16; ++ks) {
      const uint32_t a[4] = {Traits::pack(s[2 * ks][0], s[2 * ks][1]),
                             Traits::pack(s[2 * ks][2], s[2 * ks][3]),
                             Traits::pack(s[2 * ks + 1][0], s[2 * ks + 1][1]),
                             Traits::pack(s[2 * ks + 1][2], s[2 * ks + 1][3])};
#pragma unroll
      for (int np = 0; np < kOTiles / 2; ++np) {
        uint32_t b[4];
        load_b_frags_kn<D>(b, tV, 16 * ks, 2 * np, lane);
        Traits::mma(o_acc[2 * np], a, b[0], b[1]);
        Traits::mma(o_acc[2 * np + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // all warps are done with this stage before iteration t + 1 refills it
  }

  // Epilogue. Rows with no visible key get out = 0 and lse = -inf.
  float inv_sum[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const float total = quad_sum(row_sum[half]);
    inv_sum[half] = total > 0.f ? 1.f / total : 0.f;
    if (quad == 0 && my_row[half] < num_queries) {
      p.lse[static_cast<int64_t>(head) * num_queries + my_row[half]] =
          total > 0.f ? row_max[half] * p.scale + logf(total) : neg_inf();
    }
  }

  // Stage this warp's 16 output rows in its own 16 rows of sQ (no other warp reads them after
  // the prologue), then store 16-byte chunks.
  __syncwarp();
#pragma unroll
  for (int nt = 0; nt < kOTiles; ++nt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = 16 * warp + grp + 8 * half;
      *reinterpret_cast<uint32_t*>(sQ + swizzle<D>(r, nt) + 2 * quad) = Traits::pack(
          o_acc[nt][2 * half] * inv_sum[half], o_acc[nt][2 * half + 1] * inv_sum[half]);
    }
  }
  __syncwarp();
  Elem* out = static_cast<Elem*>(p.out) + head * p.out_layout.head_stride;
  constexpr int kChunksPerRow = D / 8;
#pragma unroll
  for (int i = 0; i < 16 * kChunksPerRow / 32; ++i) {
    const int c = i * 32 + lane;
    const int r = 16 * warp + c / kChunksPerRow;
    const int chunk = c % kChunksPerRow;
    if (row0 + r < num_queries) {
      *reinterpret_cast<uint4*>(out + static_cast<int64_t>(row0 + r) * p.out_layout.row_stride +
                                8 * chunk) =
          *reinterpret_cast<const uint4*>(sQ + swizzle<D>(r, chunk));
    }
  }
}

}  // namespace modus_attn
