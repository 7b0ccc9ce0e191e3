// lmarith native CPU kernels: raw-pointer faces of kernels/reference.py (combine, sample) and
// kernels/reference_speculative.py (spec_accept), kernels/reference_attention.py (paged_attention).
// No torch headers: callers pass contiguous buffers; the pybind11 module wraps these.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace lmarith {

// Element type of the stacked logits handed to combine.
enum class LogitsDtype : int { kFloat32 = 0, kBFloat16 = 1 };

// A compiled formula plan, row-major: weights [B, R, T], consts [B, R],
// group_coefs [B, G], group_kinds [B, G] (+1 max / Union, -1 min / Intersection), and the
// optional plausibility mask mask_weights [B, T], mask_log_alpha [B] (both null: no row is
// masked; a row with mask_log_alpha -inf is unmasked).
struct CombinePlan {
  const float* weights;
  const float* consts;
  const float* group_coefs;
  const int32_t* group_kinds;
  int64_t num_blocks;  // R = 1 + 2 * G
  int64_t num_groups;  // G
  const float* mask_weights = nullptr;
  const float* mask_log_alpha = nullptr;
};

// Per-row sampling controls, each an array of length B.
struct SampleParams {
  const float* temperature;
  const int32_t* top_k;
  const float* top_p;
  const float* min_p;
  const int64_t* seed;
  const int64_t* step;
};

// log_probs [B, V] and lse [B] from logits [T, B, V] and a plan (reference.combine).
void combine(const void* logits, LogitsDtype dtype, int64_t num_terms, int64_t batch,
             int64_t vocab, const CombinePlan& plan, float* log_probs, float* lse);

// One token per row of log_probs [B, V] (reference.sample), written to tokens [B].
void sample(const float* log_probs, int64_t batch, int64_t vocab, const SampleParams& params,
            int64_t* tokens);

// Inputs of spec_accept, row-major: target_log_probs [B, K+1, V], draft_log_probs [B, K, V],
// draft_tokens [B, K]; num_drafts (0..K), seed, step and greedy (0/1) per row [B].
struct SpecAcceptInputs {
  const float* target_log_probs;
  const float* draft_log_probs;
  const int64_t* draft_tokens;
  const int32_t* num_drafts;
  const int64_t* seed;
  const int64_t* step;
  const uint8_t* greedy;
};

// Speculative verification (reference_speculative.spec_accept): the number of leading
// proposals accepted per row, num_accepted [B], and the corrected or bonus token, next_token [B].
void spec_accept(const SpecAcceptInputs& inputs, int64_t batch, int64_t max_drafts, int64_t vocab,
                 int32_t* num_accepted, int64_t* next_token);

// True when the library was built with OpenMP (rows run in parallel).
bool built_with_openmp();

// Element type of paged-attention queries, outputs and caches.
enum class AttnDtype : int { kFloat32 = 0, kBFloat16 = 1 };

// One layer's key or value cache [num_pages, page_size, kv_heads, head_dim], possibly a
// strided view of a larger arena: element strides per page, slot and head; head_dim is
// contiguous.
struct PagedCacheView {
  const void* data;
  int64_t page_stride, slot_stride, head_stride;
};

// Inputs of paged_attention (kernels/reference_attention.py): query [N, H, D] (element
// strides per row and head, D contiguous), the caches, the step's metadata (int64:
// query_start [S+1], context_lens [S], block_tables [S, table_width]) and out [N, H, D]
// contiguous in the query's dtype. sliding_window 0: none.
struct PagedAttentionArgs {
  const void* query;
  AttnDtype query_dtype;
  int64_t num_tokens, num_heads, head_dim, query_row_stride, query_head_stride;
  PagedCacheView key, value;
  AttnDtype cache_dtype;
  int64_t page_size, kv_heads;
  const int64_t* query_start;
  const int64_t* context_lens;
  const int64_t* block_tables;
  int64_t num_seqs, table_width, max_context_len;
  float scale;
  int64_t sliding_window;
  void* out;
};

// Causal (optionally sliding-window) attention of each query row over its sequence's paged
// K/V, read in place through the block table with one online-softmax pass.
void paged_attention(const PagedAttentionArgs& args);

// GGML block formats of quant_matmul's weights (kernels/quant_formats.py, same order as
// bindings/cpp.py's codes) and the instruction paths its kernels have.
enum class QuantType : int {
  kQ8_0 = 0, kQ4_0 = 1, kQ4_1 = 2, kQ4_K = 3, kQ6_K = 4, kQ5_0 = 5, kQ5_1 = 6
};
enum class QuantIsa : int { kAuto = 0, kScalar = 1, kAvx2 = 2, kVnni = 3 };

// out [M, N] f32 = x [M, K] (f32 or bf16, row-major) @ W.T for W [N, K] in GGML blocks
// (weight [N, row_bytes] uint8): activations quantised per 32-block to int8, int8 dot
// products on the chosen path (kAuto: the best this CPU runs), OpenMP over rows of W.
void quant_matmul(const void* x, LogitsDtype x_dtype, int64_t m, int64_t k,
                  const uint8_t* weight, QuantType qtype, int64_t n, int64_t row_bytes,
                  QuantIsa isa, float* out);

// One part of a quantized weight made of row blocks in several formats (a fused q/k/v or
// gate/up whose parts a GGUF file stores differently): [rows, row_bytes] GGML blocks.
struct QuantPart {
  const uint8_t* data;
  QuantType qtype;
  int64_t rows, row_bytes;
};

