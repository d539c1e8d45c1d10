// Attention from KV codes on the CPU: loops over the packed bytes that never form a key or value tensor.
// Built on first use by tokenizers_q/kv/loops.py (torch.utils.cpp_extension); see there for the shapes.
//
// Every tensor of codes or scales is (B, H, tokens, X) with its last two dimensions contiguous and
// batch stride = heads x head stride (a cache's growing buffers are such views); queries, probabilities
// and tables are contiguous.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <vector>

namespace {

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() >= 3 && t.device().is_cpu(), name, " must be a CPU tensor (B, H, ...)");
  TORCH_CHECK(t.stride(-1) == 1 && (t.dim() == 3 || t.stride(-2) == t.size(-1)), name,
              " needs contiguous last dimensions");
  TORCH_CHECK(t.stride(0) == t.size(1) * t.stride(1) || t.size(0) == 1, name,
              " needs batch stride = heads x head stride");
}

// the D levels of one token, `BITS` bits each, least significant bit first, in plane order: level
// `j * per_byte + p` (byte j, plane p) goes to `p * bytes + j`, so that each plane is one vector loop
template <int BITS, int DIM>
inline void unpack_planes(const uint8_t* bytes, int64_t dim, float* out) {
  constexpr int per_byte = 8 / BITS;
  constexpr int mask = (1 << BITS) - 1;
  const int64_t count = (DIM ? DIM : dim) / per_byte;
  for (int p = 0; p < per_byte; ++p) {
    float* plane = out + p * count;
#pragma omp simd
    for (int64_t j = 0; j < count; ++j) plane[j] = static_cast<float>((bytes[j] >> (BITS * p)) & mask);
  }
}

// position of channel `d` in plane order
template <int BITS>
inline int64_t plane_position(int64_t d, int64_t dim) {
  constexpr int per_byte = 8 / BITS;
  return (d % per_byte) * (dim / per_byte) + d / per_byte;
}

// code `i` of a least-significant-bit-first stream of `bits`-bit codes (1..16)
inline int64_t stream_code(const uint8_t* row, int64_t i, int bits) {
  if (bits == 8) return row[i];
  const int64_t pos = i * bits, first = pos >> 3, last = (pos + bits - 1) >> 3;
  uint32_t word = 0;
  for (int64_t b = first; b <= last; ++b) word |= static_cast<uint32_t>(row[b]) << (8 * (b - first));
  return (word >> (pos & 7)) & ((1u << bits) - 1);
}

// DIM: head_dim known when compiled (0: any)
template <int BITS, int DIM>
void kivi_scores_impl(const torch::Tensor& queries, const torch::Tensor& key_bytes, const torch::Tensor& key_scale,
                      const torch::Tensor& key_offset, torch::Tensor& out) {
  const int64_t heads = queries.size(0) * queries.size(1), count = queries.size(2);
  const int64_t dim = DIM ? DIM : queries.size(3);
  const int64_t tokens = key_bytes.size(2), groups = key_scale.size(2), group = tokens / groups;
  const float* q = queries.data_ptr<float>();
  const uint8_t* bytes = key_bytes.data_ptr<uint8_t>();
  const at::Half* scale = key_scale.data_ptr<at::Half>();
  const at::Half* offset = key_offset.data_ptr<at::Half>();
  const int64_t byte_row = key_bytes.stride(1), scale_row = key_scale.stride(1), offset_row = key_offset.stride(1);
  float* scores = out.data_ptr<float>();
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scaled(count * dim), shift(count), levels(dim);
    for (int64_t h = begin; h < end; ++h) {
      const float* qh = q + h * count * dim;
      for (int64_t g = 0; g < groups; ++g) {
        const at::Half* s = scale + h * scale_row + g * dim;
        const at::Half* o = offset + h * offset_row + g * dim;
        for (int64_t i = 0; i < count; ++i) {
          float acc = 0.f;
          for (int64_t d = 0; d < dim; ++d) {
            scaled[i * dim + plane_position<BITS>(d, dim)] = qh[i * dim + d] * static_cast<float>(s[d]);
            acc += qh[i * dim + d] * static_cast<float>(o[d]);
          }
          shift[i] = acc;
        }
        for (int64_t t = g * group; t < (g + 1) * group; ++t) {
          unpack_planes<BITS, DIM>(bytes + h * byte_row + t * key_bytes.size(3), dim, levels.data());
          for (int64_t i = 0; i < count; ++i) {
            const float* qs = scaled.data() + i * dim;
            float acc = 0.f;
#pragma omp simd reduction(+ : acc)
            for (int64_t d = 0; d < dim; ++d) acc += qs[d] * levels[d];
            scores[(h * count + i) * tokens + t] = acc + shift[i];
          }
        }
      }
    }
  });
}

