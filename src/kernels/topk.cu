// CUDA per-row top-k of |h| (order: |h| desc, then index asc; NaN above +inf): one block per row at a
// time, exact radix select on integer keys, outputs built from shared-memory bitsets.
//
// Keys: |x| as its bit pattern with the sign cleared (monotone for non-negative floats): 15 bits for
// bf16/f16, 31 for f32; every NaN is mapped to one key just above +inf ("canonical key").
//
// Fast kernel (row fits in registers, k small against I), per row, the row read from HBM once with
// 16-byte loads and kept in registers:
//   1. sample = element 0 of every 8 (bf16/f16) or 4 (f32) consecutive elements; an exact radix select
//      on the sample gives t = its q-th largest key, with q chosen so that #(row keys >= t) lands in
//      [k, cap] with overwhelming probability (q ~ 2k/VEC + 4 sqrt(k/VEC) + 8);
//   2. count keys >= t (packed compare: two 16-bit keys per 32-bit add), block scan, gather the
//      candidates (key, index) into shared memory; a row whose count misses [k, cap] goes on a retry
//      list for the full kernel (adversarial layouts only: the result is exact either way);
//   3. exact radix select over the candidates: threshold key T and the number of ties at T to take.
// Full kernel (large k, long rows, retried rows): radix select over the whole row (8-bit digits,
// shared-memory histograms), re-reading the row from global memory / L2 in each pass.
// Staged kernel (TopkPath::kStaged, a candidate for the default; same applicability as the fast kernel
// plus 16-byte alignment and two row buffers fitting 2+ blocks per SM): a persistent grid (block b takes
// rows b, b + gridDim.x, ...) that copies each row into shared memory with cp.async one row ahead
// (double buffering), so that the next row's loads overlap the current row's selection; per row the
// fast kernel's steps 1-3 on the staged copy, with the threshold guess t = T_prev - margin from the
// block's previous row (the sample select only when that count misses [k, cap]) and warp-aggregated
// histogram updates. Rows it cannot settle go on the same retry list.
// All: selected = {key > T} plus the lowest-index `need` elements with key == T, as bitsets in shared
// memory; a block scan turns them into ascending indices; bitset rows are stored as 64-bit words.
// Tuning: SPARSECL_TOPK_VPT=4|8|16 overrides the fast kernel's vectors per thread (default 8 when the
// row fits: 224 threads for I = 14336 bf16, 61 registers, 4 blocks per SM); SPARSECL_TOPK_STAGED_THREADS
// (a multiple of 32, at most 512) the staged kernel's threads per block (default 512: 32 registers on
// sm_90; 72.4 KB of shared memory for I = 14336 bf16, k = 143, so 3 blocks per SM on an H200).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "sparsecl/common/error.h"
#include "sparsecl/kernels/detail.h"

