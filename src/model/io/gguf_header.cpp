// GGUF header parsing and validation (gguf.h). Kept free of ATen tensors so that the fuzz target
// builds it quickly with clang.
#include <algorithm>
#include <cstring>
#include <set>

#include "common/error.h"
#include "model/io/gguf.h"

namespace edkm::gguf {
namespace {

using json = nlohmann::json;

// GGUF metadata value types (gguf.md, enum gguf_metadata_value_type).
enum ValueType : uint32_t {
  kU8 = 0, kI8 = 1, kU16 = 2, kI16 = 3, kU32 = 4, kI32 = 5, kF32 = 6, kBool = 7,
  kString = 8, kArray = 9, kU64 = 10, kI64 = 11, kF64 = 12,
};

struct Layout {
  Type type;
  const char* name;
  int64_t block_elems, block_bytes;
};
constexpr Layout kLayouts[] = {
    {Type::F32, "F32", 1, 4},        {Type::F16, "F16", 1, 2},        {Type::BF16, "BF16", 1, 2},
    {Type::Q4_0, "Q4_0", 32, 18},    {Type::Q4_1, "Q4_1", 32, 20},    {Type::Q5_0, "Q5_0", 32, 22},
    {Type::Q5_1, "Q5_1", 32, 24},    {Type::Q8_0, "Q8_0", 32, 34},    {Type::Q2_K, "Q2_K", 256, 84},
    {Type::Q3_K, "Q3_K", 256, 110},  {Type::Q4_K, "Q4_K", 256, 144},  {Type::Q5_K, "Q5_K", 256, 176},
    {Type::Q6_K, "Q6_K", 256, 210},
};

// A bounds-checked little-endian cursor over the header bytes.
class Reader {
 public:
  Reader(std::string_view data, const std::string& source) : data_(data), source_(source) {}

  uint64_t pos() const { return pos_; }
  const std::string& source() const { return source_; }

  void need(uint64_t n, const char* what) const {
    if (n > data_.size() - pos_)
      throw_input("{}: truncated GGUF header: {} needs {} bytes at offset {}, {} left", source_, what, n, pos_,
                  data_.size() - pos_);
  }
  template <class T>
  T scalar(const char* what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, data_.data() + pos_, sizeof(T));  // GGUF is little-endian, as is every host edkm targets
    pos_ += sizeof(T);
    return v;
  }
  std::string string(const char* what) {
    const uint64_t n = scalar<uint64_t>(what);
    need(n, what);
    std::string s(data_.substr(pos_, n));
    pos_ += n;
    return s;
  }
  // A count of items that each take at least `min_bytes`: refused when the rest of the file
  // could not hold them, before anything is allocated for them.
  uint64_t count(uint64_t min_bytes, const char* what) {
    const uint64_t n = scalar<uint64_t>(what);
    if (min_bytes > 0 && n > (data_.size() - pos_) / min_bytes)
      throw_input("{}: truncated GGUF header: {} count {} exceeds what the rest of the file can hold", source_,
                  what, n);
    return n;
  }

 private:
  std::string_view data_;
  std::string source_;
  uint64_t pos_ = 0;
};

uint64_t min_value_bytes(uint32_t type) {
  switch (type) {
    case kU8: case kI8: case kBool: return 1;
    case kU16: case kI16: return 2;
    case kU32: case kI32: case kF32: return 4;
    case kU64: case kI64: case kF64: case kString: return 8;
    case kArray: return 12;
  }
  return 0;
}

json read_value(Reader& r, uint32_t type, const std::string& key, int depth) {
  switch (type) {
    case kU8: return r.scalar<uint8_t>("a u8");
    case kI8: return r.scalar<int8_t>("an i8");
    case kU16: return r.scalar<uint16_t>("a u16");
    case kI16: return r.scalar<int16_t>("an i16");
    case kU32: return r.scalar<uint32_t>("a u32");
    case kI32: return r.scalar<int32_t>("an i32");
    case kU64: return r.scalar<uint64_t>("a u64");
    case kI64: return r.scalar<int64_t>("an i64");
    case kF32: return r.scalar<float>("an f32");
    case kF64: return r.scalar<double>("an f64");
    case kBool: {
      const uint8_t b = r.scalar<uint8_t>("a bool");
      if (b > 1) throw_input("{}: GGUF metadata '{}': bool value {} is not 0 or 1", r.source(), key, b);
      return b == 1;
    }
    case kString: return r.string("a string");
    case kArray: {
      if (depth > 1) throw_input("{}: GGUF metadata '{}': arrays nested deeper than two levels", r.source(), key);
      const uint32_t elem = r.scalar<uint32_t>("an array type");
      if (min_value_bytes(elem) == 0)
        throw_input("{}: GGUF metadata '{}': unknown array element type {}", r.source(), key, elem);
      const uint64_t n = r.count(min_value_bytes(elem), "array element");
      json a = json::array();
      a.get_ref<json::array_t&>().reserve(n);
      for (uint64_t i = 0; i < n; ++i) a.push_back(read_value(r, elem, key, depth + 1));
      return a;
    }
  }
  throw_input("{}: GGUF metadata '{}': unknown value type {}", r.source(), key, type);
}

}  // namespace

