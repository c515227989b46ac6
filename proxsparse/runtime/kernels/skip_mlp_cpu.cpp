// The decode step of a gated MLP that skips the zeros of its activation (ProSparse, DESIGN.md §9).
//
// Given a token x [H] and its activated gate a [I] (computed before, densely), the MLP output is
//   y = sum over j with a[j] != 0 of  a[j] * (up_j . x) * down_j
// where up_j is row j of up_proj's weight and down_j is column j of down_proj's (stored as a
// row). Only the rows of kept positions are read: at 80% zeros, 20% of up and down.
//
// Rows come in one of two layouts (per matrix):
//   dense   values [I, H] (float32 or bfloat16), one row after another;
//   bitmap  (float32) the non-zeros of each row, in order, one row after another (values),
//           with a 16-bit mask per 16 inputs saying which are there (masks [I, ceil(H/16)])
//           and where each row's values start (offsets [I]). A 2:4 row holds half its inputs:
//           2.125 bytes per weight instead of 4. AVX-512 reads it with expanding loads.
// The kept rows are split among the threads; each sums into its own copy of y, added at the end.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using bf16 = at::BFloat16;

struct Rows {
  const void* values;
  const uint16_t* masks;  // null: dense rows
  const int64_t* offsets;
  bool bf16_values;
  int64_t width;  // H
  int64_t words;  // masks per row
};

Rows rows_of(const torch::Tensor& values, const torch::Tensor& masks, const torch::Tensor& offsets,
             int64_t count, int64_t width) {
  TORCH_CHECK(values.is_contiguous(), "row values must be contiguous");
  Rows r{values.data_ptr(), nullptr, nullptr, values.scalar_type() == at::kBFloat16, width,
         (width + 15) / 16};
  if (masks.numel() > 0) {
    TORCH_CHECK(values.scalar_type() == at::kFloat, "bitmap rows hold float32 values");
    TORCH_CHECK(masks.scalar_type() == at::kShort && masks.is_contiguous() &&
                    masks.numel() == count * r.words, "bitmap masks must be int16 [rows, words]");
    TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.numel() == count,
                "bitmap offsets must be int64 [rows]");
    r.masks = reinterpret_cast<const uint16_t*>(masks.data_ptr<int16_t>());
    r.offsets = offsets.data_ptr<int64_t>();
  } else {
    TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16,
                "dense rows hold float32 or bfloat16 values");
    TORCH_CHECK(values.numel() == count * width, "dense rows must be [rows, width]");
  }
  return r;
}

// ---------------------------------------------------------------- portable

inline float value(const Rows& r, const void* base, int64_t i) {
  return r.bf16_values ? static_cast<float>(static_cast<const bf16*>(base)[i])
                       : static_cast<const float*>(base)[i];
}

float dot_portable(const Rows& r, int64_t j, const float* x) {
  float sum = 0.f;
  if (!r.masks) {
    const int64_t base = j * r.width;
    for (int64_t i = 0; i < r.width; ++i) sum += value(r, r.values, base + i) * x[i];
    return sum;
  }
  const float* v = static_cast<const float*>(r.values) + r.offsets[j];
  const uint16_t* m = r.masks + j * r.words;
  for (int64_t w = 0; w < r.words; ++w)
    for (int b = 0; b < 16; ++b)
      if (m[w] >> b & 1) sum += *v++ * x[w * 16 + b];
  return sum;
}

void axpy_portable(const Rows& r, int64_t j, float c, float* y) {
  if (!r.masks) {
    const int64_t base = j * r.width;
    for (int64_t i = 0; i < r.width; ++i) y[i] += c * value(r, r.values, base + i);
    return;
  }
  const float* v = static_cast<const float*>(r.values) + r.offsets[j];
  const uint16_t* m = r.masks + j * r.words;
  for (int64_t w = 0; w < r.words; ++w)
    for (int b = 0; b < 16; ++b)
      if (m[w] >> b & 1) y[w * 16 + b] += c * *v++;
}

// ---------------------------------------------------------------- AVX-512

