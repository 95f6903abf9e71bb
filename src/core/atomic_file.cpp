#include "core/atomic_file.h"

#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>

#include "core/error.h"

namespace mamba3 {

AtomicFile::AtomicFile(std::string path) : path_(std::move(path)) {
  // Unique per live object, not just per process: two writers of one target (threads saving the same checkpoint)
  // must not share, truncate or delete each other's temporary file.
  tmp_path_ = fmt::format("{}.tmp.{}.{:x}", path_, ::getpid(), reinterpret_cast<uintptr_t>(this));
  file_ = std::fopen(tmp_path_.c_str(), "wb");
  if (!file_) fail("{}: cannot create temporary file {}: {}", path_, tmp_path_, std::strerror(errno));
}

AtomicFile::~AtomicFile() {
  if (file_) {
    std::fclose(file_);
    std::remove(tmp_path_.c_str());
  }
}

void AtomicFile::write(const void* data, size_t bytes) {
  MAMBA3_CHECK(file_, "{}: write after commit", path_);
  if (bytes && std::fwrite(data, 1, bytes, file_) != bytes) fail("{}: write failed: {}", path_, std::strerror(errno));
}

void AtomicFile::commit() {
  MAMBA3_CHECK(file_, "{}: commit twice", path_);
  bool ok = std::fflush(file_) == 0 && ::fsync(fileno(file_)) == 0;
  ok = (std::fclose(file_) == 0) && ok;
  file_ = nullptr;
  if (!ok || std::rename(tmp_path_.c_str(), path_.c_str()) != 0) {
    int err = errno;
    std::remove(tmp_path_.c_str());
    fail("{}: cannot finish writing: {}", path_, std::strerror(err));
  }
}

}  // namespace mamba3
