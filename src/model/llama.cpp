// The decoder, spelled out (HF LlamaForCausalLM semantics; Mistral, Qwen2 and Qwen3 differ only
// in the optional parts marked [..], which the config switches on):
//
//   h_0 = E[tokens]
//   for each layer l:
//     a   = RMSNorm(h) = h / sqrt(mean(h^2) + eps) * g_attn
//     q, k, v = a Wq^T [+ bq], a Wk^T [+ bk], a Wv^T [+ bv], split into heads of head_dim
//     [q, k = RMSNorm of each head with g_q, g_k]                                       (Qwen3)
//     q, k rotated by RoPE
//     h  += softmax(q k^T / sqrt(head_dim) + mask) v  Wo^T [+ bo]   (kv heads shared by
//                                                                   n_heads / n_kv_heads queries)
//     m   = RMSNorm(h) with g_mlp
//     h  += (silu(m Wgate^T) * (m Wup^T)) Wdown^T                  ([+ b] on each: mlp_bias)
//   logits = RMSNorm(h) with g_final, times W_lm_head^T (or E^T when tied)
//
// The mask lets query position t see key positions s with s <= t, [and t - s < sliding_window].
//
// RoPE (Su et al. 2021) in HF's "rotate_half" layout: for head dim d and i < d/2,
// theta_i = base^(-2i/d); position p rotates the pair (x_i, x_{i+d/2}) by p * theta_i.
#include "model/llama.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/autograd.h>

#include <array>
#include <cmath>
#include <functional>

#include "common/error.h"

namespace edkm {
namespace {

// Norms, softmax and the loss run in at least fp32 (fp64 stays fp64).
at::ScalarType wide(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& g, double eps) {
  at::Tensor xf = x.to(wide(x.scalar_type()));
  at::Tensor normed = xf * at::rsqrt(xf.pow(2).mean(-1, true) + eps);
  return g * normed.to(x.scalar_type());
}

// The rotary inverse frequencies theta_i, i < d/2, rescaled for contexts longer than training:
//   linear (position interpolation, Chen et al. 2023): theta_i / factor, i.e. positions divided
//     by factor;
//   llama3: with L the original context and wavelength w_i = 2 pi / theta_i, keep theta_i where
//     w_i < L / high_freq_factor, use theta_i / factor where w_i > L / low_freq_factor, and in
//     between interpolate linearly in L / w_i:
//       s = (L / w_i - low_freq_factor) / (high_freq_factor - low_freq_factor)
//       theta_i' = (1 - s) theta_i / factor + s theta_i.
at::Tensor rope_frequencies(const LlamaConfig& c) {
  const int64_t d = c.head_dim();
  at::Tensor inv = at::pow(c.rope_theta, -at::arange(0, d, 2, at::kDouble) / double(d));
  const RopeScaling& s = c.rope_scaling;
  switch (s.type) {
    case RopeScaling::Type::kNone: return inv;
    case RopeScaling::Type::kLinear: return inv / s.factor;
    case RopeScaling::Type::kLlama3: {
      const double L = double(s.original_max_seq_len);
      at::Tensor wavelen = 2 * M_PI / inv;
      at::Tensor smooth = (L / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
      at::Tensor mid = (1 - smooth) * inv / s.factor + smooth * inv;
      at::Tensor out = at::where(wavelen > L / s.low_freq_factor, inv / s.factor, inv);
      return at::where((wavelen >= L / s.high_freq_factor) & (wavelen <= L / s.low_freq_factor), mid, out);
    }
  }
  return inv;
}

// cos and sin of p * theta_i for positions [pos, pos + T), laid out [T, d] as cat(f, f).
std::pair<at::Tensor, at::Tensor> rope_tables(const LlamaConfig& c, int64_t pos, int64_t T,
                                              const at::TensorOptions& opts) {
  at::Tensor angles = at::outer(at::arange(pos, pos + T, at::kDouble), rope_frequencies(c));
  angles = at::cat({angles, angles}, -1);
  return {angles.cos().to(opts), angles.sin().to(opts)};
}

// True where query t (absolute position pos + t) may not see key s: s > pos + t (causality), or
// s <= pos + t - window (Mistral's sliding window). Undefined when nothing is masked.
at::Tensor attention_mask(int64_t pos, int64_t T, int64_t S, int64_t window, const at::Device& device) {
  const bool windowed = window > 0 && S > window;
  if (T == 1 && !windowed) return {};
  auto opts = at::TensorOptions().dtype(at::kLong).device(device);
  at::Tensor q = at::arange(pos, pos + T, opts).unsqueeze(1), k = at::arange(S, opts).unsqueeze(0);
  at::Tensor mask = k > q;
  if (windowed) mask = mask | (k <= q - window);
  return mask;
}

// x [B, H, T, d]: x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1).
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  at::Tensor rot = at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  return x * cos + rot * sin;
}

// One projection: a dense weight, or a kernel that computes x W^T itself; plus its bias, if any.
struct Proj {
  at::Tensor w, b;
  const LinearKernel* kernel = nullptr;
  at::Tensor operator()(const at::Tensor& x) const {
    if (!kernel) return at::linear(x, w, b);
    at::Tensor y = kernel->forward(x);
    return b.defined() ? y + b : y;
  }
};

// A layer's tensors in one forward pass: the bound weights with this pass's overrides applied.
// Tensors the config does not have are undefined.
struct LayerParams {
  at::Tensor attn_norm, q_norm, k_norm, mlp_norm;
  Proj q, k, v, o, gate, up, down;