__attribute__((target("avx512f"))) inline __mmask16 tail(int64_t w, int64_t width) {
  const int64_t left = width - w * 16;
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load_row(const Rows& r, int64_t base,
                                                          __mmask16 k) {
  if (r.bf16_values) {
    const __m256i h = _mm256_maskz_loadu_epi16(k, static_cast<const bf16*>(r.values) + base);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  return _mm512_maskz_loadu_ps(k, static_cast<const float*>(r.values) + base);
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) float dot_avx512(const Rows& r, int64_t j,
                                                                     const float* x) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  if (!r.masks) {
    const int64_t base = j * r.width;
    int64_t w = 0;
    for (; (w + 2) * 16 <= r.width; w += 2) {
      acc0 = _mm512_fmadd_ps(load_row(r, base + w * 16, 0xFFFF), _mm512_loadu_ps(x + w * 16),
                             acc0);
      acc1 = _mm512_fmadd_ps(load_row(r, base + w * 16 + 16, 0xFFFF),
                             _mm512_loadu_ps(x + w * 16 + 16), acc1);
    }
    for (; w < r.words; ++w) {
      const __mmask16 k = tail(w, r.width);
      acc0 = _mm512_fmadd_ps(load_row(r, base + w * 16, k), _mm512_maskz_loadu_ps(k, x + w * 16),
                             acc0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  }
  const float* v = static_cast<const float*>(r.values) + r.offsets[j];
  const uint16_t* m = r.masks + j * r.words;
  for (int64_t w = 0; w < r.words; ++w) {
    const __mmask16 k = m[w];
    const __m512 xs = _mm512_maskz_loadu_ps(tail(w, r.width), x + w * 16);
    acc0 = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps(k, v), xs, acc0);
    v += __builtin_popcount(m[w]);
  }
  return _mm512_reduce_add_ps(acc0);
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) void axpy_avx512(const Rows& r, int64_t j,
                                                                     float c, float* y) {
  const __m512 cs = _mm512_set1_ps(c);
  if (!r.masks) {
    const int64_t base = j * r.width;
    for (int64_t w = 0; w < r.words; ++w) {
      const __mmask16 k = tail(w, r.width);
      const __m512 ys = _mm512_maskz_loadu_ps(k, y + w * 16);
      _mm512_mask_storeu_ps(y + w * 16, k, _mm512_fmadd_ps(cs, load_row(r, base + w * 16, k), ys));
    }
    return;
  }
  const float* v = static_cast<const float*>(r.values) + r.offsets[j];
  const uint16_t* m = r.masks + j * r.words;
  for (int64_t w = 0; w < r.words; ++w) {
    const __mmask16 k = m[w];
    const __m512 ys = _mm512_loadu_ps(y + w * 16);  // y is padded to whole words
    _mm512_storeu_ps(y + w * 16, _mm512_fmadd_ps(cs, _mm512_maskz_expandloadu_ps(k, v), ys));
    v += __builtin_popcount(m[w]);
  }
}

bool has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

}  // namespace

// x [T, H] f32, act [T, I] f32 (the activated gate), up and down rows [I, H] -> y [T, H] f32.
torch::Tensor skip_mlp(const torch::Tensor& x, const torch::Tensor& act,
                       const torch::Tensor& up_values, const torch::Tensor& up_masks,
                       const torch::Tensor& up_offsets, const torch::Tensor& down_values,
                       const torch::Tensor& down_masks, const torch::Tensor& down_offsets,
                       bool vector_isa) {
  TORCH_CHECK(x.dim() == 2 && act.dim() == 2 && x.size(0) == act.size(0), "x [T, H], act [T, I]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && act.scalar_type() == at::kFloat,
              "x and act must be float32");
  const auto xc = x.contiguous();
  const auto ac = act.contiguous();
  const int64_t tokens = x.size(0), width = x.size(1), count = act.size(1);
  const Rows up = rows_of(up_values, up_masks, up_offsets, count, width);
  const Rows down = rows_of(down_values, down_masks, down_offsets, count, width);
  const bool wide = vector_isa && has_avx512();
  const int64_t padded = (width + 15) / 16 * 16;
  auto y = torch::zeros({tokens, width}, x.options());
  const int threads = at::get_num_threads();
  std::vector<float> partial(static_cast<size_t>(threads) * padded);
  std::vector<int64_t> kept(count);
  for (int64_t t = 0; t < tokens; ++t) {
    const float* xt = xc.data_ptr<float>() + t * width;
    const float* at = ac.data_ptr<float>() + t * count;
    int64_t k = 0;
    for (int64_t j = 0; j < count; ++j)
      if (at[j] != 0.f) kept[k++] = j;
    std::fill(partial.begin(), partial.end(), 0.f);
    at::parallel_for(0, k, 16, [&](int64_t b, int64_t e) {
      float* acc = partial.data() + static_cast<size_t>(at::get_thread_num()) * padded;
      for (int64_t i = b; i < e; ++i) {
        const int64_t j = kept[i];
        if (wide) {
          axpy_avx512(down, j, at[j] * dot_avx512(up, j, xt), acc);
        } else {
          axpy_portable(down, j, at[j] * dot_portable(up, j, xt), acc);
        }
      }
    });
    float* yt = y.data_ptr<float>() + t * width;
    for (int th = 0; th < threads; ++th)
      for (int64_t i = 0; i < width; ++i) yt[i] += partial[static_cast<size_t>(th) * padded + i];
  }
  return y;
}

// Dense rows [I, H] f32 -> (values, masks, offsets) of the bitmap layout (exact zeros dropped).
std::vector<torch::Tensor> to_bitmap(const torch::Tensor& dense) {
  TORCH_CHECK(dense.dim() == 2 && dense.scalar_type() == at::kFloat, "dense rows [I, H] float32");
  const auto d = dense.contiguous();
  const int64_t count = d.size(0), width = d.size(1), words = (width + 15) / 16;
  const float* p = d.data_ptr<float>();
  auto masks = torch::zeros({count, words}, torch::kShort);
  auto offsets = torch::empty({count}, torch::kLong);
  uint16_t* m = reinterpret_cast<uint16_t*>(masks.data_ptr<int16_t>());
  int64_t* o = offsets.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t j = 0; j < count; ++j) {
    o[j] = total;
    for (int64_t i = 0; i < width; ++i)
      if (p[j * width + i] != 0.f) {
        m[j * words + i / 16] |= uint16_t(1u << (i % 16));
        ++total;
      }
  }
  auto values = torch::empty({total}, torch::kFloat);
  float* v = values.data_ptr<float>();
  for (int64_t n = 0, i = 0; i < count * width; ++i)
    if (p[i] != 0.f) v[n++] = p[i];
  return {values, masks, offsets};
}

