// shim.h: declarations that let clang type-check MLX-generated Metal sources
// (see check.py). Nothing here executes. Metal's address spaces become clang
// address spaces, so passing threadgroup memory where device memory is
// expected, or writing through a const input, is a compile error as in MSL.
// Only what this project's kernels (and MLX's generated wrapper) use is declared,
// all inside namespace metal with no `using namespace metal`, so an unqualified
// Metal function is an error too.
#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))
#define thread
#define METAL_FUNC inline __attribute__((always_inline))
#define INFINITY (__builtin_inff())
#define NAN (__builtin_nanf(""))
#define M_LOG2E_F 1.4426950408889634f
#define M_LN2_F 0.69314718055994531f

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;
typedef long int64_t;
typedef unsigned long uint64_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef unsigned long size_t;
typedef _Float16 half;
typedef half float16_t;
typedef float float32_t;
typedef __bf16 bfloat;
typedef __bf16 bfloat16_t;
#define MSL_VEC(T) typedef T T##2 __attribute__((ext_vector_type(2))); \
  typedef T T##3 __attribute__((ext_vector_type(3))); typedef T T##4 __attribute__((ext_vector_type(4)));
MSL_VEC(float) MSL_VEC(half) MSL_VEC(int) MSL_VEC(uint) MSL_VEC(short) MSL_VEC(ushort) MSL_VEC(ulong)
#undef MSL_VEC

namespace metal {
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
mem_flags operator|(mem_flags, mem_flags);
void threadgroup_barrier(mem_flags);
void simdgroup_barrier(mem_flags);
template <class T, int N> using vec = T __attribute__((ext_vector_type(N)));

#define SHIM_UNARY(f) float f(float); half f(half);
#define SHIM_MATH SHIM_UNARY(exp) SHIM_UNARY(exp2) SHIM_UNARY(log) SHIM_UNARY(log2) SHIM_UNARY(sqrt) \
  SHIM_UNARY(rsqrt) SHIM_UNARY(tanh) SHIM_UNARY(sin) SHIM_UNARY(cos) SHIM_UNARY(fabs) SHIM_UNARY(floor) \
  SHIM_UNARY(ceil) SHIM_UNARY(round)
SHIM_MATH
namespace fast { SHIM_MATH }
namespace precise { SHIM_MATH }
#undef SHIM_MATH
#undef SHIM_UNARY
// Metal's max/min take two arguments of one type: max(half, float) is ambiguous there.
float max(float, float); half max(half, half); int max(int, int); uint max(uint, uint);
float min(float, float); half min(half, half); int min(int, int); uint min(uint, uint);
float abs(float); half abs(half); int abs(int);
float fma(float, float, float);
bool isnan(float); bool isinf(float);

template <class T> T simd_sum(T);
template <class T> T simd_max(T);
template <class T> T simd_min(T);
template <class T> T simd_shuffle(T, ushort);
template <class T> T simd_shuffle_xor(T, ushort);
template <class T> T simd_shuffle_down(T, ushort);
template <class T> T simd_shuffle_up(T, ushort);
template <class T> T simd_broadcast(T, ushort);

template <class T, int R, int C> struct simdgroup_matrix {
  simdgroup_matrix() = default;
  explicit simdgroup_matrix(T);
  thread vec<T, 2>& thread_elements() thread;
};
template <class T, int R, int C> simdgroup_matrix<T, R, C> make_filled_simdgroup_matrix(T);
template <class T, int R, int C>
void simdgroup_load(thread simdgroup_matrix<T, R, C>&, const threadgroup T*, ulong = C, ulong2 = 0, bool = false);
template <class T, int R, int C>
void simdgroup_load(thread simdgroup_matrix<T, R, C>&, const device T*, ulong = C, ulong2 = 0, bool = false);
template <class T, int R, int C>
void simdgroup_store(const thread simdgroup_matrix<T, R, C>&, threadgroup T*, ulong = C, ulong2 = 0, bool = false);
template <class T, int R, int C>
void simdgroup_store(const thread simdgroup_matrix<T, R, C>&, device T*, ulong = C, ulong2 = 0, bool = false);
template <class T, int M, int N, int K>
void simdgroup_multiply_accumulate(thread simdgroup_matrix<T, M, N>&, const thread simdgroup_matrix<T, M, K>&,
                                   const thread simdgroup_matrix<T, K, N>&, const thread simdgroup_matrix<T, M, N>&);
template <class T, int M, int N, int K>
void simdgroup_multiply(thread simdgroup_matrix<T, M, N>&, const thread simdgroup_matrix<T, M, K>&,
                        const thread simdgroup_matrix<T, K, N>&);
}  // namespace metal

// From MLX's kernels/utils.h, which MLX prepends to every custom kernel.
template <typename T, typename U> inline T ceildiv(T n, U m) { return (n + m - 1) / m; }
