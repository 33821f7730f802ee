// Internals shared by the kernel dispatchers (src/kernels/*.cpp), the CUDA launchers (src/kernels/*.cu)
// and the kernel tests: argument checks, and the plain-data launch interfaces of the .cu files (no ATen
// types cross into nvcc-compiled code, which keeps the .cu files small and quick to compile).
#pragma once
#include <cstdint>
#include <string>

namespace at { class Tensor; }

namespace sparsecl::kernels::detail {

// ---- argument checks (throw sparsecl::Error naming the argument) ---------------------------------
// h must be 2-D [N, I] float32 | bfloat16 | float16 and 1 <= k <= I.
void check_activations(const at::Tensor& h, int64_t k, const char* op);
// t must be an int64 tensor of rank `dim`.
void check_bitset(const at::Tensor& t, int64_t dim, const char* name, const char* op);
std::string shape_str(const at::Tensor& t);

// ---- CPU reference core ---------------------------------------------------------------------------
// hf: float32 [N, I] contiguous CPU. Writes each row's top-k (|h| desc, index asc; NaN above +inf) in
// ascending index order to out[row * k ...]. Parallel over rows.
void topk_abs_rows_cpu(const at::Tensor& hf, int64_t k, int32_t* out);

// CUDA h [N, I] (checked by the caller): counts[j] += 1 for every row (with row_mask[row] true, or all
// rows when row_mask is null) whose top-k contains j. counts: int64 [I] on h's device.
void topk_abs_counts_cuda(const at::Tensor& h, int64_t k, int64_t* counts, const bool* row_mask);

// ---- CUDA launch interfaces ----------------------------------------------------------------------
enum class ScalarKind : int { f32 = 0, bf16 = 1, f16 = 2 };

// Which algorithm the top-k kernel uses for a row. kAuto: sample-threshold + candidate filter when the
// row fits in registers and k is small enough, with an exact fallback to kFull per row; kFull: radix
// select over the whole row (what large k and fallback rows use); kStaged: where kAuto's filter applies
// and the rows are 16-byte aligned, the same filter in persistent blocks that stage rows in shared
// memory with cp.async (double-buffered) and guess each row's threshold from the previous one, with the
// same per-row fallback to kFull; elsewhere exactly kAuto (a candidate default, chosen only by
// measurement). Results are identical.
enum class TopkPath : int { kAuto = 0, kFull = 1, kStaged = 2 };

struct TopkLaunch {
  const void* h = nullptr;  // [rows, cols] with inner stride 1, rows row_stride elements apart
  int64_t rows = 0, cols = 0, row_stride = 0;
  int64_t k = 0;
  ScalarKind kind = ScalarKind::f32;
  int32_t* indices = nullptr;     // optional out [rows, k], ascending neuron index
  int64_t* bits = nullptr;        // optional out [rows, ceil(cols/64)]
  int64_t* counts = nullptr;      // optional in/out [cols]: += 1 per selected (row, neuron)
  const bool* row_mask = nullptr; // optional [rows]: rows with false are skipped entirely
  TopkPath path = TopkPath::kAuto;
  int32_t* workspace = nullptr;   // [rows + 1] device ints for the fast path (null: full path only)
};
// Throws sparsecl::Error on launch failure. stream: a cudaStream_t.
void launch_topk_abs(const TopkLaunch& args, void* stream);

struct ColAbsSumLaunch {
  const void* h = nullptr;  // [rows, cols], inner stride 1
  int64_t rows = 0, cols = 0, row_stride = 0;
  ScalarKind kind = ScalarKind::f32;
  const bool* row_mask = nullptr;  // optional [rows]
  void* out = nullptr;             // [cols] float64 or float32, in/out (+=)
  bool out_is_double = true;
};
void launch_col_abs_sum(const ColAbsSumLaunch& args, void* stream);

// bits are int64 words viewed as uint64; rows of a and b are `words` long with the given row strides.
void launch_pair_iou(const uint64_t* a, int64_t stride_a, const uint64_t* b, int64_t stride_b,
                     int64_t pairs, int64_t words, float* out, void* stream);
void launch_intersection_counts(const uint64_t* x, int64_t stride_x, int64_t n, const uint64_t* y,
                                int64_t stride_y, int64_t m, int64_t words, int32_t* out, void* stream);
// indices: [rows, k] contiguous, int32 (is64 false) or int64; out: [rows, words] zeroed beforehand.
void launch_indices_to_bitset(const void* indices, bool is64, int64_t rows, int64_t k, int64_t words,
                              uint64_t* out, void* stream);

}  // namespace sparsecl::kernels::detail
