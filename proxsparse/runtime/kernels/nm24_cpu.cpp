// Packed 2:4 matrix products on the CPU.
//
// The kernel reads the weight in its own tiled layout, made from the canonical packed format
// of proxsparse/runtime/format.py by proxsparse/runtime/backends.py (CpuKernel.prepare):
//
//   rows in blocks of 8, inputs in words of 32 (16 kept values, their 2-bit positions in one
//   int32: bits 2k..2k+1 hold the in-group position of value k), words in pairs. For every
//   block and pair of words, one tile of bytes:
//     [2 words][8 rows] uint32 positions   (64 bytes)
//     [2 words][8 rows][16] kept values    (fp32: 1024 bytes, bf16: 512 bytes)
//   Tiles follow each other block by block, so each thread reads one contiguous stream, which
//   the hardware prefetcher follows (software prefetching measured slower: 1.5-1.7x against
//   1.8-2.1x over dense at batch 1).
//
// Each kept value picks its input with an in-register permute of the word's 32 inputs
// (AVX-512: vpermt2ps; AVX2: two vpermps and a blend): no memory gather. x must be fp32,
// padded with zeros to 64 * pairs columns; padded rows and values are zero.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace {

using bf16 = at::BFloat16;

constexpr int kRows = 8;          // rows per block
constexpr int kWordsPerTile = 2;  // words per tile

inline float to_float(float v) { return v; }
inline float to_float(bf16 v) { return static_cast<float>(v); }

template <typename V>
constexpr int64_t tile_bytes() {
  return kWordsPerTile * kRows * (4 + 16 * static_cast<int64_t>(sizeof(V)));
}

struct Shape {
  int64_t out, blocks, pairs, tokens, xstride;
};

// ---------------------------------------------------------------- portable (any CPU)

template <typename V>
void blocks_portable(const Shape& s, const float* x, const uint8_t* tiles, float* y, int64_t b0,
                     int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t t = 0; t < s.tokens; ++t) {
      float acc[kRows] = {};
      const float* xt = x + t * s.xstride;
      for (int64_t p = 0; p < s.pairs; ++p) {
        const uint8_t* tile = tiles + (b * s.pairs + p) * tile_bytes<V>();
        const uint32_t* pos = reinterpret_cast<const uint32_t*>(tile);
        const V* val = reinterpret_cast<const V*>(tile + kWordsPerTile * kRows * 4);
        for (int h = 0; h < kWordsPerTile; ++h) {
          const float* xc = xt + (2 * p + h) * 32;
          for (int r = 0; r < kRows; ++r) {
            const uint32_t bits = pos[h * kRows + r];
            const V* v = val + (h * kRows + r) * 16;
            for (int k = 0; k < 16; ++k) {
              acc[r] += to_float(v[k]) * xc[(k >> 1) * 4 + ((bits >> (2 * k)) & 3u)];
            }
          }
        }
      }
      for (int r = 0; r < kRows && b * kRows + r < s.out; ++r) y[t * s.out + b * kRows + r] = acc[r];
    }
  }
}

// ---------------------------------------------------------------- AVX-512

__attribute__((target("avx512f"))) inline __m512 load16(const float* p) {
  return _mm512_loadu_ps(p);
}