template <int BITS, int DIM>
void kivi_mix_impl(const torch::Tensor& probs, const torch::Tensor& value_bytes, const torch::Tensor& value_scale,
                   const torch::Tensor& value_offset, torch::Tensor& out) {
  const int64_t heads = probs.size(0) * probs.size(1), count = probs.size(2), tokens = probs.size(3);
  const int64_t dim = DIM ? DIM : out.size(3), channel_groups = value_scale.size(3), width = dim / channel_groups;
  const float* p = probs.data_ptr<float>();
  const uint8_t* bytes = value_bytes.data_ptr<uint8_t>();
  const at::Half* scale = value_scale.data_ptr<at::Half>();
  const at::Half* offset = value_offset.data_ptr<at::Half>();
  const int64_t byte_row = value_bytes.stride(1), scale_row = value_scale.stride(1), offset_row = value_offset.stride(1);
  float* mixed = out.data_ptr<float>();
  // in plane order, channel group c of plane p is the run of bytes [c * run, (c + 1) * run)
  const int64_t per_byte = 8 / BITS, bytes_per_token = dim / per_byte, run = width / per_byte;
  TORCH_CHECK(width % per_byte == 0, "value groups of ", width, " channels split bytes of ", per_byte, " levels");
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> levels(dim), acc(count * dim), shift(count * channel_groups), weight(bytes_per_token);
    for (int64_t h = begin; h < end; ++h) {
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(shift.begin(), shift.end(), 0.f);
      for (int64_t t = 0; t < tokens; ++t) {
        unpack_planes<BITS, DIM>(bytes + h * byte_row + t * value_bytes.size(3), dim, levels.data());
        const at::Half* s = scale + h * scale_row + t * channel_groups;
        const at::Half* o = offset + h * offset_row + t * channel_groups;
        for (int64_t i = 0; i < count; ++i) {
          const float pt = p[(h * count + i) * tokens + t];
          for (int64_t c = 0; c < channel_groups; ++c) {  // p_t x scale of each byte's channel group
            std::fill_n(weight.data() + c * run, run, pt * static_cast<float>(s[c]));
            shift[i * channel_groups + c] += pt * static_cast<float>(o[c]);
          }
          for (int64_t plane = 0; plane < per_byte; ++plane) {
            float* a = acc.data() + i * dim + plane * bytes_per_token;
            const float* l = levels.data() + plane * bytes_per_token;
#pragma omp simd
            for (int64_t j = 0; j < (DIM ? DIM / per_byte : bytes_per_token); ++j) a[j] += weight[j] * l[j];
          }
        }
      }
      float* mixed_h = mixed + h * count * dim;
      for (int64_t i = 0; i < count; ++i)
        for (int64_t d = 0; d < dim; ++d)
          mixed_h[i * dim + d] = acc[i * dim + plane_position<BITS>(d, dim)] + shift[i * channel_groups + d / width];
    }
  });
}

// calls f(bits, head_dim) as compile-time constants: head_dim 64 and 128 unrolled, others at run time
template <typename F>
void dispatch(int64_t bits, int64_t dim, F f) {
  auto with_bits = [&](auto b) {
    if (dim == 64)
      f(b, std::integral_constant<int, 64>{});
    else if (dim == 128)
      f(b, std::integral_constant<int, 128>{});
    else
      f(b, std::integral_constant<int, 0>{});
  };
  switch (bits) {
    case 1: with_bits(std::integral_constant<int, 1>{}); break;
    case 2: with_bits(std::integral_constant<int, 2>{}); break;
    case 4: with_bits(std::integral_constant<int, 4>{}); break;
    default: with_bits(std::integral_constant<int, 8>{});
  }
}

