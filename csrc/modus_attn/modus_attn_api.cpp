// Torch binding of the modus_attn kernels: checks every input at the boundary, allocates the
// outputs and workspaces, and launches on the current stream. The Python side
// (modus_mega/ops/cuda_attention.py) wraps these functions in torch.library custom ops.
#include <ATen/core/Tensor.h>
#include <ATen/ops/argsort.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "modus_attn.h"

namespace modus_attn {
namespace {

constexpr int64_t kMaxGridY = 65535;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

DType dtype_of(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 ? DType::kBF16 : DType::kFP16;
}

TensorLayout layout_of(const at::Tensor& t) { return TensorLayout{t.stride(0), t.stride(1)}; }

// A [T, heads, D] activation the kernels can read with 16-byte copies.
void check_activation(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == q.device(), name, " is on ", t.device(), " but q is on ", q.device());
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf, name,
              " must be bfloat16 or float16, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, " has dtype ", t.scalar_type(),
              " but q has ", q.scalar_type(), "; cast both to one dtype");
  TORCH_CHECK(t.dim() == 3, name, " must be [tokens, heads, head_dim], got shape ", t.sizes());
  TORCH_CHECK(t.stride(2) == 1, name, " must be contiguous in head_dim (stride 1), got strides ",
              t.strides(), "; call .contiguous()");
  TORCH_CHECK(t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0, name,
              " needs token and head strides that are multiples of 8 elements, got strides ",
              t.strides(), "; call .contiguous()");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name,
              " must start on a 16-byte boundary; call .contiguous() on a fresh copy");
}

void check_int32_vector(const at::Tensor& t, const char* name, int64_t length,
                        const at::Device& device) {
  TORCH_CHECK(t.device() == device, name, " is on ", t.device(), " but must be on ", device);
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type(),
              "; convert with .to(torch.int32)");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == length, name, " must have shape [", length, "], got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// A block list built by build_block_metadata for this token count.
BlockList check_block_list(const at::Tensor& blocks, const at::Tensor& counts,
                           const at::Tensor& order, const char* name, int64_t num_outer,
                           int64_t num_inner, const at::Device& device) {
  TORCH_CHECK(blocks.device() == device && blocks.scalar_type() == at::kInt && blocks.dim() == 2 &&
                  blocks.size(0) == num_outer && blocks.size(1) == num_inner &&
                  blocks.is_contiguous(),
              name, "_blocks must be a contiguous int32 [", num_outer, ", ", num_inner,
              "] tensor on ", device, ", got ", blocks.scalar_type(), " ", blocks.sizes(), " on ",
              blocks.device(), "; build the metadata with prepare(lo, hi) for this micro-batch");
  check_int32_vector(counts, name, num_outer, device);
  check_int32_vector(order, name, num_outer, device);
  return BlockList{blocks.data_ptr<int32_t>(), counts.data_ptr<int32_t>(),
                   order.data_ptr<int32_t>(), static_cast<int>(num_inner),
                   static_cast<int>(num_outer)};
}

struct Shapes {
  int64_t num_tokens;   // T, the keys
  int64_t num_queries;  // Tq, the query rows
  int64_t num_q_heads;
  int64_t num_kv_heads;
  int64_t head_dim;
};

// q [Tq, Hq, D] at absolute rows [q_offset, q_offset + Tq) of k, v [T, Hkv, D].
Shapes check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                 int64_t q_offset) {
  check_activation(q, "q", q);
  check_activation(k, "k", q);
  check_activation(v, "v", q);
  const Shapes s{k.size(0), q.size(0), q.size(1), k.size(1), q.size(2)};
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have one shape, got ", k.sizes(), " and ",
              v.sizes());
  TORCH_CHECK(q_offset >= 0 && q_offset + s.num_queries <= s.num_tokens, "the ", s.num_queries,
              " query rows at offset ", q_offset, " must be rows of the ", s.num_tokens,
              " keys (0 <= q_offset, q_offset + Tq <= T)");
  TORCH_CHECK(k.size(2) == s.head_dim, "q has head_dim ", s.head_dim, " but k and v have ",
              k.size(2));
  TORCH_CHECK(s.head_dim == 64 || s.head_dim == 128, "head_dim must be 64 or 128, got ", s.head_dim,
              "; use the reference attention backend for other sizes");
  TORCH_CHECK(s.num_kv_heads >= 1 && s.num_q_heads % s.num_kv_heads == 0, "query heads (",
              s.num_q_heads, ") must be a multiple of key-value heads (", s.num_kv_heads, ")");
  TORCH_CHECK(s.num_q_heads <= kMaxGridY, "at most ", kMaxGridY, " query heads, got ",
              s.num_q_heads);
  TORCH_CHECK(s.num_tokens < (int64_t{1} << 30), "at most 2^30 tokens per micro-batch, got ",
              s.num_tokens);
  TORCH_CHECK(scale > 0.0 && std::isfinite(scale), "scale must be a finite positive number, got ",
              scale);
  return s;
}

}  // namespace