__attribute__((target("avx512f"))) inline __m512 load16(const bf16* p) {
  // a bf16 is the upper half of an fp32: widen to 32 bits and shift into place
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// Where each of a word's 16 kept values finds its input among the word's 32: group base
// (0, 0, 4, 4, ...) plus the value's 2-bit position.
__attribute__((target("avx512f"))) inline __m512i input_lanes(uint32_t bits) {
  const __m512i shifts =
      _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base =
      _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i word = _mm512_set1_epi32(static_cast<int>(bits));
  return _mm512_add_epi32(_mm512_and_si512(_mm512_srlv_epi32(word, shifts),
                                           _mm512_set1_epi32(3)), base);
}

// One block of 8 rows against T tokens (T = 1 or 2: 8T accumulators stay in registers).
template <typename V, int T>
__attribute__((target("avx512f"))) void block_avx512(const Shape& s, const float* x,
                                                     const uint8_t* tiles, float* y) {
  __m512 acc[kRows][T];
  for (int r = 0; r < kRows; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t p = 0; p < s.pairs; ++p) {
    const uint8_t* tile = tiles + p * tile_bytes<V>();
    const uint32_t* pos = reinterpret_cast<const uint32_t*>(tile);
    const V* val = reinterpret_cast<const V*>(tile + kWordsPerTile * kRows * 4);
    for (int h = 0; h < kWordsPerTile; ++h) {
      __m512 lo[T], hi[T];
      for (int t = 0; t < T; ++t) {
        const float* xc = x + t * s.xstride + (2 * p + h) * 32;
        lo[t] = _mm512_loadu_ps(xc);
        hi[t] = _mm512_loadu_ps(xc + 16);
      }
      for (int r = 0; r < kRows; ++r) {
        const __m512i sel = input_lanes(pos[h * kRows + r]);
        const __m512 v = load16(val + (h * kRows + r) * 16);
        for (int t = 0; t < T; ++t) {
          acc[r][t] = _mm512_fmadd_ps(v, _mm512_permutex2var_ps(lo[t], sel, hi[t]), acc[r][t]);
        }
      }
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < kRows; ++r) y[t * s.out + r] = _mm512_reduce_add_ps(acc[r][t]);
}

// Decode (one token): two blocks at once, so a thread keeps two tile streams in flight (more
// memory-level parallelism than one) and loads each word of x once for 16 rows.
template <typename V>
__attribute__((target("avx512f"))) void two_blocks_avx512(const Shape& s, const float* x,
                                                          const uint8_t* tiles, float* y) {
  const uint8_t* second = tiles + s.pairs * tile_bytes<V>();
  __m512 acc[2 * kRows];
  for (int r = 0; r < 2 * kRows; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t p = 0; p < s.pairs; ++p) {
    const uint8_t* tile[2] = {tiles + p * tile_bytes<V>(), second + p * tile_bytes<V>()};
    for (int h = 0; h < kWordsPerTile; ++h) {
      const __m512 lo = _mm512_loadu_ps(x + (2 * p + h) * 32);
      const __m512 hi = _mm512_loadu_ps(x + (2 * p + h) * 32 + 16);
      for (int b = 0; b < 2; ++b) {
        const uint32_t* pos = reinterpret_cast<const uint32_t*>(tile[b]);
        const V* val = reinterpret_cast<const V*>(tile[b] + kWordsPerTile * kRows * 4);
        for (int r = 0; r < kRows; ++r) {
          const __m512i sel = input_lanes(pos[h * kRows + r]);
          acc[b * kRows + r] = _mm512_fmadd_ps(load16(val + (h * kRows + r) * 16),
                                               _mm512_permutex2var_ps(lo, sel, hi),
                                               acc[b * kRows + r]);
        }
      }
    }
  }
  for (int r = 0; r < 2 * kRows; ++r) y[r] = _mm512_reduce_add_ps(acc[r]);
}

// ---------------------------------------------------------------- AVX2

__attribute__((target("avx2,fma"))) inline __m256 load8(const float* p) {
  return _mm256_loadu_ps(p);
}

__attribute__((target("avx2,fma"))) inline __m256 load8(const bf16* p) {
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Same contract as block_avx512, half a word (8 values, 16 inputs) at a time.
template <typename V, int T>
__attribute__((target("avx2,fma"))) void block_avx2(const Shape& s, const float* x,
                                                    const uint8_t* tiles, float* y) {
  const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12);
  const __m256i three = _mm256_set1_epi32(3);
  const __m256i seven = _mm256_set1_epi32(7);
  __m256 acc[kRows][T];
  for (int r = 0; r < kRows; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  for (int64_t p = 0; p < s.pairs; ++p) {
    const uint8_t* tile = tiles + p * tile_bytes<V>();
    const uint32_t* pos = reinterpret_cast<const uint32_t*>(tile);
    const V* val = reinterpret_cast<const V*>(tile + kWordsPerTile * kRows * 4);
    for (int q = 0; q < 2 * kWordsPerTile; ++q) {  // quarter tiles: half a word each
      const int h = q >> 1, half = q & 1;
      __m256 lo[T], hi[T];
      for (int t = 0; t < T; ++t) {
        const float* xc = x + t * s.xstride + (2 * p + h) * 32 + 16 * half;
        lo[t] = _mm256_loadu_ps(xc);
        hi[t] = _mm256_loadu_ps(xc + 8);
      }
      for (int r = 0; r < kRows; ++r) {
        const uint32_t bits = pos[h * kRows + r] >> (16 * half);
        const __m256i sel = _mm256_add_epi32(
            _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(bits)), shifts),
                             three),
            base);
        const __m256 upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(sel, seven));
        const __m256i lane = _mm256_and_si256(sel, seven);
        const __m256 v = load8(val + (h * kRows + r) * 16 + 8 * half);
        for (int t = 0; t < T; ++t) {
          const __m256 picked = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo[t], lane),
                                                 _mm256_permutevar8x32_ps(hi[t], lane), upper);
          acc[r][t] = _mm256_fmadd_ps(v, picked, acc[r][t]);
        }
      }
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < kRows; ++r) y[t * s.out + r] = hsum(acc[r][t]);
}