  // Every tensor slot, in a fixed order (for gradient checkpointing's flat input list).
  template <class F>
  void for_each(F&& f) {
    for (at::Tensor* t : {&attn_norm, &q_norm, &k_norm, &mlp_norm}) f(*t);
    for (Proj* p : {&q, &k, &v, &o, &gate, &up, &down}) {
      f(p->w);
      f(p->b);
    }
  }
  bool any_kernel() const {
    for (const Proj* p : {&q, &k, &v, &o, &gate, &up, &down})
      if (p->kernel) return true;
    return false;
  }
};

// A weight's tensor in one pass: its override, if any; undefined when the config has none.
at::Tensor pass_tensor(const BoundWeight& b, const WeightOverrides* ov) {
  if (!b) return {};
  if (ov) {
    auto it = ov->find(b.name);
    if (it != ov->end()) return it->second;
  }
  return *b.tensor;
}

// A projection in one pass: by its kernel, unless its weight is overridden.
Proj pass_proj(const BoundLinear& b, const WeightOverrides* ov) {
  Proj p;
  if (b.weight.kernel && !(ov && ov->count(b.weight.name))) p.kernel = b.weight.kernel.get();
  else p.w = pass_tensor(b.weight, ov);
  p.b = pass_tensor(b.bias, ov);
  return p;
}

LayerParams pass_params(const LayerWeights& L, const WeightOverrides* ov) {
  auto t = [&](const BoundWeight& b) { return pass_tensor(b, ov); };
  auto p = [&](const BoundLinear& b) { return pass_proj(b, ov); };
  return {t(L.attn_norm), t(L.q_norm), t(L.k_norm), t(L.mlp_norm), p(L.q),  p(L.k),
          p(L.v),         p(L.o),      p(L.gate),   p(L.up),       p(L.down)};
}

// Whether `src` makes this weight in a pass: it provides it and the pass does not override it.
bool made_by(const WeightSource* src, const BoundWeight& b, const WeightOverrides* ov) {
  return src && b && src->provides(b.name) && !(ov && ov->count(b.name));
}

// The projections of one layer that a WeightSource makes, by slot (q, k, v, o, gate, up,
// down). Applied inside the layer function, so that a checkpointed layer makes them again when
// it is recomputed.
struct Sourced {
  const WeightSource* source = nullptr;
  std::array<const std::string*, 7> names{};  // null: the pass's own tensor

