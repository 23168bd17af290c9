// exec.h: run MLX-generated Metal (and CUDA) kernel sources on the CPU.
//
// Every GPU thread of a threadgroup is a fiber (ucontext) on one OS thread;
// threadgroups run one after another. A fiber runs until it reaches a barrier
// or a SIMD-group collective, so a missing barrier shows up as wrong results
// rather than by chance, and a barrier that not every thread reaches is reported
// as a deadlock instead of hanging. Device buffers end at a PROT_NONE page, so
// reading or writing past the end of an input or output crashes.
// simdgroup_matrix<T, 8, 8> keeps 2 elements per lane in the layout of MLX's
// steel mma.h (get_coord).
#pragma once
#include <ucontext.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef _Float16 half;
typedef half float16_t;
typedef float float32_t;
// bfloat16 as MLX itself defines it where Metal lacks one: 16 bits, converted
// through float with round-to-nearest-even.
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    bits = (u & 0x7fffffff) > 0x7f800000 ? 0x7fc0 : uint16_t((u + 0x7fff + ((u >> 16) & 1)) >> 16);
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
typedef bfloat16_t bfloat;
#define MSL_VEC(T, N) typedef T N##2 __attribute__((ext_vector_type(2))); \
  typedef T N##3 __attribute__((ext_vector_type(3))); typedef T N##4 __attribute__((ext_vector_type(4)));
MSL_VEC(float, float) MSL_VEC(half, half) MSL_VEC(int, int) MSL_VEC(uint, uint)
MSL_VEC(short, short) MSL_VEC(ushort, ushort) MSL_VEC(unsigned long, ulong)
#undef MSL_VEC
#define METAL_FUNC inline
#define M_LOG2E_F 1.4426950408889634f
#define M_LN2_F 0.69314718055994531f

namespace emu {

struct Fiber {
  ucontext_t uc;
  bool done = false;
  uint tiitg = 0, lane = 0, simd = 0;
  uint3 tpitg;
};

struct State {
  std::vector<Fiber> fibers;
  std::vector<std::vector<char>> stacks;
  ucontext_t scheduler;
  int current = -1;
  uint3 tgpig, tptg, tpg, tgpg, origin;
  uint n_threads = 0, n_simd = 0;
  long progress = 0;
  long tg_arrived = 0, tg_generation = 0;
  std::vector<long> simd_arrived, simd_generation;
  std::vector<std::vector<std::vector<unsigned char>>> slots;  // [simd][lane] exchange
  std::vector<std::vector<float>> mats;                          // [simd] A | B
  std::function<void()> body;
};
inline State S;

inline Fiber& me() { return S.fibers[S.current]; }
inline uint simd_width(uint simd) { return std::min(32u, S.n_threads - 32u * simd); }

inline void wait_at(long& arrived, long& generation, uint participants) {
  const long mine = generation;
  ++S.progress;
  if (++arrived == long(participants)) {
    arrived = 0;
    ++generation;
    return;
  }
  while (generation == mine) swapcontext(&me().uc, &S.scheduler);
}

inline void threadgroup_wait() { wait_at(S.tg_arrived, S.tg_generation, S.n_threads); }
inline void simd_wait() {
  const uint s = me().simd;
  wait_at(S.simd_arrived[s], S.simd_generation[s], simd_width(s));
}

inline void fiber_main() {
  S.body();
  me().done = true;
  ++S.progress;
  swapcontext(&me().uc, &S.scheduler);
}

// dispatchThreads semantics: edge threadgroups are partial.
inline void dispatch(uint3 grid, uint3 tg, std::function<void()> body) {
  tg = uint3{std::min(tg.x, grid.x), std::min(tg.y, grid.y), std::min(tg.z, grid.z)};
  const uint3 groups = {(grid.x + tg.x - 1) / tg.x, (grid.y + tg.y - 1) / tg.y, (grid.z + tg.z - 1) / tg.z};
  S.body = std::move(body);
  const size_t stack_bytes = 1 << 18;
  for (uint gz = 0; gz < groups.z; ++gz)
    for (uint gy = 0; gy < groups.y; ++gy)
      for (uint gx = 0; gx < groups.x; ++gx) {
        const uint3 origin = {gx * tg.x, gy * tg.y, gz * tg.z};
        const uint3 size = {std::min(tg.x, grid.x - origin.x), std::min(tg.y, grid.y - origin.y),
                            std::min(tg.z, grid.z - origin.z)};
        S.n_threads = size.x * size.y * size.z;
        S.n_simd = (S.n_threads + 31) / 32;
        S.tgpig = uint3{gx, gy, gz};
        S.origin = origin;
        S.tptg = size;
        S.tpg = grid;
        S.tgpg = groups;
        S.tg_arrived = S.tg_generation = 0;
        S.simd_arrived.assign(S.n_simd, 0);
        S.simd_generation.assign(S.n_simd, 0);
        S.slots.assign(S.n_simd, std::vector<std::vector<unsigned char>>(32, std::vector<unsigned char>(64)));
        S.mats.assign(S.n_simd, std::vector<float>(128));
        S.fibers.assign(S.n_threads, Fiber{});
        if (S.stacks.size() < S.n_threads) S.stacks.resize(S.n_threads, std::vector<char>(stack_bytes));
        for (uint i = 0; i < S.n_threads; ++i) {
          Fiber& f = S.fibers[i];
          f.tiitg = i;
          f.lane = i % 32;
          f.simd = i / 32;
          f.tpitg = uint3{i % size.x, (i / size.x) % size.y, i / (size.x * size.y)};
          getcontext(&f.uc);
          f.uc.uc_stack.ss_sp = S.stacks[i].data();
          f.uc.uc_stack.ss_size = stack_bytes;
          f.uc.uc_link = nullptr;
          makecontext(&f.uc, fiber_main, 0);
        }
        for (;;) {
          const long before = S.progress;
          bool all_done = true;
          for (uint i = 0; i < S.n_threads; ++i) {
            if (S.fibers[i].done) continue;
            all_done = false;
            S.current = int(i);
            swapcontext(&S.scheduler, &S.fibers[i].uc);
          }
          if (all_done) break;
          if (S.progress == before) {
            std::fprintf(stderr, "emulator: deadlock in threadgroup (%u,%u,%u): a barrier or SIMD-group "
                         "operation is not reached by every thread\n", gx, gy, gz);
            std::exit(3);
          }
        }
      }
}

// Device buffers: the data ends right before an inaccessible page.
struct Buffer {
  unsigned char* data = nullptr;
  size_t bytes = 0;
};
inline Buffer load(const std::string& path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) { std::fprintf(stderr, "emulator: cannot read %s\n", path.c_str()); std::exit(4); }
  const size_t bytes = size_t(f.tellg());
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  const size_t span = (bytes + page - 1) / page * page;
  auto* base = (unsigned char*)mmap(nullptr, span + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  mprotect(base + span, page, PROT_NONE);
  Buffer b{base + span - bytes, bytes};
  f.seekg(0);
  f.read((char*)b.data, std::streamsize(bytes));
  return b;
}
inline void save(const std::string& path, const Buffer& b) {
  std::ofstream f(path, std::ios::binary);
  f.write((const char*)b.data, std::streamsize(b.bytes));
}

template <class T, class F> T simd_collective(T v, F reduce) {
  static_assert(sizeof(T) <= 64, "value too large");
  Fiber& f = me();
  auto& slots = S.slots[f.simd];
  std::memcpy(slots[f.lane].data(), &v, sizeof(T));
  simd_wait();
  const uint n = simd_width(f.simd);
  T values[32];
  for (uint i = 0; i < n; ++i) std::memcpy(&values[i], slots[i].data(), sizeof(T));
  T r = reduce(values, n, f.lane);
  simd_wait();
  return r;
}

}  // namespace emu