// Output-lane mask of 8 kept values (one byte of positions = 2 groups = 8 lanes, per byte).
struct LaneMasks {
  uint8_t of_byte[256];
  LaneMasks() {
    for (int byte = 0; byte < 256; ++byte) {
      uint8_t m = 0;
      for (int k = 0; k < 4; ++k) m |= 1u << ((k >> 1) * 4 + ((byte >> (2 * k)) & 3));
      of_byte[byte] = m;
    }
  }
};
const LaneMasks kLaneMasks;

// Dense fp32 rows of one word (32 inputs) of one row: expand the 16 kept values into place.
template <typename V>
__attribute__((target("avx512f"))) inline void unpack_word_avx512(uint32_t bits, const V* v,
                                                                  float* dst, int64_t valid) {
  const __mmask16 lo = kLaneMasks.of_byte[bits & 255] | (kLaneMasks.of_byte[(bits >> 8) & 255] << 8);
  const __mmask16 hi =
      kLaneMasks.of_byte[(bits >> 16) & 255] | (kLaneMasks.of_byte[bits >> 24] << 8);
  const __m512 values = load16(v);  // kept values 0..15 of this word
  const __m512 first = _mm512_maskz_expand_ps(lo, values);
  const __m512 second = _mm512_maskz_expand_ps(
      hi, _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(values),
                                                  _mm512_castps_si512(values), 8)));
  if (valid >= 32) {
    _mm512_storeu_ps(dst, first);
    _mm512_storeu_ps(dst + 16, second);
  } else {  // the row's last, partial word
    const auto upto = [](int64_t n) {
      return static_cast<__mmask16>(n <= 0 ? 0 : n >= 16 ? 0xFFFF : (1u << n) - 1);
    };
    _mm512_mask_storeu_ps(dst, upto(valid), first);
    _mm512_mask_storeu_ps(dst + 16, upto(valid - 16), second);
  }
}

// ---------------------------------------------------------------- drivers