  Sourced(const LayerWeights& L, const WeightSource* src, const WeightOverrides* ov) : source(src) {
    const BoundLinear* b[] = {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down};
    for (size_t i = 0; i < names.size(); ++i)
      if (made_by(src, b[i]->weight, ov)) names[i] = &b[i]->weight.name;
  }
  void apply(LayerParams& p) const {
    Proj* projs[] = {&p.q, &p.k, &p.v, &p.o, &p.gate, &p.up, &p.down};
    for (size_t i = 0; i < names.size(); ++i)
      if (names[i] && projs[i]->w.defined()) projs[i]->w = source->weight(*names[i], projs[i]->w);
  }
};

// A decoder layer. cache_k/cache_v ([B, n_kv, capacity, d]) are defined when decoding
// incrementally; `pos` is then the position of the first of the T new tokens.
at::Tensor decoder_layer(const LlamaConfig& c, const at::Tensor& x, const LayerParams& p,
                         const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& cache_k,
                         const at::Tensor& cache_v, int64_t pos) {
  const int64_t B = x.size(0), T = x.size(1), H = c.n_heads, Hkv = c.n_kv_heads, d = c.head_dim();
  at::Tensor a = rms_norm(x, p.attn_norm, c.norm_eps);
  at::Tensor q = p.q(a).view({B, T, H, d});
  at::Tensor k = p.k(a).view({B, T, Hkv, d});
  at::Tensor v = p.v(a).view({B, T, Hkv, d}).transpose(1, 2);
  if (p.q_norm.defined()) {  // Qwen3: each head normalised on its own, before the rotation
    q = rms_norm(q, p.q_norm, c.norm_eps);
    k = rms_norm(k, p.k_norm, c.norm_eps);
  }
  q = apply_rope(q.transpose(1, 2), cos, sin);
  k = apply_rope(k.transpose(1, 2), cos, sin);
  if (cache_k.defined()) {
    cache_k.narrow(2, pos, T).copy_(k);
    cache_v.narrow(2, pos, T).copy_(v);
    k = cache_k.narrow(2, 0, pos + T);
    v = cache_v.narrow(2, 0, pos + T);
  }
  const int64_t S = k.size(2);
  if (H != Hkv) {  // query head h reads kv head h / (H / Hkv)
    k = k.repeat_interleave(H / Hkv, 1);
    v = v.repeat_interleave(H / Hkv, 1);
  }
  // The [B, H, T, S] scores are the largest tensors here: scale q instead, mask in place.
  at::Tensor scores = at::matmul(q * (1.0 / std::sqrt(double(d))), k.transpose(2, 3));
  scores = scores.to(wide(scores.scalar_type()));
  at::Tensor mask = attention_mask(pos, T, S, c.sliding_window, scores.device());
  if (mask.defined()) scores.masked_fill_(mask, -INFINITY);
  at::Tensor attn = at::softmax(scores, -1).to(v.scalar_type());
  at::Tensor ctx = at::matmul(attn, v).transpose(1, 2).reshape({B, T, H * d});
  at::Tensor h = x + p.o(ctx);
  at::Tensor m = rms_norm(h, p.mlp_norm, c.norm_eps);
  return h + p.down(at::silu(p.gate(m)) * p.up(m));
}

// Gradient checkpointing: the forward runs the layer without recording a graph; the backward
// runs it again with the graph and differentiates that. Inputs: the hidden state and the
// layer's weight tensors (their gradients are returned too, so soft-clustered weights receive
// theirs).
using LayerFn = std::function<at::Tensor(const at::Tensor&, const std::vector<at::Tensor>&)>;

struct LayerFnHolder : torch::CustomClassHolder {
  LayerFn fn;
};

struct CheckpointedLayer : torch::autograd::Function<CheckpointedLayer> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            at::TensorList weights, c10::intrusive_ptr<LayerFnHolder> fn) {
    std::vector<at::Tensor> saved{x};
    saved.insert(saved.end(), weights.begin(), weights.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["fn"] = c10::IValue::make_capsule(fn);
    return fn->fn(x, weights.vec());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    c10::intrusive_ptr<torch::CustomClassHolder> capsule = ctx->saved_data["fn"].toCapsule();
    const auto& fn = static_cast<LayerFnHolder*>(capsule.get())->fn;
    at::AutoGradMode enable(true);
    std::vector<at::Tensor> inputs;
    for (const auto& t : saved) inputs.push_back(t.detach().requires_grad_(t.requires_grad()));
    std::vector<at::Tensor> ws(inputs.begin() + 1, inputs.end());
    at::Tensor out = fn(inputs[0], ws);
    std::vector<at::Tensor> wrt;
    for (const auto& t : inputs)
      if (t.requires_grad()) wrt.push_back(t);
    auto g = torch::autograd::grad({out}, wrt, {grads[0]}, false, false, true);
    torch::autograd::variable_list result;
    size_t j = 0;
    for (const auto& t : inputs) result.push_back(t.requires_grad() ? g[j++] : at::Tensor());
    result.push_back(at::Tensor());  // the layer function
    return result;
  }
};

}  // namespace

