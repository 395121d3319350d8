// A whole file mapped into memory: what the readers of large files (safetensors models,
// checkpoints) use instead of reading them, so that their bytes are page cache, not a copy.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace edkm {

class MappedFile {
 public:
  // Private and writable: copy-on-write, so a caller writing into the bytes never reaches the
  // file. An empty file maps to no bytes. InputError naming the path if it cannot be mapped.
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  char* data() const { return static_cast<char*>(addr_); }
  std::size_t size() const { return size_; }
  std::string_view bytes() const { return {data(), size_}; }

 private:
  void* addr_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace edkm