namespace sparsecl::kernels::detail {
namespace {

constexpr int kMaxThreads = 512;
constexpr int kStagedThreads = 512;     // staged kernel: default threads per block (see staged_threads)
constexpr int kMaxCap = 8192;           // candidate buffer limit (entries of 8 bytes)
constexpr unsigned kFull = 0xffffffffu;

// ---- key traits -----------------------------------------------------------------------------------
struct Bf16Keys {
  using Scalar = uint16_t;
  static constexpr int kVec = 8;  // elements per 16-byte vector
  static constexpr int kKeyBits = 16;
  static constexpr bool kPacked = true;
  static constexpr uint32_t kNanKey = 0x7F81u;  // +inf is 0x7F80
  static constexpr uint32_t kGuessMargin = 16;    // 16 of 128 mantissa steps: 6-12% below in value
};
struct F16Keys {
  using Scalar = uint16_t;
  static constexpr int kVec = 8;
  static constexpr int kKeyBits = 16;
  static constexpr bool kPacked = true;
  static constexpr uint32_t kNanKey = 0x7C01u;  // +inf is 0x7C00
  static constexpr uint32_t kGuessMargin = 16u << 3;  // 10 mantissa bits: the same relative margin
};
struct F32Keys {
  using Scalar = uint32_t;
  static constexpr int kVec = 4;
  static constexpr int kKeyBits = 32;
  static constexpr bool kPacked = false;
  static constexpr uint32_t kNanKey = 0x7F800001u;  // +inf is 0x7F800000
  static constexpr uint32_t kGuessMargin = 16u << 16;  // 23 mantissa bits: the same relative margin
};

struct Params {
  const void* h;
  int64_t row_stride;  // elements
  int cols, k, nvec, nw32;
  int32_t* indices;
  unsigned long long* bits;
  unsigned long long* counts;
  const bool* row_mask;
  int64_t rows;
  int sample_rank;  // fast / staged kernel: rank of the threshold in the sample
  int cap;          // fast / staged kernel: candidate capacity
  int* retry;       // rows the fast / staged kernel left for the full kernel ...
  int* retry_count; // ... and how many
  bool vec_ok;      // 16-byte loads allowed (base and row stride aligned)
};

__device__ __forceinline__ uint32_t u4_get(const uint4& u, int w) {
  return w == 0 ? u.x : (w == 1 ? u.y : (w == 2 ? u.z : u.w));
}

// Raw |x| key of element e (0 <= e < kVec) of a sign-masked vector.
template <class K>
__device__ __forceinline__ uint32_t raw_key(const uint4& u, int e) {
  if constexpr (K::kPacked) {
    const uint32_t w = u4_get(u, e >> 1);
    return (e & 1) ? (w >> 16) : (w & 0xFFFFu);
  } else {
    return u4_get(u, e);
  }
}

template <class K>
__device__ __forceinline__ uint32_t canon(uint32_t raw) {
  return min(raw, K::kNanKey);
}

// Clears the sign bits of a vector's elements (leaves their raw |x| keys).
template <class K>
__device__ __forceinline__ void clear_signs(uint4& u) {
  constexpr uint32_t M = K::kPacked ? 0x7FFF7FFFu : 0x7FFFFFFFu;
  u.x &= M;
  u.y &= M;
  u.z &= M;
  u.w &= M;
}

// Loads vector v (elements v*kVec ...) of a row and clears the sign bits; elements >= cols read as 0.
// kStream: read-once data (evict-first); otherwise the row is re-read and should stay in L2.
template <class K, bool kStream = false>
__device__ __forceinline__ uint4 load_vec(const typename K::Scalar* row, int v, int cols, bool vec_ok) {
  constexpr int V = K::kVec;
  const int base = v * V;
  uint4 u = make_uint4(0u, 0u, 0u, 0u);
  if (vec_ok && base + V <= cols) {
    if constexpr (kStream) {
      u = __ldcs(reinterpret_cast<const uint4*>(row + base));
    } else {
      u = __ldg(reinterpret_cast<const uint4*>(row + base));
    }
  } else if (base < cols) {
    uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int e = 0; e < V; ++e) {
      if (base + e < cols) {
        const uint32_t s = row[base + e];
        if constexpr (K::kPacked) {
          w[e >> 1] |= s << (16 * (e & 1));
        } else {
          w[e] = s;
        }
      }
    }
    u = make_uint4(w[0], w[1], w[2], w[3]);
  }
  clear_signs<K>(u);
  return u;
}

// Bits marking the keys >= t in one 32-bit word of a masked vector (1 <= t <= kNanKey):
// packed: bit 15 / bit 31 for the low / high half (key + 0x8000 - t never carries across halves).
template <class K>
__device__ __forceinline__ uint32_t ge_bits(uint32_t word, uint32_t t, uint32_t packed_add) {
  if constexpr (K::kPacked) {
    return (word + packed_add) & 0x80008000u;
  } else {
    return word >= t ? 1u : 0u;
  }
}

// Makes the compiler treat the register-resident row as changed here, so that values derived from it
// (keys of 64+ elements) are recomputed in each pass instead of being hoisted and kept live (which
// would double the register footprint and cut occupancy).
template <int N>
__device__ __forceinline__ void launder(uint4 (&r)[N]) {
#pragma unroll
  for (int j = 0; j < N; ++j) asm volatile("" : "+r"(r[j].x), "+r"(r[j].y), "+r"(r[j].z), "+r"(r[j].w));
}

// ---- block primitives -----------------------------------------------------------------------------
__device__ __forceinline__ int warp_incl_scan(int x) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(kFull, x, o);
    if (lane >= o) x += y;
  }
  return x;
}

// Exclusive prefix sum over the block (thread order); *total gets the block sum. Uses scratch[0..32].
// All threads must call it; it synchronises.
__device__ int block_excl_scan(int x, int* scratch, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int incl = warp_incl_scan(x);
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int s = lane < nwarps ? scratch[lane] : 0;
    const int si = warp_incl_scan(s);
    if (lane < nwarps) scratch[lane] = si - s;
    if (lane == 31) scratch[32] = si;
  }
  __syncthreads();
  const int result = scratch[warp] + incl - x;
  *total = scratch[32];
  __syncthreads();
  return result;
}

