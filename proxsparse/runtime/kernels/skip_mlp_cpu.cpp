// The decode step of a gated MLP that skips the zeros of its activation (ProSparse, DESIGN.md §9).
//
// Given a token x [H] and its activated gate a [I], a_j = FATReLU(gate_j . x), the MLP output is
//   y = sum over j with a_j != 0 of  a_j * (up_j . x) * down_j
// where gate_j and up_j are rows j of gate_proj's and up_proj's weights and down_j is column j of
// down_proj's (stored as a row). The gate is read whole; of up and down only the rows of kept
// positions: at 80% zeros, 20% of them.
//
// Rows come in one of two layouts (per matrix):
//   dense   values [I, H] (float32 or bfloat16), one row after another;
//   bitmap  (float32) the non-zeros of each row, in order, one row after another (values),
//           with a 16-bit mask per 16 inputs saying which are there (masks [I, ceil(H/16)])
//           and where each row's values start (offsets [I + 1], the last one the total).
//           A 2:4 row holds half its inputs: 2.125 bytes per weight instead of 4. AVX-512
//           reads it with expanding loads.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <sys/mman.h>
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
    TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.numel() == count + 1,
                "bitmap offsets must be int64 [rows + 1]");
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

// Two dense rows at once: twice the independent loads in flight, which is what the scattered
// kept rows need (each one is a fresh stream the hardware prefetcher has not seen).
__attribute__((target("avx512f,avx512bw,avx512vl"))) void dot2_avx512(const Rows& r, int64_t j0,
                                                                     int64_t j1, const float* x,
                                                                     float* out) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  const int64_t b0 = j0 * r.width, b1 = j1 * r.width;
  for (int64_t w = 0; w < r.words; ++w) {
    const __mmask16 k = tail(w, r.width);
    const __m512 xs = _mm512_maskz_loadu_ps(k, x + w * 16);
    acc0 = _mm512_fmadd_ps(load_row(r, b0 + w * 16, k), xs, acc0);
    acc1 = _mm512_fmadd_ps(load_row(r, b1 + w * 16, k), xs, acc1);
  }
  out[0] = _mm512_reduce_add_ps(acc0);
  out[1] = _mm512_reduce_add_ps(acc1);
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) void axpy2_avx512(const Rows& r, int64_t j0,
                                                                      float c0, int64_t j1,
                                                                      float c1, float* y) {
  const __m512 cs0 = _mm512_set1_ps(c0), cs1 = _mm512_set1_ps(c1);
  const int64_t b0 = j0 * r.width, b1 = j1 * r.width;
  for (int64_t w = 0; w < r.words; ++w) {
    const __mmask16 k = tail(w, r.width);
    __m512 ys = _mm512_maskz_loadu_ps(k, y + w * 16);
    ys = _mm512_fmadd_ps(cs0, load_row(r, b0 + w * 16, k), ys);
    ys = _mm512_fmadd_ps(cs1, load_row(r, b1 + w * 16, k), ys);
    _mm512_mask_storeu_ps(y + w * 16, k, ys);
  }
}

bool has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

// Prefetch one row's bytes (values, and the masks of a bitmap row) into the cache: the kept rows
// of up and down are scattered, so the hardware prefetcher cannot guess them.
void prefetch_row(const Rows& r, int64_t j) {
  const char* p;
  int64_t bytes;
  if (!r.masks) {
    const int64_t size = r.bf16_values ? 2 : 4;
    p = static_cast<const char*>(r.values) + j * r.width * size;
    bytes = r.width * size;
  } else {
    p = reinterpret_cast<const char*>(static_cast<const float*>(r.values) + r.offsets[j]);
    bytes = (r.offsets[j + 1] - r.offsets[j]) * 4;
    __builtin_prefetch(r.masks + j * r.words, 0, 1);
  }
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 1);  // into L2
}

// Row j's gate activation: the given one, or FATReLU(gate_j . x) computed here.
struct Gate {
  const float* act;  // [I] when given, else null
  Rows rows;
  float threshold;
};

constexpr int64_t kBlock = 64;  // gate rows per block of the software pipeline

}  // namespace

