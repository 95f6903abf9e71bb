#pragma once
// Atomic file writes: everything goes to a temporary file beside the target, which is renamed over it only once
// complete, so a crash never leaves a half-written checkpoint or output.
#include <cstdio>
#include <string>
#include <string_view>

namespace mamba3 {

class AtomicFile {
 public:
  explicit AtomicFile(std::string path);  // opens `path.tmp.<pid>.<id>` for writing; throws naming the path
  ~AtomicFile();                           // removes the temporary file unless commit() ran
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, size_t bytes);
  void write(std::string_view text) { write(text.data(), text.size()); }
  void commit();  // flush, fsync, rename over the target

 private:
  std::string path_, tmp_path_;
  std::FILE* file_ = nullptr;
};

}  // namespace mamba3