// Exact selection: the k-th largest key (1 <= k <= number of items) among the items each thread
// passes to f in visit(f). Returns the key T; *need = k - #(items > T) (>= 1: ties at T to take).
// 8-bit digits from the top; hist: 256 counters, scratch[40..41] used. Synchronises.
// kWarpAgg: visit calls f(key, valid) instead of f(key), in the same loop trip in all 32 lanes of a warp
// (warp-uniform trip counts; valid false for lanes without an item), and the lanes of a warp that hit
// the same bin add to it once (leader = lowest lane of the group). Needs blockDim.x % 32 == 0.
template <int KEY_BITS, bool kWarpAgg = false, class Visit>
__device__ uint32_t radix_select(Visit&& visit, int k, uint32_t* hist, int* scratch, int* need) {
  uint32_t prefix = 0, pmask = 0;
  int remaining = k;
#pragma unroll 1
  for (int shift = KEY_BITS - 8; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    if constexpr (kWarpAgg) {
      visit([&](uint32_t key, bool valid) {
        const bool hit = valid && (key & pmask) == prefix;
        if (__ballot_sync(kFull, hit) != 0u) {  // warp-uniform branch
          const uint32_t bin = hit ? (key >> shift) & 255u : 256u;  // 256: no bin (never added)
          const unsigned peers = __match_any_sync(kFull, bin);
          if (hit && static_cast<int>(threadIdx.x & 31u) == __ffs(peers) - 1)
            atomicAdd(&hist[bin], static_cast<uint32_t>(__popc(peers)));
        }
      });
    } else {
      visit([&](uint32_t key) {
        if ((key & pmask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
      });
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      // lane l owns bins 255-8l down to 248-8l; counts above a lane = exclusive scan in that order
      const int hi = 255 - 8 * static_cast<int>(threadIdx.x);
      int c[8];
      int s = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        c[i] = static_cast<int>(hist[hi - i]);
        s += c[i];
      }
      const int incl = warp_incl_scan(s);
      int above = incl - s;
      if (above < remaining && remaining <= incl) {
        int digit = hi;
        bool found = false;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          if (!found && above + c[i] >= remaining) {
            digit = hi - i;
            found = true;
          }
          if (!found) above += c[i];
        }
        scratch[40] = digit;
        scratch[41] = above;
      }
    }
    __syncthreads();
    const uint32_t digit = static_cast<uint32_t>(scratch[40]);
    remaining -= scratch[41];
    prefix |= digit << shift;
    pmask |= 255u << shift;
  }
  *need = remaining;
  return prefix;
}

// ---- the kernels ----------------------------------------------------------------------------------
// Dynamic shared memory (32-bit words): hist[256] | scratch[64] | sel[nw32] | tie[nw32] |
// cand_key[cap] | cand_idx[cap] (cap = 0 for the full kernel); the staged kernel puts its two row
// buffers in front of this.
struct Smem {
  uint32_t* hist;
  int* scratch;
  uint32_t *sel, *tie, *cand_key, *cand_idx;
};

__device__ __forceinline__ Smem carve_smem(uint4* raw, int nw32, int cap) {
  Smem s;
  s.hist = reinterpret_cast<uint32_t*>(raw);
  s.scratch = reinterpret_cast<int*>(s.hist + 256);
  s.sel = s.hist + 256 + 64;
  s.tie = s.sel + nw32;
  s.cand_key = s.tie + nw32;
  s.cand_idx = s.cand_key + cap;
  return s;
}

// 2. (candidates) Appends the keys >= t of one 32-bit word of a sign-masked vector, whose first element
// is element idx0 of the row, to s.cand_key / s.cand_idx at slot, slot + 1, ... (advancing slot).
template <class K>
__device__ __forceinline__ void gather_word(uint32_t word, uint32_t t, uint32_t add, int idx0, const Smem& s,
                                            int& slot) {
  const uint32_t m = ge_bits<K>(word, t, add);
  if (m != 0u) {
    if constexpr (K::kPacked) {
      if (m & 0x8000u) {
        s.cand_key[slot] = canon<K>(word & 0xFFFFu);
        s.cand_idx[slot] = idx0;
        ++slot;
      }
      if (m & 0x80000000u) {
        s.cand_key[slot] = canon<K>(word >> 16);
        s.cand_idx[slot] = idx0 + 1;
        ++slot;
      }
    } else {
      s.cand_key[slot] = canon<K>(word);
      s.cand_idx[slot] = idx0;
      ++slot;
    }
  }
}

// 3. (after the select over the `total` candidates) Marks sel = {key > T} and tie = {key == T} in the
// zeroed bitsets; the caller synchronises before reading them.
__device__ __forceinline__ void mark_candidates(const Smem& s, int total, uint32_t T) {
  for (int i = threadIdx.x; i < total; i += blockDim.x) {
    const uint32_t key = s.cand_key[i], idx = s.cand_idx[i];
    if (key > T) {
      atomicOr(&s.sel[idx >> 5], 1u << (idx & 31));
    } else if (key == T) {
      atomicOr(&s.tie[idx >> 5], 1u << (idx & 31));
    }
  }
}