Llama::Llama(LlamaConfig cfg, std::map<std::string, at::Tensor> weights, const std::string& source)
    : cfg_(std::move(cfg)), weights_(std::move(weights)) {
  cfg_.validate(source);
  // Older HF checkpoints carry the rotary inverse frequencies as buffers; they are derived.
  for (auto it = weights_.begin(); it != weights_.end();) {
    if (it->first.find("rotary_emb.inv_freq") != std::string::npos) it = weights_.erase(it);
    else ++it;
  }
  auto shapes = tensor_shapes(cfg_);
  for (const auto& [name, shape] : shapes) {
    auto it = weights_.find(name);
    if (it == weights_.end()) throw_input("{}: missing tensor '{}'", source, name);
    if (it->second.sizes() != at::IntArrayRef(shape))
      throw_input("{}: tensor '{}' has shape {}, expected {}", source, name,
                  c10::str(it->second.sizes()), c10::str(at::IntArrayRef(shape)));
    if (!at::isFloatingType(it->second.scalar_type()))
      throw_input("{}: tensor '{}' has dtype {}, expected a floating-point dtype", source, name,
                  c10::toString(it->second.scalar_type()));
  }
  if (weights_.size() != shapes.size()) {
    for (const auto& [name, t] : weights_) {
      bool known = false;
      for (const auto& s : shapes) known |= s.first == name;
      if (!known) throw_input("{}: unexpected tensor '{}' for this config", source, name);
    }
  }
  bind();
}

Llama::Llama(const Llama& other) : cfg_(other.cfg_), weights_(other.weights_), kernels_(other.kernels_) { bind(); }

Llama::Llama(Llama&& other) noexcept
    : cfg_(std::move(other.cfg_)), weights_(std::move(other.weights_)), kernels_(std::move(other.kernels_)) {
  bind();
}

Llama& Llama::operator=(const Llama& other) {
  if (this != &other) {
    cfg_ = other.cfg_;
    weights_ = other.weights_;
    kernels_ = other.kernels_;
    bind();
  }
  return *this;
}

Llama& Llama::operator=(Llama&& other) noexcept {
  cfg_ = std::move(other.cfg_);
  weights_ = std::move(other.weights_);
  kernels_ = std::move(other.kernels_);
  bind();
  return *this;
}

void Llama::bind() {
  auto bound = [&](const std::string& name) {
    auto w = weights_.find(name);
    if (w == weights_.end()) return BoundWeight{name, nullptr, nullptr};  // not in this config
    auto k = kernels_.find(name);
    return BoundWeight{name, &w->second, k == kernels_.end() ? nullptr : k->second};
  };
  namespace n = tensor_name;
  embed_ = bound(n::kEmbed);
  final_norm_ = bound(n::kFinalNorm);
  classifier_ = bound(cfg_.tie_embeddings ? n::kEmbed : n::kLmHead);
  layers_.clear();
  for (int64_t l = 0; l < cfg_.n_layers; ++l) {
    auto leaf = [&](const char* name) { return bound(layer_tensor_name(l, name)); };
    auto linear = [&](const char* weight, const char* bias) { return BoundLinear{leaf(weight), leaf(bias)}; };
    layers_.push_back({leaf(n::kAttnNorm), leaf(n::kQNorm), leaf(n::kKNorm), leaf(n::kMlpNorm),
                       linear(n::kQ, n::kQBias), linear(n::kK, n::kKBias), linear(n::kV, n::kVBias),
                       linear(n::kO, n::kOBias), linear(n::kGate, n::kGateBias), linear(n::kUp, n::kUpBias),
                       linear(n::kDown, n::kDownBias)});
  }
}

Llama Llama::random(const LlamaConfig& cfg, at::ScalarType dtype, uint64_t seed) {
  at::manual_seed(seed);
  std::map<std::string, at::Tensor> w;
  for (const auto& [name, shape] : tensor_shapes(cfg)) {
    w[name] = shape.size() == 1 ? at::ones(shape, at::kFloat) : at::randn(shape, at::kFloat) * 0.02;
    w[name] = w[name].to(dtype);
  }
  return Llama(cfg, std::move(w), "random model");
}

