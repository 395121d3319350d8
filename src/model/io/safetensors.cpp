#include "model/io/safetensors.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstring>

#include "common/atomic_file.h"
#include "common/checksum.h"
#include "common/error.h"
#include "common/finite.h"
#include "common/mapped_file.h"

namespace edkm::safetensors {
namespace {

// The checksum covers every tensor's name, dtype, shape and span (sorted by name), the metadata
// but the checksum entry itself (as a JSON object with sorted keys), and then the data buffer,
// which `data` feeds in file order.
template <typename FeedData>
uint64_t content_digest(std::vector<TensorInfo> tensors, std::map<std::string, std::string> metadata, FeedData data) {
  std::sort(tensors.begin(), tensors.end(), [](const TensorInfo& a, const TensorInfo& b) { return a.name < b.name; });
  metadata.erase(kChecksumKey);
  Checksum c;
  for (const auto& t : tensors) {
    nlohmann::json j = {t.name, t.dtype, t.shape, t.begin, t.end};
    c.update(j.dump());
  }
  c.update(nlohmann::json(metadata).dump());
  data(c);
  return c.digest();
}

}  // namespace

File::File(const std::string& path) : path_(path), map_(std::make_shared<const MappedFile>(path)) {
  const std::string_view bytes = map_->bytes();
  header_ = parse_header(bytes, bytes.size(), path);
  for (size_t i = 0; i < header_.tensors.size(); ++i) index_[header_.tensors[i].name] = i;
  auto recorded = header_.metadata.find(kChecksumKey);
  if (recorded != header_.metadata.end() && verify_checksums()) {
    const uint64_t digest = content_digest(header_.tensors, header_.metadata, [&](Checksum& c) {
      c.update(bytes.data() + header_.data_start, bytes.size() - header_.data_start);
    });
    if (Checksum::format(digest) != recorded->second)
      throw_input("{}: checksum mismatch: the file records {}, its contents give {}; the file is damaged (re-create "
                  "it, or pass --no-verify to read it anyway)", path, recorded->second, Checksum::format(digest));
  }
}

bool File::contains(const std::string& name) const { return index_.count(name) > 0; }

std::vector<std::string> File::names() const {
  std::vector<std::string> n;
  for (const auto& t : header_.tensors) n.push_back(t.name);
  return n;
}

at::Tensor File::tensor(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) throw_input("{}: no tensor '{}'", path_, name);
  const TensorInfo& t = header_.tensors[it->second];
  const at::ScalarType type = to_scalar_type(t.dtype, path_);
  char* data = map_->data() + header_.data_start + t.begin;
  auto opts = at::TensorOptions().dtype(type);
  if (t.end == t.begin) return at::empty(t.shape, opts);
  if (reinterpret_cast<uintptr_t>(data) % dtype_size(t.dtype) != 0) {  // unaligned: copy
    at::Tensor out = at::empty(t.shape, opts);
    std::memcpy(out.data_ptr(), data, t.end - t.begin);
    return out;
  }
  auto keep = map_;
  return at::from_blob(data, t.shape, [keep](void*) {}, opts);
}

void write(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
           const std::map<std::string, std::string>& metadata) {
  std::vector<TensorInfo> infos;
  std::vector<at::Tensor> data;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    if (name == "__metadata__") throw_invalid("'__metadata__' is not a valid tensor name");
    for (const auto& i : infos)
      if (i.name == name) throw_invalid("duplicate tensor name '{}'", name);
    at::Tensor c = t.detach().to(at::kCPU).contiguous();
    check_finite(c, fmt::format("{}: tensor '{}'", path, name));
    const uint64_t bytes = c.numel() * c.element_size();
    infos.push_back({name, dtype_name(c.scalar_type()), c.sizes().vec(), offset, offset + bytes});
    offset += bytes;
    data.push_back(c);
  }
  std::map<std::string, std::string> meta = metadata;
  meta[kChecksumKey] = Checksum::format(content_digest(infos, meta, [&](Checksum& c) {
    for (const auto& t : data) c.update(t.data_ptr(), t.numel() * t.element_size());
  }));
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  header["__metadata__"] = meta;
  for (const auto& i : infos)
    header[i.name] = {{"dtype", i.dtype}, {"shape", i.shape}, {"data_offsets", {i.begin, i.end}}};
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');
  char len[8];
  uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) len[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  AtomicFile out(path);
  out.write(len, 8);
  out.write(h);
  for (const auto& c : data) out.write(c.data_ptr(), c.numel() * c.element_size());
  out.commit();
}

}  // namespace edkm::safetensors