// 4. With sel = {key > T} and tie = {key == T} marked, take the `need` lowest-index ties, then write
// the outputs of `row`. Each thread owns a contiguous run of bitset words. Synchronises.
__device__ void finish_row(const Params& p, const Smem& s, int64_t row, int need) {
  const int tid = threadIdx.x, bd = blockDim.x, nw32 = p.nw32;
  const int wpt = (nw32 + bd - 1) / bd;
  const int w0 = min(tid * wpt, nw32), w1 = min(w0 + wpt, nw32);
  {
    int c = 0;
    for (int w = w0; w < w1; ++w) c += __popc(s.tie[w]);
    int total;
    int before = block_excl_scan(c, s.scratch, &total);
    for (int w = w0; w < w1 && before < need; ++w) {
      uint32_t m = s.tie[w];
      const int pc = __popc(m);
      if (before + pc <= need) {
        s.sel[w] |= m;
      } else {
        uint32_t r = 0u;
        for (int i = before; i < need; ++i) {
          const uint32_t low = m & (0u - m);
          r |= low;
          m ^= low;
        }
        s.sel[w] |= r;
      }
      before += pc;
    }
  }
  if (p.indices != nullptr || p.counts != nullptr) {
    int c = 0;
    for (int w = w0; w < w1; ++w) c += __popc(s.sel[w]);
    int total;
    int pos = block_excl_scan(c, s.scratch, &total);  // total == k
    int32_t* out = p.indices != nullptr ? p.indices + row * p.k : nullptr;
    for (int w = w0; w < w1; ++w) {
      uint32_t m = s.sel[w];
      while (m != 0u) {
        const int idx = w * 32 + (__ffs(m) - 1);
        m &= m - 1u;
        if (out != nullptr) out[pos] = idx;
        if (p.counts != nullptr) atomicAdd(p.counts + idx, 1ull);
        ++pos;
      }
    }
  }
  if (p.bits != nullptr) {
    __syncthreads();
    const int nw64 = nw32 / 2;
    unsigned long long* out = p.bits + row * nw64;
    for (int w = tid; w < nw64; w += bd)
      out[w] = static_cast<unsigned long long>(s.sel[2 * w]) |
               (static_cast<unsigned long long>(s.sel[2 * w + 1]) << 32);
  }
}

// Fast kernel, one block per row, the row in registers (VPT 16-byte vectors per thread):
// sample threshold -> candidates -> exact select among them. A row whose candidate count misses
// [k, cap] is appended to p.retry (count in p.retry_count) for the full kernel, and left unwritten.
template <class K, int VPT>
__global__ void __launch_bounds__(kMaxThreads) topk_abs_fast_kernel(Params p) {
  constexpr int V = K::kVec;
  using Scalar = typename K::Scalar;
  extern __shared__ uint4 smem_u4[];

  const int64_t row = blockIdx.x;
  if (p.row_mask != nullptr && !p.row_mask[row]) return;  // uniform over the block

  const int tid = threadIdx.x, bd = blockDim.x;
  const int cols = p.cols, nvec = p.nvec, nw32 = p.nw32;
  const Scalar* rowp = static_cast<const Scalar*>(p.h) + row * p.row_stride;
  const Smem s = carve_smem(smem_u4, nw32, p.cap);

  for (int i = tid; i < nw32; i += bd) {
    s.sel[i] = 0u;
    s.tie[i] = 0u;
  }
  uint4 regs[VPT];
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int v = tid + j * bd;
    regs[j] = v < nvec ? load_vec<K, true>(rowp, v, cols, p.vec_ok) : make_uint4(0u, 0u, 0u, 0u);
  }
  __syncthreads();

  // 1. threshold guess t: the sample_rank-th largest key of the sample (element 0 of each vector)
  int unused;
  const uint32_t t = radix_select<K::kKeyBits>(
      [&](auto&& f) {
        launder(regs);
#pragma unroll
        for (int j = 0; j < VPT; ++j)
          if (tid + j * bd < nvec) f(canon<K>(raw_key<K>(regs[j], 0)));
      },
      p.sample_rank, s.hist, s.scratch, &unused);

  // 2. count the keys >= t, gather them as candidates (t == 0 would not separate padding from zeros)
  const uint32_t add = K::kPacked ? (0x8000u - t) * 0x10001u : 0u;
  int n = 0;
  if (t > 0) {
    launder(regs);
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
#pragma unroll
      for (int w = 0; w < 4; ++w) n += __popc(ge_bits<K>(u4_get(regs[j], w), t, add));
    }
  }
  int total;
  int slot = block_excl_scan(n, s.scratch, &total);
  if (t == 0 || total < p.k || total > p.cap) {  // uniform: leave the row to the full kernel
    if (tid == 0) p.retry[atomicAdd(p.retry_count, 1)] = static_cast<int>(row);
    return;
  }
  launder(regs);
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int vbase = (tid + j * bd) * V;
#pragma unroll
    for (int w = 0; w < 4; ++w)
      gather_word<K>(u4_get(regs[j], w), t, add, vbase + (K::kPacked ? 2 * w : w), s, slot);
  }
  __syncthreads();

  // 3. exact threshold among the candidates (all keys >= t, so every key >= T is one of them)
  int need;
  const uint32_t T = radix_select<K::kKeyBits>(
      [&](auto&& f) {
        for (int i = tid; i < total; i += bd) f(s.cand_key[i]);
      },
      p.k, s.hist, s.scratch, &need);
  mark_candidates(s, total, T);
  __syncthreads();
  finish_row(p, s, row, need);
}