bool type_layout(uint32_t type, int64_t& block_elems, int64_t& block_bytes) {
  for (const Layout& l : kLayouts)
    if (static_cast<uint32_t>(l.type) == type) {
      block_elems = l.block_elems;
      block_bytes = l.block_bytes;
      return true;
    }
  return false;
}

std::string type_name(uint32_t type) {
  for (const Layout& l : kLayouts)
    if (static_cast<uint32_t>(l.type) == type) return l.name;
  return "ggml type " + std::to_string(type);
}

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : ne) n *= d;
  return n;
}

bool is_gguf(std::string_view head) { return head.size() >= 4 && head.substr(0, 4) == "GGUF"; }

Header parse_header(std::string_view file, const std::string& source) {
  Reader r(file, source);
  if (!is_gguf(file)) throw_input("{}: not a GGUF file (no GGUF magic)", source);
  r.scalar<uint32_t>("the magic");
  Header h;
  h.version = r.scalar<uint32_t>("the version");
  if (h.version != 2 && h.version != 3)
    throw_input("{}: GGUF version {} is not supported (versions 2 and 3 are)", source, h.version);
  // Each tensor info takes at least 8 + 4 + 4 + 8 bytes, each metadata entry 8 + 4 + 1.
  const uint64_t n_tensors = r.count(24, "tensor");
  const uint64_t n_kv = r.count(13, "metadata");
  h.metadata = json::object();
  for (uint64_t i = 0; i < n_kv; ++i) {
    std::string key = r.string("a metadata key");
    const uint32_t type = r.scalar<uint32_t>("a metadata type");
    if (h.metadata.contains(key)) throw_input("{}: GGUF metadata key '{}' appears twice", source, key);
    h.metadata[key] = read_value(r, type, key, 0);
  }
  if (h.metadata.contains("general.alignment")) {
    const json& a = h.metadata["general.alignment"];
    if (!a.is_number_unsigned() || a.get<uint64_t>() == 0 || a.get<uint64_t>() > (1u << 16) ||
        (a.get<uint64_t>() & (a.get<uint64_t>() - 1)) != 0)
      throw_input("{}: general.alignment {} is not a power of two up to 65536", source, a.dump());
    h.alignment = a.get<uint64_t>();
  }
  std::set<std::string> names;
  for (uint64_t i = 0; i < n_tensors; ++i) {
    TensorInfo t;
    t.name = r.string("a tensor name");
    if (!names.insert(t.name).second) throw_input("{}: GGUF tensor '{}' appears twice", source, t.name);
    const uint32_t n_dims = r.scalar<uint32_t>("a tensor rank");
    if (n_dims < 1 || n_dims > 4) throw_input("{}: tensor '{}' has rank {} (1..4 allowed)", source, t.name, n_dims);
    int64_t numel = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      const uint64_t ne = r.scalar<uint64_t>("a tensor dimension");
      if (ne == 0 || ne > (uint64_t(1) << 40) || uint64_t(numel) > (uint64_t(1) << 42) / ne)
        throw_input("{}: tensor '{}' has an implausible dimension {}", source, t.name, ne);
      t.ne.push_back(static_cast<int64_t>(ne));
      numel *= static_cast<int64_t>(ne);
    }
    t.type = r.scalar<uint32_t>("a tensor type");
    int64_t block_elems = 0, block_bytes = 0;
    if (!type_layout(t.type, block_elems, block_bytes))
      throw_input("{}: tensor '{}' has {}, which edkm does not read (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, "
                  "Q8_0, Q2_K..Q6_K are read)", source, t.name, type_name(t.type));
    if (t.ne[0] % block_elems != 0)
      throw_input("{}: tensor '{}' rows of {} are not whole {} blocks of {}", source, t.name, t.ne[0],
                  type_name(t.type), block_elems);
    t.bytes = static_cast<uint64_t>(numel / block_elems * block_bytes);
    t.offset = r.scalar<uint64_t>("a tensor offset");
    if (t.offset % h.alignment != 0)
      throw_input("{}: tensor '{}' offset {} is not a multiple of the alignment {}", source, t.name, t.offset,
                  h.alignment);
    h.tensors.push_back(std::move(t));
  }
  h.data_start = (r.pos() + h.alignment - 1) / h.alignment * h.alignment;
  if (h.data_start > file.size()) throw_input("{}: GGUF data section starts beyond the end of the file", source);
  const uint64_t data_bytes = file.size() - h.data_start;
  std::vector<const TensorInfo*> by_offset;
  for (const TensorInfo& t : h.tensors) {
    if (t.offset > data_bytes || t.bytes > data_bytes - t.offset)
      throw_input("{}: tensor '{}' ({} bytes at data offset {}) runs past the end of the file", source, t.name,
                  t.bytes, t.offset);
    by_offset.push_back(&t);
  }
  std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < by_offset.size(); ++i)
    if (by_offset[i - 1]->offset + by_offset[i - 1]->bytes > by_offset[i]->offset)
      throw_input("{}: tensors '{}' and '{}' overlap", source, by_offset[i - 1]->name, by_offset[i]->name);
  return h;
}

}  // namespace edkm::gguf