enum class Isa : int64_t { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

Isa best_isa() {
  if (__builtin_cpu_supports("avx512f")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
  return Isa::kPortable;
}

template <typename V, int T>
void block_simd(Isa isa, const Shape& s, const float* x, const uint8_t* tiles, float* y) {
  if (isa == Isa::kAvx512) {
    block_avx512<V, T>(s, x, tiles, y);
  } else {
    block_avx2<V, T>(s, x, tiles, y);
  }
}

// Blocks [b0, b1) against every token, two tokens at a time: a block's tiles (8 rows) stay in
// cache while the token pairs pass over them. A partial last block goes through a scratch
// output so only real rows are written.
template <typename V>
void blocks_simd(Isa isa, const Shape& s, const float* x, const uint8_t* tiles, float* y,
                 int64_t b0, int64_t b1) {
  float scratch[2 * kRows];
  // Decode on wide rows: two full blocks at a time. On narrow rows (SmolLM2's 576 and 1536
  // inputs) it measured slower end to end (1.32x against 1.57x over dense), so only from 2048.
  if (isa == Isa::kAvx512 && s.tokens == 1 && s.pairs >= 32) {
    for (; b0 + 2 <= b1 && (b0 + 2) * kRows <= s.out; b0 += 2) {
      two_blocks_avx512<V>(s, x, tiles + b0 * s.pairs * tile_bytes<V>(), y + b0 * kRows);
    }
  }
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* blk = tiles + b * s.pairs * tile_bytes<V>();
    const int64_t row0 = b * kRows, rows = std::min<int64_t>(kRows, s.out - row0);
    for (int64_t t = 0; t < s.tokens; t += 2) {
      const int T = s.tokens - t >= 2 ? 2 : 1;
      const bool full = rows == kRows;
      Shape sub = s;
      if (!full) sub.out = kRows;  // scratch is [T][8]
      float* dst = full ? y + t * s.out + row0 : scratch;
      if (T == 2) {
        block_simd<V, 2>(isa, sub, x + t * s.xstride, blk, dst);
      } else {
        block_simd<V, 1>(isa, sub, x + t * s.xstride, blk, dst);
      }
      if (!full) {
        for (int u = 0; u < T; ++u)
          for (int64_t r = 0; r < rows; ++r) y[(t + u) * s.out + row0 + r] = scratch[u * kRows + r];
      }
    }
  }
}

void check_tiles(const at::Tensor& tiles, int64_t out, int64_t pairs, at::ScalarType dtype) {
  TORCH_CHECK(tiles.scalar_type() == at::kByte && tiles.is_contiguous() && tiles.dim() == 1,
              "tiles must be a contiguous 1-D uint8 tensor");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
              "packed values must be float32 or bfloat16");
  const int64_t per_tile = dtype == at::kFloat ? tile_bytes<float>() : tile_bytes<bf16>();
  TORCH_CHECK(tiles.numel() == (out + kRows - 1) / kRows * pairs * per_tile,
              "tiles do not match out_features and the padded width");
}

// Blocks per parallel task: at least 512 tiles (~0.5 MB of fp32 tiles), to amortise its start.
int64_t grain_blocks(int64_t pairs) {
  return std::max<int64_t>(1, 512 / std::max<int64_t>(1, pairs));
}

}  // namespace

// y [tokens, out] fp32 = x [tokens, 64 * pairs] (fp32, zero-padded) times the packed weight^T.
at::Tensor nm24_matmul(const at::Tensor& x, const at::Tensor& tiles, int64_t out,
                       at::ScalarType dtype, int64_t isa_code) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1,
              "x must be a 2-D float32 tensor with contiguous rows");
  TORCH_CHECK(x.size(1) % 64 == 0, "x must be padded to a multiple of 64 columns");
  const int64_t pairs = x.size(1) / 64;
  check_tiles(tiles, out, pairs, dtype);
  const Isa isa = isa_code < 0 ? best_isa()
                               : static_cast<Isa>(std::min(isa_code, static_cast<int64_t>(best_isa())));
  const Shape s{out, (out + kRows - 1) / kRows, pairs, x.size(0), x.stride(0)};
  at::Tensor y = at::empty({s.tokens, out}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* tp = tiles.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, s.blocks, grain_blocks(pairs), [&](int64_t b0, int64_t b1) {
    const bool f32 = dtype == at::kFloat;
    if (isa == Isa::kPortable) {
      f32 ? blocks_portable<float>(s, xp, tp, yp, b0, b1)
          : blocks_portable<bf16>(s, xp, tp, yp, b0, b1);
    } else {
      f32 ? blocks_simd<float>(isa, s, xp, tp, yp, b0, b1)
          : blocks_simd<bf16>(isa, s, xp, tp, yp, b0, b1);
    }
  });
  return y;
}