// ---- staged kernel ----------------------------------------------------------------------------------
// 16-byte asynchronous copy global -> shared memory, cached in L2 only (the row is read once).
__device__ __forceinline__ void cp_async16(uint4* dst, const uint4* src) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(__cvta_generic_to_global(src))
               : "memory");
}
// Closes this thread's copies issued since the last commit into one group (possibly empty).
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most N of this thread's most recently committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait_prior() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Issues this thread's copies (v = tid, tid + bd, ...) of a row's first nfull vectors into buf.
// rowp: 16-byte aligned (Params::vec_ok).
__device__ __forceinline__ void stage_row(uint4* buf, const void* rowp, int nfull) {
  const uint4* src = static_cast<const uint4*>(rowp);
  for (int v = threadIdx.x; v < nfull; v += blockDim.x) cp_async16(buf + v, src + v);
}

// One row of the staged kernel, from its copy buf[nvec] in shared memory (sign bits still set; vectors
// past the row's end hold zeros): the fast kernel's steps 1-3 and finish_row. The threshold guess comes
// from the block's previous settled row (t_prev, valid when have_prev; uniform over the block) and is
// updated here. A row whose candidate count misses [k, cap] with both the guess and the sample
// threshold goes to p.retry, unwritten. All threads call it; it synchronises, and its last shared-memory
// accesses need a barrier before buf or the bitsets are reused.
template <class K>
__device__ __forceinline__ void staged_row(const Params& p, const Smem& s, const uint4* buf, int64_t row,
                                           uint32_t& t_prev, bool& have_prev) {
  constexpr int V = K::kVec;
  const int tid = threadIdx.x, bd = blockDim.x, nvec = p.nvec;
  for (int i = tid; i < p.nw32; i += bd) {  // the scans / selects below synchronise before the marking
    s.sel[i] = 0u;
    s.tie[i] = 0u;
  }
  // number of keys >= t (1 <= t <= kNanKey, so padding zeros never count) in this thread's vectors
  auto count_ge = [&](uint32_t t) {
    const uint32_t add = K::kPacked ? (0x8000u - t) * 0x10001u : 0u;
    int n = 0;
    for (int v = tid; v < nvec; v += bd) {
      uint4 u = buf[v];
      clear_signs<K>(u);
#pragma unroll
      for (int w = 0; w < 4; ++w) n += __popc(ge_bits<K>(u4_get(u, w), t, add));
    }
    return n;
  };

  // 1. t with k <= #(keys >= t) <= cap: first the previous row's threshold lowered by a margin (rows of
  // one batch have similar magnitudes), else the sample threshold of the fast kernel. Any such t gives
  // the exact result: the candidates {keys >= t} contain the k largest.
  uint32_t t = 0;
  int total = 0, slot = 0;
  bool ok = false;
  if (have_prev) {
    t = t_prev > K::kGuessMargin ? t_prev - K::kGuessMargin : 1u;
    slot = block_excl_scan(count_ge(t), s.scratch, &total);
    ok = total >= p.k && total <= p.cap;
  }
  if (!ok) {
    int unused;
    t = radix_select<K::kKeyBits, true>(
        [&](auto&& f) {
          for (int v0 = 0; v0 < nvec; v0 += bd) {  // the same trip count in all lanes
            const int v = v0 + tid;
            const bool valid = v < nvec;
            uint4 u = make_uint4(valid ? buf[v].x : 0u, 0u, 0u, 0u);  // element 0 of the vector
            clear_signs<K>(u);
            f(canon<K>(raw_key<K>(u, 0)), valid);
          }
        },
        p.sample_rank, s.hist, s.scratch, &unused);
    slot = block_excl_scan(t > 0 ? count_ge(t) : 0, s.scratch, &total);
    ok = t > 0 && total >= p.k && total <= p.cap;
  }
  if (!ok) {  // uniform: leave the row to the full kernel
    if (tid == 0) p.retry[atomicAdd(p.retry_count, 1)] = static_cast<int>(row);
    return;
  }

  // 2. gather the candidates, in the order count_ge counted them
  {
    const uint32_t add = K::kPacked ? (0x8000u - t) * 0x10001u : 0u;
    for (int v = tid; v < nvec; v += bd) {
      uint4 u = buf[v];
      clear_signs<K>(u);
#pragma unroll
      for (int w = 0; w < 4; ++w) gather_word<K>(u4_get(u, w), t, add, v * V + (K::kPacked ? 2 * w : w), s, slot);
    }
  }
  __syncthreads();

  // 3. exact threshold among the candidates, mark, outputs
  int need;
  const uint32_t T = radix_select<K::kKeyBits, true>(
      [&](auto&& f) {
        for (int i0 = 0; i0 < total; i0 += bd) {  // the same trip count in all lanes
          const int i = i0 + tid;
          const bool valid = i < total;
          f(valid ? s.cand_key[i] : 0u, valid);
        }
      },
      p.k, s.hist, s.scratch, &need);
  mark_candidates(s, total, T);
  __syncthreads();
  finish_row(p, s, row, need);
  t_prev = T;
  have_prev = true;
}