// Block metadata of one micro-batch and its query rows [q_offset, q_offset + Tq) (see
// block_metadata.py for the specification). Returns
// {fwd_bounds [ceil(T/64), 4], fwd_blocks [ceil(Tq/128), ceil(T/64)], fwd_counts, fwd_order,
//  bwd_bounds [ceil(T/128), 4], bwd_blocks [ceil(T/128), ceil(Tq/64)], bwd_counts, bwd_order}.
std::vector<at::Tensor> build_block_metadata(const at::Tensor& lo, const at::Tensor& hi,
                                             int64_t q_offset, int64_t num_queries) {
  TORCH_CHECK(lo.is_cuda(), "lo must be a CUDA tensor, got device ", lo.device());
  TORCH_CHECK(lo.dim() == 1, "lo must be a vector [T], got shape ", lo.sizes());
  const int64_t num_tokens = lo.size(0);
  TORCH_CHECK(num_tokens < (int64_t{1} << 30), "at most 2^30 tokens per micro-batch, got ",
              num_tokens);
  TORCH_CHECK(q_offset >= 0 && num_queries >= 0 && q_offset + num_queries <= num_tokens,
              "the query rows [", q_offset, ", ", q_offset + num_queries, ") must lie in the ",
              num_tokens, " keys");
  check_int32_vector(lo, "lo", num_tokens, lo.device());
  check_int32_vector(hi, "hi", num_tokens, lo.device());
  const c10::cuda::CUDAGuard device_guard(lo.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto opts = lo.options();
  const int T = static_cast<int>(num_tokens);
  const int Tq = static_cast<int>(num_queries);
  const int offset = static_cast<int>(q_offset);

  const int64_t fwd_q_blocks = ceil_div(num_queries, kFwdBlockQ);
  const int64_t fwd_k_blocks = ceil_div(num_tokens, kFwdBlockK);
  at::Tensor fwd_bounds = at::empty({fwd_k_blocks, 4}, opts);
  at::Tensor fwd_blocks = at::empty({fwd_q_blocks, fwd_k_blocks}, opts);
  at::Tensor fwd_counts = at::empty({fwd_q_blocks}, opts);
  C10_CUDA_CHECK(launch_key_block_bounds(lo.data_ptr<int32_t>(), hi.data_ptr<int32_t>(), T,
                                         kFwdBlockK, fwd_bounds.data_ptr<int32_t>(), stream));
  C10_CUDA_CHECK(launch_tile_lists(fwd_bounds.data_ptr<int32_t>(), T, Tq, offset, kFwdBlockQ,
                                   kFwdBlockK, /*by_key=*/false, fwd_blocks.data_ptr<int32_t>(),
                                   fwd_counts.data_ptr<int32_t>(), stream));

  const int64_t bwd_k_blocks = ceil_div(num_tokens, kBwdBlockK);
  const int64_t bwd_q_blocks = ceil_div(num_queries, kBwdBlockQ);
  at::Tensor bwd_bounds = at::empty({bwd_k_blocks, 4}, opts);
  at::Tensor bwd_blocks = at::empty({bwd_k_blocks, bwd_q_blocks}, opts);
  at::Tensor bwd_counts = at::empty({bwd_k_blocks}, opts);
  C10_CUDA_CHECK(launch_key_block_bounds(lo.data_ptr<int32_t>(), hi.data_ptr<int32_t>(), T,
                                         kBwdBlockK, bwd_bounds.data_ptr<int32_t>(), stream));
  C10_CUDA_CHECK(launch_tile_lists(bwd_bounds.data_ptr<int32_t>(), T, Tq, offset, kBwdBlockQ,
                                   kBwdBlockK, /*by_key=*/true, bwd_blocks.data_ptr<int32_t>(),
                                   bwd_counts.data_ptr<int32_t>(), stream));

  // Launch order: blocks with the most tiles first, so the longest ones do not form the tail.
  at::Tensor fwd_order =
      at::argsort(fwd_counts, /*stable=*/true, /*dim=*/0, /*descending=*/true).to(at::kInt);
  at::Tensor bwd_order =
      at::argsort(bwd_counts, /*stable=*/true, /*dim=*/0, /*descending=*/true).to(at::kInt);
  return {fwd_bounds, fwd_blocks, fwd_counts, fwd_order,
          bwd_bounds, bwd_blocks, bwd_counts, bwd_order};
}

// out [Tq, Hq, D] (q's dtype, contiguous) and lse [Hq, Tq] fp32 (-inf on rows without keys);
// query row r sits at absolute position q_offset + r of the keys.
std::vector<at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, const at::Tensor& lo,
                                          const at::Tensor& hi, const at::Tensor& fwd_blocks,
                                          const at::Tensor& fwd_counts, const at::Tensor& fwd_order,
                                          double scale, int64_t q_offset) {
  const Shapes s = check_qkv(q, k, v, scale, q_offset);
  check_int32_vector(lo, "lo", s.num_tokens, q.device());
  check_int32_vector(hi, "hi", s.num_tokens, q.device());
  const BlockList list = check_block_list(fwd_blocks, fwd_counts, fwd_order, "fwd",
                                          ceil_div(s.num_queries, kFwdBlockQ),
                                          ceil_div(s.num_tokens, kFwdBlockK), q.device());
  const c10::cuda::CUDAGuard device_guard(q.device());
  at::Tensor out = at::empty({s.num_queries, s.num_q_heads, s.head_dim}, q.options());
  at::Tensor lse = at::empty({s.num_q_heads, s.num_queries}, q.options().dtype(at::kFloat));

  FwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.lo = lo.data_ptr<int32_t>();
  p.hi = hi.data_ptr<int32_t>();
  p.q_layout = layout_of(q);
  p.k_layout = layout_of(k);
  p.v_layout = layout_of(v);
  p.out_layout = layout_of(out);
  p.fwd_list = list;
  p.num_tokens = static_cast<int>(s.num_tokens);
  p.num_queries = static_cast<int>(s.num_queries);
  p.q_offset = static_cast<int>(q_offset);
  p.num_q_heads = static_cast<int>(s.num_q_heads);
  p.num_kv_heads = static_cast<int>(s.num_kv_heads);
  p.scale = static_cast<float>(scale);
  C10_CUDA_CHECK(launch_attention_forward(p, dtype_of(q), static_cast<int>(s.head_dim),
                                          c10::cuda::getCurrentCUDAStream()));
  return {out, lse};
}

