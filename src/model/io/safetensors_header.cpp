// safetensors header parsing and validation. Kept free of ATen tensors so that the fuzz
// target (fuzz/) builds it quickly with clang.
#include <c10/core/ScalarType.h>
#include <nlohmann/json.hpp>

#include <algorithm>

#include "common/error.h"
#include "model/io/safetensors.h"

namespace edkm::safetensors {
namespace {

// The reference implementation refuses headers above 100 MB.
constexpr uint64_t kMaxHeader = 100ull << 20;

struct DTypeInfo {
  const char* name;
  at::ScalarType type;
  int64_t size;
};
const DTypeInfo kDTypes[] = {
    {"F64", at::kDouble, 8}, {"F32", at::kFloat, 4},  {"F16", at::kHalf, 2},  {"BF16", at::kBFloat16, 2},
    {"I64", at::kLong, 8},   {"I32", at::kInt, 4},    {"I16", at::kShort, 2}, {"I8", at::kChar, 1},
    {"U8", at::kByte, 1},    {"BOOL", at::kBool, 1},
};

const DTypeInfo* find_dtype(const std::string& name) {
  for (const auto& d : kDTypes)
    if (name == d.name) return &d;
  return nullptr;
}

uint64_t read_u64le(const char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(p[i]);
  return v;
}

}  // namespace

int64_t dtype_size(const std::string& dtype) {
  const DTypeInfo* d = find_dtype(dtype);
  return d ? d->size : 0;
}

at::ScalarType to_scalar_type(const std::string& dtype, const std::string& source) {
  const DTypeInfo* d = find_dtype(dtype);
  if (!d) throw_input("{}: unsupported safetensors dtype '{}'", source, dtype);
  return d->type;
}

std::string dtype_name(at::ScalarType t) {
  for (const auto& d : kDTypes)
    if (d.type == t) return d.name;
  throw_invalid("dtype {} cannot be stored in safetensors", c10::toString(t));
}

Header parse_header(std::string_view file, uint64_t file_size, const std::string& source) {
  if (file_size < 8 || file.size() < 8)
    throw_input("{}: truncated safetensors file ({} bytes, the header length alone takes 8)", source, file_size);
  const uint64_t n = read_u64le(file.data());
  if (n > kMaxHeader) throw_input("{}: safetensors header length {} exceeds the 100 MB limit", source, n);
  if (n > file_size - 8)
    throw_input("{}: safetensors header length {} runs past the end of the file ({} bytes)", source, n, file_size);
  if (file.size() < 8 + n) throw_input("{}: truncated safetensors header", source);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(file.substr(8, n));
  } catch (const nlohmann::json::exception& e) {
    throw_input("{}: safetensors header is not valid JSON: {}", source, e.what());
  }
  if (!j.is_object()) throw_input("{}: safetensors header is not a JSON object", source);

  Header h;
  h.data_start = 8 + n;
  const uint64_t buffer = file_size - h.data_start;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& key = it.key();
    const auto& v = it.value();
    if (key == "__metadata__") {
      if (!v.is_object()) throw_input("{}: __metadata__ must be an object of strings", source);
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) throw_input("{}: __metadata__ value '{}' is not a string", source, m.key());
        h.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") || !v.contains("data_offsets"))
      throw_input("{}: tensor '{}' needs dtype, shape and data_offsets", source, key);
    TensorInfo t;
    t.name = key;
    if (!v["dtype"].is_string()) throw_input("{}: tensor '{}': dtype is not a string", source, key);
    t.dtype = v["dtype"].get<std::string>();
    const DTypeInfo* d = find_dtype(t.dtype);
    if (!d) throw_input("{}: tensor '{}': unknown dtype '{}'", source, key, t.dtype);
    if (!v["shape"].is_array()) throw_input("{}: tensor '{}': shape is not an array", source, key);
    uint64_t numel = 1;
    for (const auto& s : v["shape"]) {
      if (!s.is_number_unsigned()) throw_input("{}: tensor '{}': shape entries must be non-negative integers", source, key);
      const uint64_t dim = s.get<uint64_t>();
      if (dim != 0 && numel > buffer / dim) throw_input("{}: tensor '{}': shape {} is larger than the file", source, key, v["shape"].dump());
      numel *= dim;
      t.shape.push_back(static_cast<int64_t>(dim));
    }
    const auto& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      throw_input("{}: tensor '{}': data_offsets must be two non-negative integers", source, key);
    t.begin = off[0].get<uint64_t>();
    t.end = off[1].get<uint64_t>();
    if (t.begin > t.end) throw_input("{}: tensor '{}': data_offsets [{}, {}] are reversed", source, key, t.begin, t.end);
    if (t.end > buffer)
      throw_input("{}: tensor '{}': data_offsets [{}, {}] run past the end of the data ({} bytes)", source, key,
                  t.begin, t.end, buffer);
    if (numel * static_cast<uint64_t>(d->size) != t.end - t.begin)
      throw_input("{}: tensor '{}': shape {} of {} needs {} bytes but data_offsets span {}", source, key,
                  v["shape"].dump(), t.dtype, numel * d->size, t.end - t.begin);
    h.tensors.push_back(std::move(t));
  }
  std::sort(h.tensors.begin(), h.tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin < b.begin || (a.begin == b.begin && a.end < b.end);
  });
  uint64_t expect = 0;
  for (const auto& t : h.tensors) {
    if (t.begin < expect) throw_input("{}: tensor '{}' overlaps the tensor before it", source, t.name);
    if (t.begin > expect) throw_input("{}: {} unindexed bytes before tensor '{}'", source, t.begin - expect, t.name);
    expect = t.end;
  }
  if (expect != buffer)
    throw_input("{}: the tensors cover {} of the {} data bytes (trailing or missing data)", source, expect, buffer);
  return h;
}

}  // namespace edkm::safetensors
