// Launcher of the forward kernel (attn_fwd_kernel.h) for bf16 / fp16 and head dims 64 / 128.
#include "attn_fwd_kernel.h"
#include "modus_attn.h"

namespace modus_attn {
namespace {

template <typename Elem, int D>
cudaError_t launch_forward(const FwdParams& p, cudaStream_t stream) {
  using Tile = FwdTile<Elem, D>;
  auto kernel = attention_forward_kernel<Elem, D>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tile::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(p.fwd_list.num_outer, p.num_q_heads);
  kernel<<<grid, kNumThreads, Tile::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_attention_forward(const FwdParams& params, DType dtype, int head_dim,
                                     cudaStream_t stream) {
  if (params.num_queries == 0) return cudaSuccess;
  if (dtype == DType::kBF16) {
    if (head_dim == 64) return launch_forward<__nv_bfloat16, 64>(params, stream);
    if (head_dim == 128) return launch_forward<__nv_bfloat16, 128>(params, stream);
  } else {
    if (head_dim == 64) return launch_forward<__half, 64>(params, stream);
    if (head_dim == 128) return launch_forward<__half, 128>(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace modus_attn
