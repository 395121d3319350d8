#include "model/io/llama2c.h"

#include <ATen/ATen.h>

#include <cstring>
#include <limits>

#include "common/atomic_file.h"
#include "common/error.h"
#include "common/finite.h"
#include "model/io/llama2c_layout.h"

namespace edkm {

using namespace llama2c;

at::Tensor meta_to_hf_rows(const at::Tensor& w, int64_t n_heads) {
  const int64_t rows = w.size(0), cols = w.size(1);
  return w.reshape({n_heads, rows / n_heads / 2, 2, cols}).transpose(1, 2).reshape({rows, cols});
}

at::Tensor hf_to_meta_rows(const at::Tensor& w, int64_t n_heads) {
  const int64_t rows = w.size(0), cols = w.size(1);
  return w.reshape({n_heads, 2, rows / n_heads / 2, cols}).transpose(1, 2).reshape({rows, cols});
}

Llama load_llama2c(const std::string& path) {
  std::string bytes = read_file(path);
  Llama2cHeader h = parse_llama2c_header(bytes, bytes.size(), path);
  const LlamaConfig& c = h.config;
  const auto shape = shapes(c);
  uint64_t off = h.header_bytes;
  auto take_f32 = [&](const std::vector<int64_t>& shape) {
    at::Tensor t = at::empty(shape, at::kFloat);
    std::memcpy(t.data_ptr(), bytes.data() + off, t.numel() * 4);
    off += t.numel() * 4;
    return t;
  };
  std::map<std::string, at::Tensor> w;
  const std::vector<std::string> mats = matrix_names(c, h.shared_classifier);
  auto read_norms = [&] {
    for (const auto& n : norm_names(c)) w[n] = take_f32(shape.at(n));
  };
  if (h.version == 0) {
    // embeddings, attention norms, wq, wk, wv, wo, ffn norms, w1, w2, w3, final norm, RoPE, [cls]
    w[tensor_name::kEmbed] = take_f32(shape.at(tensor_name::kEmbed));
    auto layers = [&](const std::string& leaf) {
      for (int64_t l = 0; l < c.n_layers; ++l) {
        std::string n = layer_tensor_name(l, leaf);
        w[n] = take_f32(shape.at(n));
      }
    };
    layers(tensor_name::kAttnNorm);
    for (const char* leaf : {tensor_name::kQ, tensor_name::kK, tensor_name::kV, tensor_name::kO}) layers(leaf);
    layers(tensor_name::kMlpNorm);
    for (const char* leaf : {tensor_name::kGate, tensor_name::kDown, tensor_name::kUp}) layers(leaf);
    w[tensor_name::kFinalNorm] = take_f32({c.dim});
    off += uint64_t(c.max_seq_len) * c.head_dim() * 4;  // RoPE tables: recomputed from theta
    if (!h.shared_classifier) w[tensor_name::kLmHead] = take_f32({c.vocab_size, c.dim});
  } else if (h.version == 1) {
    read_norms();
    for (const auto& n : mats) w[n] = take_f32(shape.at(n));
  } else {
    read_norms();
    std::vector<at::Tensor> q;
    for (const auto& n : mats) {
      at::Tensor t = at::empty(shape.at(n), at::kChar);
      std::memcpy(t.data_ptr(), bytes.data() + off, t.numel());
      off += t.numel();
      q.push_back(t);
    }
    for (size_t i = 0; i < mats.size(); ++i) {
      at::Tensor s = take_f32({q[i].numel() / h.group_size, 1});
      w[mats[i]] = (q[i].to(at::kFloat).view({-1, h.group_size}) * s).view(q[i].sizes());
    }
  }
  for (int64_t l = 0; l < c.n_layers; ++l) {
    auto& wq = w[layer_tensor_name(l, tensor_name::kQ)];
    auto& wk = w[layer_tensor_name(l, tensor_name::kK)];
    wq = meta_to_hf_rows(wq, c.n_heads);
    wk = meta_to_hf_rows(wk, c.n_kv_heads);
  }
  return Llama(c, std::move(w), path);
}

void save_llama2c(const Llama& model, const std::string& path) {
  const LlamaConfig& c = model.config();
  auto check32 = [&](int64_t v, const char* what) {
    if (v > std::numeric_limits<int32_t>::max()) throw_invalid("{} = {} does not fit the llama2.c header", what, v);
    return static_cast<int32_t>(v);
  };
  // The header holds only the sizes: everything else must be what llama2.c assumes.
  const LlamaConfig plain = [&] {
    LlamaConfig p;
    p.dim = c.dim, p.hidden_dim = c.hidden_dim, p.n_layers = c.n_layers, p.n_heads = c.n_heads;
    p.n_kv_heads = c.n_kv_heads, p.vocab_size = c.vocab_size, p.max_seq_len = c.max_seq_len;
    p.tie_embeddings = c.tie_embeddings, p.bos_id = c.bos_id, p.eos_id = c.eos_id;
    return p;
  }();
  if (c.to_hf() != plain.to_hf())
    throw_invalid("{}: a llama2.c checkpoint cannot hold this {} model (it has no place for rope_theta {}, "
                  "rope scaling, head_dim, biases, q/k norms, a sliding window or norm eps {}); convert it to a "
                  "Hugging Face directory instead", path, c.model_type, c.rope_theta, c.norm_eps);
  for (const auto& [name, t] : model.weights()) check_finite(t, fmt::format("{}: tensor '{}'", path, name));
  std::string header(kHeaderV1, '\0');
  uint32_t magic = kMagic;
  int32_t version = 1;
  std::memcpy(header.data(), &magic, 4);
  std::memcpy(header.data() + 4, &version, 4);
  const int32_t params[7] = {check32(c.dim, "dim"), check32(c.hidden_dim, "hidden_dim"), check32(c.n_layers, "n_layers"),
                             check32(c.n_heads, "n_heads"), check32(c.n_kv_heads, "n_kv_heads"),
                             check32(c.vocab_size, "vocab_size"), check32(c.max_seq_len, "max_seq_len")};
  std::memcpy(header.data() + 8, params, sizeof(params));
  header[36] = c.tie_embeddings ? 1 : 0;
  AtomicFile out(path);
  out.write(header);
  auto put = [&](at::Tensor t) {
    t = t.detach().to(at::kCPU, at::kFloat).contiguous();
    out.write(t.data_ptr(), t.numel() * 4);
  };
  for (const auto& n : norm_names(c)) put(model.weight(n));
  for (const auto& n : matrix_names(c, c.tie_embeddings)) {
    at::Tensor t = model.weight(n);
    if (n.find("q_proj") != std::string::npos) t = hf_to_meta_rows(t, c.n_heads);
    if (n.find("k_proj") != std::string::npos) t = hf_to_meta_rows(t, c.n_kv_heads);
    put(t);
  }
  out.commit();
}

}  // namespace edkm