const at::Tensor& Llama::weight(const std::string& name) const {
  auto it = weights_.find(name);
  if (it == weights_.end()) throw_invalid("model has no tensor '{}'", name);
  return it->second;
}

std::vector<std::string> Llama::projection_names() const {
  std::vector<std::string> names;
  for (int64_t l = 0; l < cfg_.n_layers; ++l)
    for (const char* p : tensor_name::kProjections) names.push_back(layer_tensor_name(l, p));
  if (!cfg_.tie_embeddings) names.push_back(tensor_name::kLmHead);
  names.push_back(tensor_name::kEmbed);
  return names;
}

at::ScalarType Llama::dtype() const { return embed_.tensor->scalar_type(); }
at::Device Llama::device() const { return embed_.tensor->device(); }

// Kernel-served weights are storage-less stand-ins: casting or moving one would allocate it.
void Llama::to(at::ScalarType dtype) {
  for (auto& [name, t] : weights_)
    if (!kernels_.count(name)) t = t.to(dtype);
}

void Llama::to(at::Device device) {
  for (auto& [name, t] : weights_)
    if (!kernels_.count(name)) t = t.to(device);
  if (device.is_cpu() || kernels_.empty()) return;
  const at::ScalarType dtype = this->dtype();
  for (const auto& [name, kernel] : kernels_) weights_.at(name) = kernel->dense(dtype).to(device);
  kernels_.clear();
  bind();
}

void Llama::set_kernel(const std::string& name, std::shared_ptr<const LinearKernel> kernel) {
  weight(name);  // must exist
  if (kernel) kernels_[name] = std::move(kernel);
  else kernels_.erase(name);
  bind();
}

KVCache Llama::new_cache(int64_t batch, int64_t capacity) const {
  auto opts = embed_.tensor->options();
  std::vector<int64_t> shape{cfg_.n_layers, batch, cfg_.n_kv_heads, capacity, cfg_.head_dim()};
  return {at::zeros(shape, opts), at::zeros(shape, opts), 0};
}

at::Tensor Llama::forward(const at::Tensor& tokens, const ForwardOptions& opts) const {
  return run(tokens, opts, nullptr);
}

at::Tensor Llama::forward(const at::Tensor& tokens, KVCache& cache) const {
  if (tokens.dim() != 2 || tokens.size(0) != cache.k.size(1))
    throw_invalid("tokens must be [batch={}, T], got {}", cache.k.size(1), c10::str(tokens.sizes()));
  if (cache.pos + tokens.size(1) > cache.capacity())
    throw_invalid("KV cache full: {} + {} tokens > capacity {}", cache.pos, tokens.size(1), cache.capacity());
  at::Tensor logits = run(tokens, {}, &cache);
  cache.pos += tokens.size(1);
  return logits;
}