// The dense [out, in] weight (in `out_dtype`): the kept values at their positions, else 0.
// Rows [row0, row0 + dense.size(0)) of the dense weight, written into `dense` in place (a
// reused workspace: a fresh 100 MB buffer costs more in page faults than the unpacking).
void nm24_unpack(const at::Tensor& tiles, int64_t out, int64_t in, int64_t pairs,
                 at::ScalarType dtype, at::Tensor& dense, int64_t row0) {
  check_tiles(tiles, out, pairs, dtype);
  TORCH_CHECK(in <= 64 * pairs, "in_features exceeds the padded width");
  const int64_t rows = dense.size(0);
  TORCH_CHECK(dense.is_contiguous() && dense.dim() == 2 && dense.size(1) == in,
              "dense must be a contiguous [rows, in] tensor");
  TORCH_CHECK(row0 % kRows == 0 && row0 >= 0 && row0 + rows <= out,
              "row0 must be a multiple of 8 and the rows inside the weight");
  const at::ScalarType out_dtype = dense.scalar_type();
  const bool wide = best_isa() == Isa::kAvx512;
  // the vector path writes every column; the scalar one only the kept ones
  if (!(wide && out_dtype == at::kFloat)) dense.zero_();
  auto body = [&](auto value_tag, auto out_tag) {
    using V = decltype(value_tag);
    using O = decltype(out_tag);
    const uint8_t* tp = tiles.data_ptr<uint8_t>();
    O* dp = dense.data_ptr<O>();
    const int64_t first = row0 / kRows, last = (row0 + rows + kRows - 1) / kRows;
    at::parallel_for(first, last, grain_blocks(pairs), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t p = 0; p < pairs; ++p) {
          const uint8_t* tile = tp + (b * pairs + p) * tile_bytes<V>();
          const uint32_t* pos = reinterpret_cast<const uint32_t*>(tile);
          const V* val = reinterpret_cast<const V*>(tile + kWordsPerTile * kRows * 4);
          for (int h = 0; h < kWordsPerTile; ++h) {
            for (int r = 0; r < kRows; ++r) {
              const int64_t row = b * kRows + r - row0;  // in dense
              if (row >= rows) break;
              const uint32_t bits = pos[h * kRows + r];
              if constexpr (std::is_same_v<O, float>) {
                if (wide) {
                  const int64_t col0 = (2 * p + h) * 32;
                  if (col0 < in) {
                    unpack_word_avx512(bits, val + (h * kRows + r) * 16, dp + row * in + col0,
                                       in - col0);
                  }
                  continue;
                }
              }
              for (int k = 0; k < 16; ++k) {
                const int64_t col = (2 * p + h) * 32 + (k >> 1) * 4 + ((bits >> (2 * k)) & 3u);
                if (col < in) dp[row * in + col] = O(to_float(val[(h * kRows + r) * 16 + k]));
              }
            }
          }
        }
      }
    });
  };
  const bool f32 = dtype == at::kFloat;
  switch (out_dtype) {
    case at::kFloat:
      f32 ? body(float(), float()) : body(bf16(), float());
      break;
    case at::kBFloat16:
      f32 ? body(float(), bf16()) : body(bf16(), bf16());
      break;
    case at::kHalf:
      f32 ? body(float(), at::Half()) : body(bf16(), at::Half());
      break;
    default:
      TORCH_CHECK(false, "unpack to float32, bfloat16 or float16");
  }
}

int64_t nm24_best_isa() { return static_cast<int64_t>(best_isa()); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("matmul", &nm24_matmul, "packed 2:4 product: x [tokens, 64*pairs] -> [tokens, out]");
  m.def("unpack", &nm24_unpack, "packed 2:4 tiles -> dense [out, in], in place");
  m.def("best_isa", &nm24_best_isa, "0 portable, 1 AVX2, 2 AVX-512");
}