// One decode step of the gated MLP over the non-zero activations only, for each of T tokens.
//   x [T, H] f32; act [T, I] f32 (the activated gate) or empty: then the kernel computes the gate
//   from its rows with FATReLU at `threshold` (a kept activation is > 0 and >= threshold);
//   gate, up and down rows [I, H] (dense or bitmap, see above) -> y [T, H] f32.
// Each thread takes a contiguous share of the I positions and walks it in blocks of kBlock: it
// computes the block's gate (a sequential stream), prefetches the up and down rows of its kept
// positions, and meanwhile finishes the previous block's kept positions (dot with up, then add
// a * u * down into the thread's own copy of y), so those scattered reads overlap the gate's.
torch::Tensor skip_mlp(const torch::Tensor& x, const torch::Tensor& act,
                       const torch::Tensor& gate_values, const torch::Tensor& gate_masks,
                       const torch::Tensor& gate_offsets, double threshold,
                       const torch::Tensor& up_values, const torch::Tensor& up_masks,
                       const torch::Tensor& up_offsets, const torch::Tensor& down_values,
                       const torch::Tensor& down_masks, const torch::Tensor& down_offsets,
                       bool vector_isa) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be float32 [T, H]");
  const bool given = act.numel() > 0;
  const int64_t tokens = x.size(0), width = x.size(1);
  const int64_t count = given ? act.size(1) : up_masks.numel() > 0 ? up_masks.size(0)
                                                                    : up_values.size(0);
  if (given) {
    TORCH_CHECK(act.dim() == 2 && act.size(0) == tokens && act.scalar_type() == at::kFloat,
                "act must be float32 [T, I]");
  }
  const auto xc = x.contiguous();
  const auto ac = given ? act.contiguous() : act;
  const Rows up = rows_of(up_values, up_masks, up_offsets, count, width);
  const Rows down = rows_of(down_values, down_masks, down_offsets, count, width);
  const Rows gate_rows = given ? up : rows_of(gate_values, gate_masks, gate_offsets, count, width);
  const bool wide = vector_isa && has_avx512();
  const int64_t padded = (width + 15) / 16 * 16;
  auto y = torch::zeros({tokens, width}, x.options());
  const int threads = at::get_num_threads();
  std::vector<float> partial(static_cast<size_t>(threads) * padded);
  const int64_t share = (count + threads - 1) / threads;
  for (int64_t t = 0; t < tokens; ++t) {
    const float* xt = xc.data_ptr<float>() + t * width;
    const Gate gate{given ? ac.data_ptr<float>() + t * count : nullptr, gate_rows,
                    static_cast<float>(threshold)};
    std::fill(partial.begin(), partial.end(), 0.f);
    at::parallel_for(0, count, share, [&](int64_t begin, int64_t end) {
      float* acc = partial.data() + static_cast<size_t>(at::get_thread_num()) * padded;
      int64_t kept[2][kBlock];
      float coef[2][kBlock];
      int64_t n[2] = {0, 0};
      int cur = 0;
      auto finish = [&](int which) {
        const int64_t* js = kept[which];
        float* cs = coef[which];
        int64_t i = 0;
        if (wide) {  // c_i *= up_i . x, then y += c_i * down_i, two rows at a time
          for (; i + 1 < n[which]; i += 2) {
            float u[2];
            if (up.masks) {
              u[0] = dot_avx512(up, js[i], xt);
              u[1] = dot_avx512(up, js[i + 1], xt);
            } else {
              dot2_avx512(up, js[i], js[i + 1], xt, u);
            }
            cs[i] *= u[0];
            cs[i + 1] *= u[1];
          }
          for (int64_t l = i; l < n[which]; ++l) cs[l] *= dot_avx512(up, js[l], xt);
          int64_t l = 0;
          if (!down.masks)
            for (; l + 1 < n[which]; l += 2) axpy2_avx512(down, js[l], cs[l], js[l + 1], cs[l + 1], acc);
          for (; l < n[which]; ++l) axpy_avx512(down, js[l], cs[l], acc);
          i = n[which];
        }
        for (; i < n[which]; ++i) {
          const int64_t j = js[i];
          if (wide) {
            axpy_avx512(down, j, cs[i] * dot_avx512(up, j, xt), acc);
          } else {
            axpy_portable(down, j, cs[i] * dot_portable(up, j, xt), acc);
          }
        }
        n[which] = 0;
      };
      for (int64_t b = begin; b < end; b += kBlock) {
        const int64_t e = std::min(end, b + kBlock);
        for (int64_t j = b; j < e; ++j) {
          float a;
          if (gate.act) {
            a = gate.act[j];
          } else {
            const float g = wide ? dot_avx512(gate.rows, j, xt) : dot_portable(gate.rows, j, xt);
            a = (g > 0.f && g >= gate.threshold) ? g : 0.f;
          }
          if (a != 0.f) {
            kept[cur][n[cur]] = j;
            coef[cur][n[cur]++] = a;
            prefetch_row(up, j);
            prefetch_row(down, j);
          }
        }
        finish(1 - cur);  // the previous block's rows, prefetched while this gate ran
        cur = 1 - cur;
      }
      finish(1 - cur);
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
  auto offsets = torch::empty({count + 1}, torch::kLong);
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
  o[count] = total;
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

// A copy of `t` in memory that asks the kernel for 2 MiB pages (Linux transparent huge pages,
// where they are enabled for madvise): the kept rows are scattered over the whole matrix, and
// with 4 KiB pages nearly every one of them costs a TLB miss.
torch::Tensor huge_page_copy(const torch::Tensor& t) {
  const auto src = t.contiguous();
  const size_t bytes = src.numel() * src.element_size();
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
  void* p = nullptr;
  if (rounded == 0 || posix_memalign(&p, kHuge, rounded) != 0) return src.clone();
  madvise(p, rounded, MADV_HUGEPAGE);
  std::memcpy(p, src.data_ptr(), bytes);
  return torch::from_blob(p, src.sizes(), [](void* q) { free(q); }, src.options());
}

bool skip_mlp_vectorised() { return has_avx512(); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("skip_mlp", &skip_mlp, "gated MLP decode over the non-zero activations only");
  m.def("to_bitmap", &to_bitmap, "dense rows -> bitmap rows (values, masks, offsets)");
  m.def("from_bitmap", &from_bitmap, "bitmap rows -> dense rows");
  m.def("huge_page_copy", &huge_page_copy, "a copy in memory backed by 2 MiB pages");
  m.def("vectorised", &skip_mlp_vectorised, "whether the AVX-512 path runs here");
}