at::Tensor Llama::run(const at::Tensor& tokens, const ForwardOptions& opts, KVCache* cache) const {
  if (tokens.dim() != 2) throw_invalid("tokens must be [batch, T], got {}", c10::str(tokens.sizes()));
  const int64_t T = tokens.size(1), pos = cache ? cache->pos : 0;
  if (T == 0) throw_invalid("empty token sequence");
  if (pos + T > cfg_.max_seq_len)
    throw_invalid("sequence of {} tokens exceeds the model's context of {}", pos + T, cfg_.max_seq_len);
  const WeightOverrides* ov = opts.overrides;
  const WeightSource* src = opts.source;
  auto sourced = [&](const BoundWeight& b, at::Tensor t) {
    return t.defined() && made_by(src, b, ov) ? src->weight(b.name, t) : t;
  };
  at::Tensor h = at::embedding(sourced(embed_, pass_tensor(embed_, ov)), tokens);
  auto [cos, sin] = rope_tables(cfg_, pos, T, h.options());

  for (int64_t l = 0; l < cfg_.n_layers; ++l) {
    LayerParams p = pass_params(layers_[l], ov);
    const Sourced made(layers_[l], src, ov);
    at::Tensor ck = cache ? cache->k[l] : at::Tensor(), cv = cache ? cache->v[l] : at::Tensor();
    if (opts.checkpoint_layers && !cache && !p.any_kernel() && at::GradMode::is_enabled()) {
      // The layer's defined tensors travel as a flat list; `present` puts them back in place.
      std::vector<at::Tensor> ws;
      std::vector<bool> present;
      p.for_each([&](at::Tensor& t) {
        present.push_back(t.defined());
        if (t.defined()) ws.push_back(t);
      });
      auto fn = c10::make_intrusive<LayerFnHolder>();
      const LlamaConfig& c = cfg_;
      fn->fn = [&c, present, made, cos = cos, sin = sin](const at::Tensor& x, const std::vector<at::Tensor>& t) {
        LayerParams q;
        size_t slot = 0, next = 0;
        q.for_each([&](at::Tensor& dst) {
          if (present[slot++]) dst = t[next++];
        });
        made.apply(q);
        return decoder_layer(c, x, q, cos, sin, {}, {}, 0);
      };
      // Passed as a TensorList so that autograd sees (and routes gradients to) each weight.
      h = CheckpointedLayer::apply(h, at::TensorList(ws), fn);
    } else {
      made.apply(p);
      h = decoder_layer(cfg_, h, p, cos, sin, ck, cv, pos);
    }
  }
  h = rms_norm(h, pass_tensor(final_norm_, ov), cfg_.norm_eps);
  Proj classifier = pass_proj(BoundLinear{classifier_, {}}, ov);
  classifier.w = sourced(classifier_, classifier.w);
  return classifier(h);
}

at::Tensor Llama::embed(const at::Tensor& tokens) const {
  if (tokens.dim() != 2) throw_invalid("tokens must be [batch, T], got {}", c10::str(tokens.sizes()));
  return at::embedding(*embed_.tensor, tokens);
}

at::Tensor Llama::layer(int64_t l, const at::Tensor& hidden) const {
  if (l < 0 || l >= cfg_.n_layers) throw_invalid("layer {} out of range [0, {})", l, cfg_.n_layers);
  if (hidden.dim() != 3 || hidden.size(2) != cfg_.dim)
    throw_invalid("hidden states must be [batch, T, {}], got {}", cfg_.dim, c10::str(hidden.sizes()));
  const int64_t T = hidden.size(1);
  if (T > cfg_.max_seq_len) throw_invalid("sequence of {} tokens exceeds the model's context of {}", T, cfg_.max_seq_len);
  auto [cos, sin] = rope_tables(cfg_, 0, T, hidden.options());
  return decoder_layer(cfg_, hidden, pass_params(layers_[l], nullptr), cos, sin, {}, {}, 0);
}

at::Tensor next_token_loss(const at::Tensor& logits, const at::Tensor& targets, at::Reduction::Reduction reduction) {
  return at::cross_entropy_loss(logits.reshape({-1, logits.size(-1)}).to(wide(logits.scalar_type())),
                                targets.reshape({-1}), {}, reduction, kIgnoreIndex);
}

at::Tensor distillation_loss(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& targets,
                             double tau, at::Reduction::Reduction reduction) {
  if (!(tau > 0)) throw_invalid("distillation temperature must be > 0, got {}", tau);
  if (!student.sizes().equals(teacher.sizes()))
    throw_invalid("student logits {} and teacher logits {} differ in shape", c10::str(student.sizes()),
                  c10::str(teacher.sizes()));
  const at::ScalarType t = wide(student.scalar_type());
  const int64_t V = student.size(-1);
  at::Tensor keep = targets.reshape({-1}) != kIgnoreIndex;
  at::Tensor ls = at::log_softmax(student.reshape({-1, V}).to(t) / tau, -1);
  at::Tensor lt = at::log_softmax(teacher.detach().reshape({-1, V}).to(t) / tau, -1);
  // KL(p_t || p_s) = sum_v p_t (log p_t - log p_s), per position.
  at::Tensor kl = (lt.exp() * (lt - ls)).sum(-1).masked_fill(~keep, 0) * (tau * tau);
  at::Tensor sum = kl.sum();
  if (reduction == at::Reduction::Sum) return sum;
  return sum / keep.sum().clamp_min(1).to(t);
}

}  // namespace edkm