void check_kivi(const torch::Tensor& codes, const torch::Tensor& scale, const torch::Tensor& offset, int64_t bits) {
  TORCH_CHECK(bits == 1 || bits == 2 || bits == 4 || bits == 8, "KIVI loops take 1, 2, 4 or 8 bits, got ", bits);
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.dim() == 4, "levels must be uint8 (B, H, T, bytes)");
  TORCH_CHECK(scale.scalar_type() == torch::kHalf && offset.scalar_type() == torch::kHalf,
              "scales and offsets must be float16");
  check_rows(codes, "levels");
  check_rows(scale, "scale");
  check_rows(offset, "offset");
}

}  // namespace

torch::Tensor kivi_scores(torch::Tensor queries, torch::Tensor key_bytes, torch::Tensor key_scale,
                          torch::Tensor key_offset, int64_t bits) {
  check_kivi(key_bytes, key_scale, key_offset, bits);
  queries = queries.contiguous().to(torch::kFloat);
  TORCH_CHECK(key_bytes.size(3) * 8 == queries.size(3) * bits, "levels hold ", key_bytes.size(3),
              " bytes a token, not head_dim x bits / 8");
  TORCH_CHECK(key_bytes.size(2) % key_scale.size(2) == 0, "tokens must fill the key scale groups");
  auto out = torch::empty({queries.size(0), queries.size(1), queries.size(2), key_bytes.size(2)}, queries.options());
  dispatch(bits, queries.size(3), [&](auto b, auto d) { kivi_scores_impl<decltype(b)::value, decltype(d)::value>(queries, key_bytes, key_scale, key_offset, out); });
  return out;
}

torch::Tensor kivi_mix(torch::Tensor probs, torch::Tensor value_bytes, torch::Tensor value_scale,
                       torch::Tensor value_offset, int64_t bits) {
  check_kivi(value_bytes, value_scale, value_offset, bits);
  probs = probs.contiguous().to(torch::kFloat);
  TORCH_CHECK(probs.size(3) == value_bytes.size(2), "probabilities cover ", probs.size(3), " tokens, levels ",
              value_bytes.size(2));
  const int64_t dim = value_bytes.size(3) * 8 / bits;
  TORCH_CHECK(dim % value_scale.size(3) == 0, "head_dim must fill the value scale groups");
  auto out = torch::empty({probs.size(0), probs.size(1), probs.size(2), dim}, probs.options());
  dispatch(bits, dim, [&](auto b, auto d) { kivi_mix_impl<decltype(b)::value, decltype(d)::value>(probs, value_bytes, value_scale, value_offset, out); });
  return out;
}

namespace {

// the table indices m * K + code of a block of tokens' codes
void block_indices(const uint8_t* row, int64_t first, int64_t tokens, int64_t books, int64_t entries, int bits,
                   int32_t* out) {
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t m = 0; m < books; ++m) {
      const int64_t i = (first + t) * books + m;
      out[t * books + m] = static_cast<int32_t>(m * entries + (bits == 8 ? row[i] : stream_code(row, i, bits)));
    }
}

constexpr int64_t BLOCK = 64;  // tokens whose codes are read once for every query
constexpr int LANES = 8;       // tokens summed side by side

void check_codes(const torch::Tensor& codes, int64_t bits, int64_t tokens, int64_t books) {
  TORCH_CHECK(bits >= 1 && bits <= 16, "code loops take 1 to 16 bits, got ", bits);
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.dim() == 3, "codes must be uint8 (B, H, bytes)");
  check_rows(codes, "codes");
  TORCH_CHECK(codes.size(2) * 8 >= tokens * books * bits, "codes hold ", codes.size(2), " bytes, too few for ",
              tokens, " tokens of ", books, " codes of ", bits, " bits");
}