namespace metal {
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }
template <class T, int N> using vec = T __attribute__((ext_vector_type(N)));

inline void threadgroup_barrier(mem_flags) { emu::threadgroup_wait(); }
inline void simdgroup_barrier(mem_flags) { emu::simd_wait(); }

template <class T> T simd_sum(T v) { return emu::simd_collective(v, [](T* a, uint n, uint) { T r = a[0]; for (uint i = 1; i < n; ++i) r += a[i]; return r; }); }
template <class T> T simd_max(T v) { return emu::simd_collective(v, [](T* a, uint n, uint) { T r = a[0]; for (uint i = 1; i < n; ++i) r = a[i] > r ? a[i] : r; return r; }); }
template <class T> T simd_min(T v) { return emu::simd_collective(v, [](T* a, uint n, uint) { T r = a[0]; for (uint i = 1; i < n; ++i) r = a[i] < r ? a[i] : r; return r; }); }
template <class T> T simd_shuffle(T v, ushort src) { return emu::simd_collective(v, [src](T* a, uint n, uint) { return a[src % n]; }); }
template <class T> T simd_broadcast(T v, ushort src) { return simd_shuffle(v, src); }
template <class T> T simd_shuffle_xor(T v, ushort mask) { return emu::simd_collective(v, [mask](T* a, uint n, uint l) { uint s = l ^ mask; return s < n ? a[s] : a[l]; }); }
template <class T> T simd_shuffle_down(T v, ushort d) { return emu::simd_collective(v, [d](T* a, uint n, uint l) { return l + d < n ? a[l + d] : a[l]; }); }
template <class T> T simd_shuffle_up(T v, ushort d) { return emu::simd_collective(v, [d](T* a, uint, uint l) { return l >= d ? a[l - d] : a[l]; }); }