// Staged kernel: a persistent grid (gridDim.x <= rows); block b handles rows b, b + gridDim.x, ... Each
// row is copied into shared memory with cp.async one iteration ahead, into two alternating buffers, so
// that the next row's loads run while the current row is selected. Dynamic shared memory:
// buf[2][nvec] (uint4) | the fast kernel's layout (carve_smem, with cap). Needs p.vec_ok,
// blockDim.x % 32 == 0, and p.retry (same meaning as for the fast kernel).
template <class K>
__global__ void __launch_bounds__(kMaxThreads) topk_abs_staged_kernel(Params p) {
  constexpr int V = K::kVec;
  using Scalar = typename K::Scalar;
  extern __shared__ uint4 smem_u4[];

  const int nvec = p.nvec;
  const int nfull = p.cols / V;  // whole vectors, copied by cp.async; a partial last one (nfull < nvec)
                                 // is loaded directly, zero-padded
  const Smem s = carve_smem(smem_u4 + 2 * nvec, p.nw32, p.cap);
  const Scalar* const h = static_cast<const Scalar*>(p.h);
  const int64_t stride = p.row_stride, grid = gridDim.x;

  stage_row(smem_u4, h + blockIdx.x * stride, nfull);  // the first row into buffer 0
  cp_async_commit();
  uint32_t t_prev = 0;     // the threshold key of the block's last settled row ...
  bool have_prev = false;  // ... once there is one (both uniform over the block)
  int it = 0;
#pragma unroll 1
  for (int64_t row = blockIdx.x; row < p.rows; row += grid, ++it) {
    uint4* const buf = smem_u4 + (it & 1) * nvec;  // this row, copies issued in the previous iteration
    const Scalar* const rowp = h + row * stride;
    // The other buffer held the previous row; the barrier that ended the previous iteration follows
    // every read of it, so the next row can be copied into it now.
    if (row + grid < p.rows) stage_row(smem_u4 + ((it + 1) & 1) * nvec, rowp + grid * stride, nfull);
    cp_async_commit();  // exactly one group per iteration: "all but the newest" is this row's
    if (nfull < nvec && threadIdx.x == 0) buf[nfull] = load_vec<K, true>(rowp, nfull, p.cols, true);
    cp_async_wait_prior<1>();
    __syncthreads();  // every thread's copies of this row (and the tail) are visible
    if (p.row_mask == nullptr || p.row_mask[row])  // uniform over the block
      staged_row<K>(p, s, buf, row, t_prev, have_prev);
    __syncthreads();  // buf, bitsets, candidates and scratch are free for the next iterations
  }
}

// Full kernel: exact radix select over the whole row, re-read from global memory (L2) in every pass.
// Block b handles row p.retry[b] when p.retry is set (rows the fast kernel left, p.retry_count of
// them), else row b.
template <class K>
__global__ void __launch_bounds__(kMaxThreads) topk_abs_full_kernel(Params p) {
  constexpr int V = K::kVec;
  constexpr int G = 32 / V;  // lanes whose vectors share one 32-bit word of a bitset
  using Scalar = typename K::Scalar;
  extern __shared__ uint4 smem_u4[];

  const int tid = threadIdx.x, bd = blockDim.x, lane = tid & 31;
  const int cols = p.cols, nvec = p.nvec, nw32 = p.nw32;
  const Smem s = carve_smem(smem_u4, nw32, 0);
  const int64_t items = p.retry != nullptr ? static_cast<int64_t>(*p.retry_count) : p.rows;
#pragma unroll 1
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t row = p.retry != nullptr ? static_cast<int64_t>(p.retry[item]) : item;
    if (p.retry == nullptr && p.row_mask != nullptr && !p.row_mask[row]) continue;  // uniform
    const Scalar* rowp = static_cast<const Scalar*>(p.h) + row * p.row_stride;
    for (int i = tid; i < nw32; i += bd) {
      s.sel[i] = 0u;
      s.tie[i] = 0u;
    }
    __syncthreads();

    int need;
    const uint32_t T = radix_select<K::kKeyBits>(
        [&](auto&& f) {
          for (int v = tid; v < nvec; v += bd) {
            const uint4 u = load_vec<K>(rowp, v, cols, p.vec_ok);
#pragma unroll
            for (int e = 0; e < V; ++e)
              if (v * V + e < cols) f(canon<K>(raw_key<K>(u, e)));
          }
        },
        p.k, s.hist, s.scratch, &need);

    // Mark: each vector gives V bits of a 32-bit word shared by G consecutive lanes; OR them with
    // shuffles and let the group's first lane store the word (every word is written exactly once).
    const int nvec_pad = (nvec + bd - 1) / bd * bd;  // whole warps take part in the shuffles
    for (int v = tid; v < nvec_pad; v += bd) {
      const uint4 u = v < nvec ? load_vec<K>(rowp, v, cols, p.vec_ok) : make_uint4(0u, 0u, 0u, 0u);
      uint32_t gt = 0u, eq = 0u;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        if (v * V + e < cols) {
          const uint32_t key = canon<K>(raw_key<K>(u, e));
          gt |= (key > T ? 1u : 0u) << e;
          eq |= (key == T ? 1u : 0u) << e;
        }
      }
      const int sh = (v % G) * V;
      gt <<= sh;
      eq <<= sh;
#pragma unroll
      for (int o = 1; o < G; o <<= 1) {
        gt |= __shfl_xor_sync(kFull, gt, o);
        eq |= __shfl_xor_sync(kFull, eq, o);
      }
      if ((lane % G) == 0 && v / G < nw32) {
        s.sel[v / G] = gt;
        s.tie[v / G] = eq;
      }
    }
    __syncthreads();
    finish_row(p, s, row, need);
    __syncthreads();  // shared memory is reused by the next row
  }
}

