// Launchers of the backward kernels (attn_bwd_kernel.h) for bf16 / fp16 and head dims 64 / 128.
#include "attn_bwd_kernel.h"
#include "modus_attn.h"

namespace modus_attn {
namespace {

template <typename Kernel>
cudaError_t launch_with_smem(Kernel kernel, dim3 grid, int smem_bytes, cudaStream_t stream,
                             const BwdParams& p) {
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return err;
  kernel<<<grid, kNumThreads, smem_bytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename Elem, int D>
cudaError_t launch_backward(const BwdParams& p, cudaStream_t stream) {
  const int64_t num_rows = static_cast<int64_t>(p.num_tokens) * p.num_q_heads;
  constexpr int kRowsPerBlock = kNumThreads / (D / 8);
  delta_kernel<Elem, D><<<static_cast<unsigned>((num_rows + kRowsPerBlock - 1) / kRowsPerBlock),
                          kNumThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  const dim3 dkdv_grid(p.bwd_list.num_outer, p.num_kv_heads);
  if (p.deterministic) {
    err = launch_with_smem(dkdv_kernel<Elem, D, false>, dkdv_grid,
                           DkdvTile<Elem, D, false>::kSmemBytes, stream, p);
    if (err != cudaSuccess) return err;
    return launch_with_smem(dq_kernel<Elem, D>, dim3(p.fwd_list.num_outer, p.num_q_heads),
                            DqTile<Elem, D>::kSmemBytes, stream, p);
  }
  err = launch_with_smem(dkdv_kernel<Elem, D, true>, dkdv_grid, DkdvTile<Elem, D, true>::kSmemBytes,
                         stream, p);
  if (err != cudaSuccess) return err;
  const int64_t num_chunks = num_rows * D / 8;
  dq_convert_kernel<Elem><<<static_cast<unsigned>((num_chunks + kNumThreads - 1) / kNumThreads),
                            kNumThreads, 0, stream>>>(p, D);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_attention_backward(const BwdParams& params, DType dtype, int head_dim,
                                      cudaStream_t stream) {
  if (params.num_tokens == 0) return cudaSuccess;
  if (dtype == DType::kBF16) {
    if (head_dim == 64) return launch_backward<__nv_bfloat16, 64>(params, stream);
    if (head_dim == 128) return launch_backward<__nv_bfloat16, 128>(params, stream);
  } else {
    if (head_dim == 64) return launch_backward<__half, 64>(params, stream);
    if (head_dim == 128) return launch_backward<__half, 128>(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace modus_attn