// Share `share` of `shares` of out [M, sum of the parts' rows] (row stride out_stride) =
// x @ W.T (+ bias), W the parts' rows concatenated, on the calling thread only: for thread
// teams that split one product (csrc/decoder_stack.cpp). Each share quantises x itself.
void quant_matmul_share(const void* x, LogitsDtype x_dtype, int64_t m, int64_t k,
                        const QuantPart* parts, int64_t count, QuantIsa isa, const float* bias,
                        float* out, int64_t out_stride, int share, int shares);

// Whether this CPU (and build) can run a quant_matmul path (kAuto, kScalar: always).
bool quant_isa_supported(QuantIsa isa);

namespace detail {

constexpr float kInf = std::numeric_limits<float>::infinity();
// Row kernels (combine, sample, spec_accept) split rows across threads only from this many
// logits: waking a passive OpenMP team costs ~50-100 us on the 2-core hosts measured, more
// than a batch-1 step's combine or sample of a 49K vocabulary takes on one thread.
constexpr int64_t kParallelRowElements = int64_t{1} << 18;

inline uint32_t float_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

inline float bits_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline float bf16_to_float(uint16_t bits) { return bits_float(static_cast<uint32_t>(bits) << 16); }

// Round-to-nearest-even bfloat16 (NaN stays NaN).
inline uint16_t float_to_bf16(float value) {
  const uint32_t bits = float_bits(value);
  if (value != value) return static_cast<uint16_t>((bits >> 16) | 0x40);
  return static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

// True for finite values; false for +-inf and NaN. Branch-free so loops vectorise.
inline bool is_finite(float value) { return std::fabs(value) < kInf; }

// Cody-Waite range reduction x = n*ln2 + r and a degree-6 polynomial for exp(r): returns
// exp(r) and sets exponent to n. x must already be clamped to the float32 exp range.
inline float exp_reduced(float clamped, int32_t& exponent) {
  constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float shifted = clamped * 1.44269504088896341f + kRoundMagic;
  const float whole = shifted - kRoundMagic;
  exponent = static_cast<int32_t>(float_bits(shifted) - float_bits(kRoundMagic));
  float r = clamped - whole * 0.693359375f;
  r = r - whole * -2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  return poly * r * r + r + 1.0f;
}

// exp(x) in float32 to ~1 ulp, branch-free so loops over it vectorise (glibc's expf does
// not without -ffast-math). exp(-inf) = 0, exp(+inf) = inf, NaN propagates, denormal
// results are produced down to ~2^-150.
inline float fast_exp(float x) {
  constexpr float kHigh = 88.72283935546875f;
  constexpr float kLow = -103.97207641601562f;
  float clamped = x < kLow ? kLow : x;
  clamped = clamped > kHigh ? kHigh : clamped;
  int32_t exponent;
  const float poly = exp_reduced(clamped, exponent);
  // Two scale factors so exponents below -126 still give denormals.
  const int32_t half = exponent >> 1;
  const float scale_a = bits_float(static_cast<uint32_t>(half + 127) << 23);
  const float scale_b = bits_float(static_cast<uint32_t>(exponent - half + 127) << 23);
  float result = poly * scale_a * scale_b;
  result = x < kLow ? 0.0f : result;
  result = x > kHigh ? kInf : result;
  return result;
}

// exp(x) for x <= 0 (or NaN, which propagates), cheaper than fast_exp: inputs below
// -87.33 give ~1.2e-38 instead of 0 or a denormal, harmless in sums that hold exp(0) = 1
// (log-sum-exp after subtracting the max).
inline float exp_nonpositive(float x) {
  constexpr float kLow = -87.33f;
  const float clamped = x < kLow ? kLow : x;
  int32_t exponent;
  const float poly = exp_reduced(clamped, exponent);
  return poly * bits_float(static_cast<uint32_t>(exponent + 127) << 23);
}

constexpr uint32_t kGolden = 0x9E3779B9u;

// lowbias32 integer hash (reference.mix32).
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// Per-row hash state from the 64-bit seed and the step's low 32 bits (reference.row_key).
inline uint32_t row_key(int64_t seed, int64_t step) {
  const uint64_t bits = static_cast<uint64_t>(seed);
  uint32_t key = mix32(static_cast<uint32_t>(bits) ^ kGolden);
  key = mix32(key ^ static_cast<uint32_t>(bits >> 32));
  return mix32(key ^ static_cast<uint32_t>(static_cast<uint64_t>(step)));
}

// reference.uniform in float32: 23 hash bits + 0.5 fit the 24-bit mantissa exactly,
// so u lies in [2^-24, 1 - 2^-24], never 0 or 1.
inline float uniform_from_hash(uint32_t hash) {
  return (static_cast<float>(hash >> 9) + 0.5f) * 0x1p-23f;
}

// The largest non-NaN value of values[0, count) (-inf if none); any_nan says whether NaN occurs.
inline float max_ignoring_nan(const float* values, int64_t count, int& any_nan) {
  float best = -kInf;
  int nan_seen = 0;
#pragma omp simd reduction(max : best) reduction(| : nan_seen)
  for (int64_t i = 0; i < count; ++i) {
    best = values[i] > best ? values[i] : best;
    nan_seen |= values[i] != values[i];
  }
  any_nan = nan_seen;
  return best;
}

// torch.argmax: the first maximal value, where NaN counts as the maximum (0 for an all -inf row).
inline int64_t argmax_first(const float* values, int64_t count) {
  int any_nan = 0;
  const float best = max_ignoring_nan(values, count, any_nan);
  for (int64_t i = 0; i < count; ++i)
    if (any_nan ? values[i] != values[i] : values[i] == best) return i;
  return 0;
}

}  // namespace detail
}  // namespace lmarith