// ---- host side ------------------------------------------------------------------------------------
void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw Error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(err));
}

int round32(int64_t x) { return static_cast<int>(std::max<int64_t>(32, (x + 31) / 32 * 32)); }

// Threads per block of the staged kernel for rows of nvec vectors: kStagedThreads, or
// SPARSECL_TOPK_STAGED_THREADS (a multiple of 32 in [32, 512]; a tuning hook), at most one per vector.
// Why 512, the most a block may have: at I = 14336 bf16, k = 143 a block needs 72.4 KB of shared memory
// (two 28 KB row buffers), so shared memory alone caps an SM at 3 blocks (H200; 2 on an A100) whatever
// their size, and 3 x 512 threads fit the register file (32 registers per thread on sm_90, 40 on sm_80).
// The per-row phases are barrier-separated passes over the staged row (3-4 vectors per thread at 512):
// more threads per block shorten each phase while the rows in flight per SM stay the same.
int staged_threads(int64_t nvec) {
  static const int forced = [] {
    const char* e = std::getenv("SPARSECL_TOPK_STAGED_THREADS");
    return e != nullptr ? std::atoi(e) : 0;
  }();
  const int want = forced >= 32 && forced <= kMaxThreads && forced % 32 == 0 ? forced : kStagedThreads;
  return std::min(want, round32(nvec));
}

template <class Kernel>
void launch_kernel(Kernel kernel, const Params& p, int64_t blocks, int threads, size_t smem, cudaStream_t stream,
                   const char* what) {
  if (smem > 48 * 1024)
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
               what);
  kernel<<<static_cast<unsigned>(blocks), threads, smem, stream>>>(p);
  check_cuda(cudaGetLastError(), what);
}

// Staged kernel, for TopkPath::kStaged once the fast kernel's conditions hold and p.sample_rank, p.cap
// and p.retry are set (smem: the fast kernel's shared memory for that cap). Launches it and returns true
// when it applies: 16-byte loads allowed, and the two row buffers on top of smem leave room for at least
// 2 blocks of `threads` per SM; returns false, launching nothing, otherwise.
template <class K>
bool launch_staged(const Params& p, size_t smem, int threads, int sms, int optin, cudaStream_t stream) {
  if (!p.vec_ok) return false;
  const size_t staged_smem = smem + 2 * sizeof(uint4) * static_cast<size_t>(p.nvec);
  if (staged_smem > static_cast<size_t>(optin)) return false;
  const auto kernel = topk_abs_staged_kernel<K>;
  // Blocks per SM are bounded by shared memory: prefer the largest shared-memory carveout (the kernel
  // hardly uses L1), allow the dynamic size, then ask the occupancy calculator.
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                  static_cast<int>(cudaSharedmemCarveoutMaxShared)),
             "topk_abs staged");
  if (staged_smem > 48 * 1024)
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(staged_smem)),
               "topk_abs staged");
  int per_sm = 0;
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, staged_smem), "topk_abs staged");
  if (per_sm < 2) return false;
  const int64_t blocks = std::min<int64_t>(p.rows, static_cast<int64_t>(sms) * per_sm);  // persistent grid
  kernel<<<static_cast<unsigned>(blocks), threads, staged_smem, stream>>>(p);
  check_cuda(cudaGetLastError(), "topk_abs staged");
  return true;
}

