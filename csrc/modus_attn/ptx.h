// The PTX instructions the modus_attn kernels use, one inline-asm wrapper each (sm_80+).
// Everything else in the kernels is plain CUDA C++ on top of these wrappers.
//
// Tensor-core fragments follow PTX's mma.m16n8k16 layouts. With lane = threadIdx.x % 32,
// grp = lane / 4 (0..7) and quad = lane % 4 (0..3):
//   A (16x16, row-major) 4 x b32: a0 = (grp, 2quad..+1)   a1 = (grp+8, 2quad..+1)
//                                 a2 = (grp, 8+2quad..+1) a3 = (grp+8, 8+2quad..+1)
//   B (16x8, "col")      2 x b32: b0 = (k 2quad..+1, n grp)  b1 = (k 8+2quad..+1, n grp)
//   C (16x8) fp32        4 x f32: c0,c1 = (grp, 2quad..+1)   c2,c3 = (grp+8, 2quad..+1)
// so a pair of C tiles covering 16 columns re-packs into one A fragment in registers.
#ifndef MODUS_ATTN_PTX_H_
#define MODUS_ATTN_PTX_H_

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace modus_attn {

template <typename Elem>
struct ElemTraits;

template <>
struct ElemTraits<__nv_bfloat16> {
  // Two floats -> one b32 register holding {low half = a, high half = b}, rounded to nearest.
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  // c += a * b on one m16n8k16 tile, fp32 accumulation.
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  // The two values of a b32 register (low half first), exactly.
  static __device__ __forceinline__ float2 unpack(uint32_t r) {
    return make_float2(__uint_as_float(r << 16), __uint_as_float(r & 0xffff0000u));
  }
};

template <>
struct ElemTraits<__half> {
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    __half2 v = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ float2 unpack(uint32_t r) {
    return make_float2(__half2float(__ushort_as_half(static_cast<unsigned short>(r & 0xffffu))),
                       __half2float(__ushort_as_half(static_cast<unsigned short>(r >> 16))));
  }
};

__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, which lands in
// register i with each lane holding (row grp, cols 2quad, 2quad+1).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Same, each matrix transposed: lanes hold (rows 2quad, 2quad+1; col grp).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Copies 16 bytes global -> shared, or writes 16 zero bytes when !valid (src is then not read).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}

// Copies 4 bytes, or writes 4 zero bytes when !valid.
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// 2^x with ex2.approx (2 ulp); 2^-inf = +0, which the masked softmax relies on.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// *ptr += (a, b) with one 8-byte reduction where the ISA has it (sm_90), else two.
// ptr must be 8-byte aligned.
__device__ __forceinline__ void atomic_add_f32x2(float* ptr, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(ptr), "f"(a), "f"(b) : "memory");
#else
  atomicAdd(ptr, a);
  atomicAdd(ptr + 1, b);
#endif
}

}  // namespace modus_attn

#endif  // MODUS_ATTN_PTX_H_
