#include "model/io/safetensors.h"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <nlohmann/json.hpp>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "common/atomic_file.h"
#include "common/error.h"

namespace edkm::safetensors {

struct File::Mapping {
  void* addr = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (addr && addr != MAP_FAILED) ::munmap(addr, size);
  }
};

File::File(const std::string& path) : path_(path), map_(std::make_shared<Mapping>()) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw_input("{}: cannot open: {}", path, std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    throw_input("{}: cannot stat: {}", path, std::strerror(errno));
  }
  map_->size = static_cast<size_t>(st.st_size);
  if (map_->size > 0) {
    // Private and writable: copy-on-write, so a caller writing into a tensor never reaches the file.
    map_->addr = ::mmap(nullptr, map_->size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  }
  ::close(fd);
  if (map_->addr == MAP_FAILED) throw_input("{}: cannot map: {}", path, std::strerror(errno));
  std::string_view bytes(static_cast<const char*>(map_->addr), map_->size);
  header_ = parse_header(bytes, map_->size, path);
  for (size_t i = 0; i < header_.tensors.size(); ++i) index_[header_.tensors[i].name] = i;
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
  char* data = static_cast<char*>(map_->addr) + header_.data_start + t.begin;
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
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<at::Tensor> data;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    if (name == "__metadata__") throw_invalid("'__metadata__' is not a valid tensor name");
    if (header.contains(name)) throw_invalid("duplicate tensor name '{}'", name);
    at::Tensor c = t.detach().to(at::kCPU).contiguous();
    const uint64_t bytes = c.numel() * c.element_size();
    header[name] = {{"dtype", dtype_name(c.scalar_type())}, {"shape", c.sizes().vec()},
                    {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    data.push_back(c);
  }
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