#define EMU_UNARY(f, impl) template <class T> T f(T x) { return T(impl(float(x))); }
#define EMU_MATH EMU_UNARY(exp, std::exp) EMU_UNARY(exp2, std::exp2) EMU_UNARY(log, std::log) \
  EMU_UNARY(log2, std::log2) EMU_UNARY(sqrt, std::sqrt) EMU_UNARY(tanh, std::tanh) EMU_UNARY(sin, std::sin) \
  EMU_UNARY(cos, std::cos) EMU_UNARY(floor, std::floor) EMU_UNARY(ceil, std::ceil) EMU_UNARY(fabs, std::fabs) \
  EMU_UNARY(round, std::round) template <class T> T rsqrt(T x) { return T(1.0f / std::sqrt(float(x))); }
EMU_MATH
namespace fast { EMU_MATH }
namespace precise { EMU_MATH }
#undef EMU_MATH
#undef EMU_UNARY
template <class T> T abs(T x) { return x < T(0) ? -x : x; }
template <class T> T max(T a, T b) { return a > b ? a : b; }
template <class T> T min(T a, T b) { return a < b ? a : b; }
template <class T> T fmax(T a, T b) { return a > b ? a : b; }
template <class T> T fmin(T a, T b) { return a < b ? a : b; }
template <class T> T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <class T> T fma(T a, T b, T c) { return a * b + c; }
template <class T> bool isnan(T x) { return std::isnan(float(x)); }
template <class T> bool isinf(T x) { return std::isinf(float(x)); }

inline void frag_layout(uint lane, int& r, int& c) {
  const int qid = int(lane) / 4;
  r = (qid & 4) + (int(lane) / 2) % 4;
  c = (qid & 2) * 2 + (int(lane) % 2) * 2;
}
template <class T, int R, int C> struct simdgroup_matrix {
  static_assert(R == 8 && C == 8, "emulator: 8x8 simdgroup matrices only");
  vec<T, 2> e = {T(0), T(0)};
  simdgroup_matrix() = default;
  explicit simdgroup_matrix(T diagonal) {
    int r, c;
    frag_layout(emu::me().lane, r, c);
    e[0] = r == c ? diagonal : T(0);
    e[1] = r == c + 1 ? diagonal : T(0);
  }
  vec<T, 2>& thread_elements() { return e; }
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
template <class T, int R, int C> simdgroup_matrix<T, R, C> make_filled_simdgroup_matrix(T v) {
  simdgroup_matrix<T, R, C> m;
  m.e = vec<T, 2>{v, v};
  return m;
}
template <class T, class P>
void simdgroup_load(simdgroup_matrix<T, 8, 8>& m, P* src, unsigned long epr = 8, ulong2 origin = 0, bool transpose = false) {
  int r, c;
  frag_layout(emu::me().lane, r, c);
  for (int j = 0; j < 2; ++j) {
    const long row = r + long(origin.y), col = c + j + long(origin.x);
    m.e[j] = T(transpose ? src[col * epr + row] : src[row * epr + col]);
  }
}
template <class T, class P>
void simdgroup_store(const simdgroup_matrix<T, 8, 8>& m, P* dst, unsigned long epr = 8, ulong2 origin = 0, bool transpose = false) {
  int r, c;
  frag_layout(emu::me().lane, r, c);
  for (int j = 0; j < 2; ++j) {
    const long row = r + long(origin.y), col = c + j + long(origin.x);
    (transpose ? dst[col * epr + row] : dst[row * epr + col]) = m.e[j];
  }
}
template <class T>
void simdgroup_multiply_accumulate(simdgroup_matrix<T, 8, 8>& d, const simdgroup_matrix<T, 8, 8>& a,
                                   const simdgroup_matrix<T, 8, 8>& b, const simdgroup_matrix<T, 8, 8>& c) {
  auto& m = emu::S.mats[emu::me().simd];
  int r, col;
  frag_layout(emu::me().lane, r, col);
  for (int j = 0; j < 2; ++j) {
    m[r * 8 + col + j] = float(a.e[j]);
    m[64 + r * 8 + col + j] = float(b.e[j]);
  }
  emu::simd_wait();
  vec<T, 2> out;
  for (int j = 0; j < 2; ++j) {
    float acc = float(c.e[j]);
    for (int k = 0; k < 8; ++k) acc += m[r * 8 + k] * m[64 + k * 8 + col + j];
    out[j] = T(acc);
  }
  emu::simd_wait();
  d.e = out;
}
template <class T>
void simdgroup_multiply(simdgroup_matrix<T, 8, 8>& d, const simdgroup_matrix<T, 8, 8>& a, const simdgroup_matrix<T, 8, 8>& b) {
  simdgroup_multiply_accumulate(d, a, b, make_filled_simdgroup_matrix<T, 8, 8>(T(0)));
}
}  // namespace metal

template <typename T, typename U> inline T ceildiv(T n, U m) { return (n + m - 1) / m; }

// The MSL address-space qualifiers carry no meaning on the CPU.
#define device
#define constant
#define threadgroup
#define thread
