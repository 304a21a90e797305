// Launchers of the block-metadata kernels (block_metadata_kernel.h).
#include "block_metadata_kernel.h"
#include "modus_attn.h"

namespace modus_attn {

cudaError_t launch_key_block_bounds(const int32_t* lo, const int32_t* hi, int num_tokens,
                                    int block_k, int32_t* bounds, cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  const int num_blocks = (num_tokens + block_k - 1) / block_k;
  key_block_bounds_kernel<<<num_blocks, 32, 0, stream>>>(lo, hi, num_tokens, block_k, bounds);
  return cudaGetLastError();
}

cudaError_t launch_tile_lists(const int32_t* bounds, int num_tokens, int num_queries,
                              int q_offset, int block_q, int block_k, bool by_key,
                              int32_t* blocks, int32_t* counts, cudaStream_t stream) {
  const int num_q_blocks = (num_queries + block_q - 1) / block_q;
  const int num_k_blocks = (num_tokens + block_k - 1) / block_k;
  const int num_outer = by_key ? num_k_blocks : num_q_blocks;
  const int num_inner = by_key ? num_q_blocks : num_k_blocks;
  // No query rows: no query blocks to list, and every key block's row is empty (count 0).
  if (num_outer == 0) return cudaSuccess;
  const int grid = (num_outer + kListWarps - 1) / kListWarps;
  tile_lists_kernel<<<grid, 32 * kListWarps, 0, stream>>>(
      bounds, num_queries, q_offset, block_q, by_key, num_outer, num_inner, blocks, counts);
  return cudaGetLastError();
}

}  // namespace modus_attn