// {dq [T, Hq, D], dk [T, Hkv, D], dv [T, Hkv, D]}, contiguous, in q's dtype.
std::vector<at::Tensor> attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& lo, const at::Tensor& hi, const at::Tensor& fwd_blocks,
    const at::Tensor& fwd_counts, const at::Tensor& fwd_order, const at::Tensor& bwd_blocks,
    const at::Tensor& bwd_counts, const at::Tensor& bwd_order, double scale, bool deterministic) {
  const Shapes s = check_qkv(q, k, v, scale, /*q_offset=*/0);
  TORCH_CHECK(s.num_queries == s.num_tokens, "the backward needs the queries to be all the keys' "
              "rows (no query offset), got ", s.num_queries, " query rows over ", s.num_tokens,
              " keys; queries over a cache run forward only");
  check_activation(out, "out", q);
  check_activation(dout, "dout", q);
  TORCH_CHECK(out.sizes() == q.sizes() && dout.sizes() == q.sizes(),
              "out and dout must have q's shape ", q.sizes(), ", got ", out.sizes(), " and ",
              dout.sizes());
  const std::vector<int64_t> lse_shape{s.num_q_heads, s.num_tokens};
  TORCH_CHECK(lse.device() == q.device() && lse.scalar_type() == at::kFloat &&
                  lse.sizes() == at::IntArrayRef(lse_shape) && lse.is_contiguous(),
              "lse must be the forward's contiguous float32 [Hq, T] = ", at::IntArrayRef(lse_shape),
              " tensor, got ", lse.scalar_type(), " ", lse.sizes());
  if (grad_lse.has_value()) {
    TORCH_CHECK(grad_lse->device() == q.device() && grad_lse->scalar_type() == at::kFloat &&
                    grad_lse->sizes() == lse.sizes() && grad_lse->is_contiguous(),
                "grad_lse must be a contiguous float32 tensor shaped like lse ", lse.sizes(),
                ", got ", grad_lse->scalar_type(), " ", grad_lse->sizes());
  }
  check_int32_vector(lo, "lo", s.num_tokens, q.device());
  check_int32_vector(hi, "hi", s.num_tokens, q.device());
  const BlockList fwd_list =
      check_block_list(fwd_blocks, fwd_counts, fwd_order, "fwd", ceil_div(s.num_tokens, kFwdBlockQ),
                       ceil_div(s.num_tokens, kFwdBlockK), q.device());
  const BlockList bwd_list =
      check_block_list(bwd_blocks, bwd_counts, bwd_order, "bwd", ceil_div(s.num_tokens, kBwdBlockK),
                       ceil_div(s.num_tokens, kBwdBlockQ), q.device());
  const c10::cuda::CUDAGuard device_guard(q.device());
  at::Tensor dq = at::empty({s.num_tokens, s.num_q_heads, s.head_dim}, q.options());
  at::Tensor dk = at::empty({s.num_tokens, s.num_kv_heads, s.head_dim}, q.options());
  at::Tensor dv = at::empty({s.num_tokens, s.num_kv_heads, s.head_dim}, q.options());
  at::Tensor delta = at::empty({s.num_q_heads, s.num_tokens}, q.options().dtype(at::kFloat));
  at::Tensor dq_accum;
  if (!deterministic) {
    dq_accum = at::zeros({s.num_tokens, s.num_q_heads, s.head_dim}, q.options().dtype(at::kFloat));
  }

  BwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.dout = dout.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.grad_lse = grad_lse.has_value() ? grad_lse->data_ptr<float>() : nullptr;
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dq_accum = deterministic ? nullptr : dq_accum.data_ptr<float>();
  p.lo = lo.data_ptr<int32_t>();
  p.hi = hi.data_ptr<int32_t>();
  p.q_layout = layout_of(q);
  p.k_layout = layout_of(k);
  p.v_layout = layout_of(v);
  p.out_layout = layout_of(out);
  p.dout_layout = layout_of(dout);
  p.dq_layout = layout_of(dq);
  p.dk_layout = layout_of(dk);
  p.dv_layout = layout_of(dv);
  p.fwd_list = fwd_list;
  p.bwd_list = bwd_list;
  p.num_tokens = static_cast<int>(s.num_tokens);
  p.num_q_heads = static_cast<int>(s.num_q_heads);
  p.num_kv_heads = static_cast<int>(s.num_kv_heads);
  p.scale = static_cast<float>(scale);
  p.deterministic = deterministic;
  C10_CUDA_CHECK(launch_attention_backward(p, dtype_of(q), static_cast<int>(s.head_dim),
                                           c10::cuda::getCurrentCUDAStream()));
  return {dq, dk, dv};
}

}  // namespace modus_attn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "modus_attn: packed varlen attention with per-key [lo, hi) query intervals";
  m.def("build_block_metadata", &modus_attn::build_block_metadata, "tile lists of one micro-batch",
        pybind11::arg("lo"), pybind11::arg("hi"), pybind11::arg("q_offset"),
        pybind11::arg("num_queries"));
  m.def("attention_forward", &modus_attn::attention_forward, "out, lse", pybind11::arg("q"),
        pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("lo"), pybind11::arg("hi"),
        pybind11::arg("fwd_blocks"), pybind11::arg("fwd_counts"), pybind11::arg("fwd_order"),
        pybind11::arg("scale"), pybind11::arg("q_offset"));
  m.def("attention_backward", &modus_attn::attention_backward, "dq, dk, dv", pybind11::arg("dout"),
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("out"),
        pybind11::arg("lse"), pybind11::arg("grad_lse"), pybind11::arg("lo"), pybind11::arg("hi"),
        pybind11::arg("fwd_blocks"), pybind11::arg("fwd_counts"), pybind11::arg("fwd_order"),
        pybind11::arg("bwd_blocks"), pybind11::arg("bwd_counts"), pybind11::arg("bwd_order"),
        pybind11::arg("scale"), pybind11::arg("deterministic"));
}