template <class K>
void launch_kind(const TopkLaunch& a, cudaStream_t stream) {
  constexpr int V = K::kVec;
  if (a.cols >= (int64_t{1} << 30)) throw Error("topk_abs: h has too many columns: " + std::to_string(a.cols));
  if (a.rows >= (int64_t{1} << 31)) throw Error("topk_abs: h has too many rows: " + std::to_string(a.rows));
  Params p{};
  p.h = a.h;
  p.row_stride = a.row_stride;
  p.rows = a.rows;
  p.cols = static_cast<int>(a.cols);
  p.k = static_cast<int>(a.k);
  p.nvec = static_cast<int>((a.cols + V - 1) / V);
  p.nw32 = static_cast<int>(2 * ((a.cols + 63) / 64));
  p.indices = a.indices;
  p.bits = reinterpret_cast<unsigned long long*>(a.bits);
  p.counts = reinterpret_cast<unsigned long long*>(a.counts);
  p.row_mask = a.row_mask;
  const size_t elem = sizeof(typename K::Scalar);
  p.vec_ok = reinterpret_cast<uintptr_t>(a.h) % 16 == 0 && (a.row_stride * elem) % 16 == 0;

  int device = 0, optin = 0, sms = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "cudaDeviceGetAttribute");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  const size_t base_smem = sizeof(uint32_t) * (256 + 64 + 2 * static_cast<size_t>(p.nw32));
  if (base_smem > static_cast<size_t>(optin))
    throw Error("topk_abs: I = " + std::to_string(a.cols) + " needs " + std::to_string(base_smem) +
                " bytes of shared memory per block, the device allows " + std::to_string(optin));

  // Fast kernel: the row must fit in registers (vectors per thread VPT, at most 512 threads), and the
  // candidate buffer must be small. With s = nvec sampled keys and q the sample rank, #(keys >= t) is
  // about q * cols / s with relative spread 1/sqrt(q); cap leaves 8 standard deviations plus 256.
  const int64_t nvec = p.nvec;
  int vpt = 0, threads = 0;
  if (nvec <= 4 * 64) {
    vpt = 4, threads = round32((nvec + 3) / 4);
  } else if (nvec <= 8 * kMaxThreads) {
    vpt = 8, threads = round32((nvec + 7) / 8);
  } else if (nvec <= 16 * kMaxThreads) {
    vpt = 16, threads = round32((nvec + 15) / 16);
  }
  // Tuning hook: SPARSECL_TOPK_VPT=4|8|16 forces the vectors per thread of the fast kernel (when the
  // row fits in 512 threads): fewer threads per row and more rows resident per SM, or the reverse.
  static const int forced_vpt = [] {
    const char* e = std::getenv("SPARSECL_TOPK_VPT");
    return e != nullptr ? std::atoi(e) : 0;
  }();
  if (vpt > 0 && (forced_vpt == 4 || forced_vpt == 8 || forced_vpt == 16) &&
      nvec <= static_cast<int64_t>(forced_vpt) * kMaxThreads) {
    vpt = forced_vpt;
    threads = round32((nvec + vpt - 1) / vpt);
  }
  bool fast = false;  // the fast or the staged kernel ran: the full kernel takes the rows they left
  if (vpt > 0 && a.path != TopkPath::kFull && a.workspace != nullptr) {
    const double ks = static_cast<double>(a.k) * nvec / a.cols;
    const int64_t q = static_cast<int64_t>(std::ceil(2.0 * ks + 4.0 * std::sqrt(ks) + 8.0));
    const double scale = static_cast<double>(a.cols) / nvec;
    const double expect = q * scale, sigma = std::sqrt(static_cast<double>(q)) * scale;
    const int64_t cap = (static_cast<int64_t>(expect + 8.0 * sigma) + 256 + 255) / 256 * 256;
    const size_t smem = base_smem + 2 * sizeof(uint32_t) * static_cast<size_t>(cap);
    if (q <= nvec && cap <= kMaxCap && cap < a.cols && smem <= static_cast<size_t>(optin)) {
      fast = true;
      p.sample_rank = static_cast<int>(q);
      p.cap = static_cast<int>(cap);
      p.retry = a.workspace + 1;
      p.retry_count = a.workspace;
      check_cuda(cudaMemsetAsync(a.workspace, 0, sizeof(int32_t), stream), "topk_abs workspace");
      if (a.path != TopkPath::kStaged || !launch_staged<K>(p, smem, staged_threads(nvec), sms, optin, stream)) {
        switch (vpt) {
          case 4: launch_kernel(topk_abs_fast_kernel<K, 4>, p, a.rows, threads, smem, stream, "topk_abs fast"); break;
          case 8: launch_kernel(topk_abs_fast_kernel<K, 8>, p, a.rows, threads, smem, stream, "topk_abs fast"); break;
          default: launch_kernel(topk_abs_fast_kernel<K, 16>, p, a.rows, threads, smem, stream, "topk_abs fast"); break;
        }
      }
    }
  }
  // Full kernel: every row, or the rows the fast / staged kernel left (their count is only known on the device:
  // a fixed grid loops over them, most blocks exit at once when there are none).
  if (!fast) {
    p.retry = nullptr;
    p.retry_count = nullptr;
  }
  p.cap = 0;
  const int full_threads = static_cast<int>(std::min<int64_t>(kMaxThreads, round32((nvec + 3) / 4)));
  const int64_t full_blocks = std::min<int64_t>(a.rows, static_cast<int64_t>(sms) * (fast ? 2 : 16));
  launch_kernel(topk_abs_full_kernel<K>, p, std::max<int64_t>(1, full_blocks), full_threads, base_smem, stream,
                "topk_abs full");
}

}  // namespace

void launch_topk_abs(const TopkLaunch& args, void* stream) {
  if (args.rows == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  switch (args.kind) {
    case ScalarKind::f32: launch_kind<F32Keys>(args, s); break;
    case ScalarKind::bf16: launch_kind<Bf16Keys>(args, s); break;
    case ScalarKind::f16: launch_kind<F16Keys>(args, s); break;
  }
}

}  // namespace sparsecl::kernels::detail