// for every (batch x head) row and block of at most BLOCK tokens: visit(h, first, size, index), with the
// block's table indices (size x books) read once from the packed codes
template <typename F>
void each_block(const torch::Tensor& codes, int64_t heads, int64_t tokens, int64_t books, int64_t entries,
                int64_t bits, F visit) {
  const uint8_t* packed = codes.data_ptr<uint8_t>();
  const int64_t row = codes.stride(1);
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> index(BLOCK * books);
    for (int64_t h = begin; h < end; ++h)
      for (int64_t first = 0; first < tokens; first += BLOCK) {
        const int64_t size = std::min(BLOCK, tokens - first);
        block_indices(packed + h * row, first, size, books, entries, bits, index.data());
        visit(h, first, size, index.data());
      }
  });
}

}  // namespace

// scores[b, h, i, t] = sum_m lookup[b, h, i, m, code(t, m)]
torch::Tensor code_scores(torch::Tensor lookup, torch::Tensor codes, int64_t bits, int64_t tokens) {
  lookup = lookup.contiguous();
  TORCH_CHECK(lookup.scalar_type() == torch::kFloat && lookup.dim() == 5, "lookup must be float32 (B, H, Q, M, K)");
  const int64_t heads = lookup.size(0) * lookup.size(1), count = lookup.size(2), books = lookup.size(3);
  const int64_t entries = lookup.size(4);
  check_codes(codes, bits, tokens, books);
  auto out = torch::empty({lookup.size(0), lookup.size(1), count, tokens}, lookup.options());
  const float* table = lookup.data_ptr<float>();
  float* scores = out.data_ptr<float>();
  each_block(codes, heads, tokens, books, entries, bits, [&](int64_t h, int64_t first, int64_t size, const int32_t* index) {
    for (int64_t i = 0; i < count; ++i) {
      const float* ti = table + (h * count + i) * books * entries;
      float* si = scores + (h * count + i) * tokens + first;
      int64_t t = 0;
      for (; t + LANES <= size; t += LANES) {  // LANES tokens at once: independent chains of additions
        float acc[LANES] = {};
        const int32_t* it = index + t * books;
        for (int64_t m = 0; m < books; ++m)
          for (int u = 0; u < LANES; ++u) acc[u] += ti[it[u * books + m]];
        for (int u = 0; u < LANES; ++u) si[t + u] = acc[u];
      }
      for (; t < size; ++t) {
        const int32_t* it = index + t * books;
        float acc = 0.f;
        for (int64_t m = 0; m < books; ++m) acc += ti[it[m]];
        si[t] = acc;
      }
    }
  });
  return out;
}

// mass[b, h, i, m, k] = sum over tokens t with code(t, m) = k of probs[b, h, i, t]
torch::Tensor code_mass(torch::Tensor probs, torch::Tensor codes, int64_t bits, int64_t books, int64_t entries) {
  probs = probs.contiguous().to(torch::kFloat);
  const int64_t heads = probs.size(0) * probs.size(1), count = probs.size(2), tokens = probs.size(3);
  check_codes(codes, bits, tokens, books);
  auto out = torch::zeros({probs.size(0), probs.size(1), count, books, entries}, probs.options());
  const float* p = probs.data_ptr<float>();
  float* mass = out.data_ptr<float>();
  each_block(codes, heads, tokens, books, entries, bits, [&](int64_t h, int64_t first, int64_t size, const int32_t* index) {
    for (int64_t i = 0; i < count; ++i) {
      float* mi = mass + (h * count + i) * books * entries;
      const float* pi = p + (h * count + i) * tokens + first;
      for (int64_t t = 0; t < size; ++t) {
        const int32_t* it = index + t * books;
        const float pt = pi[t];
        for (int64_t m = 0; m < books; ++m) mi[it[m]] += pt;
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("kivi_scores", &kivi_scores);
  m.def("kivi_mix", &kivi_mix);
  m.def("code_scores", &code_scores);
  m.def("code_mass", &code_mass);
}