// The bitmap layout back to dense rows [I, H] (prefill multiplies the dense form).
torch::Tensor from_bitmap(const torch::Tensor& values, const torch::Tensor& masks,
                          const torch::Tensor& offsets, int64_t width) {
  const int64_t count = masks.size(0);
  const Rows r = rows_of(values, masks, offsets, count, width);
  auto dense = torch::zeros({count, width}, torch::kFloat);
  float* out = dense.data_ptr<float>();
  at::parallel_for(0, count, 64, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      const float* v = static_cast<const float*>(r.values) + r.offsets[j];
      const uint16_t* m = r.masks + j * r.words;
      for (int64_t w = 0; w < r.words; ++w)
        for (int bit = 0; bit < 16; ++bit)
          if (m[w] >> bit & 1) out[j * width + w * 16 + bit] = *v++;
    }
  });
  return dense;
}

bool skip_mlp_vectorised() { return has_avx512(); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("skip_mlp", &skip_mlp, "gated MLP decode over the non-zero activations only");
  m.def("to_bitmap", &to_bitmap, "dense rows -> bitmap rows (values, masks, offsets)");
  m.def("from_bitmap", &from_bitmap, "bitmap rows -> dense rows");
  m.def("vectorised", &skip_mlp_vectorised, "whether the AVX-512 path runs here");
}
