#include "io/safetensors.h"

#include <algorithm>
#include <cstring>
#include <set>

#include <nlohmann/json.hpp>

#include "core/atomic_file.h"

namespace mamba3 {

using json = nlohmann::ordered_json;

namespace {

struct Entry {
  std::string name;
  DType dtype;
  Shape shape;
  uint64_t begin, end;
};

Entry parse_entry(const std::string& path, const std::string& name, const json& value, uint64_t data_size) {
  auto bad = [&](const std::string& why) -> Entry { fail("{}: tensor '{}': {}", path, name, why); };
  if (!value.is_object()) return bad("entry is not a JSON object");
  Entry e{name, DType::F32, {}, 0, 0};
  auto dt = value.find("dtype");
  if (dt == value.end() || !dt->is_string()) return bad("missing or non-string field 'dtype'");
  if (!dtype_from_name(dt->get<std::string>(), &e.dtype))
    return bad("unknown dtype '" + dt->get<std::string>() + "' (known: F32 F64 BF16 F16 I32 I64)");
  auto sh = value.find("shape");
  if (sh == value.end() || !sh->is_array()) return bad("missing or non-array field 'shape'");
  for (const auto& d : *sh) {
    if (!d.is_number_unsigned()) return bad("field 'shape' holds a value that is not a non-negative integer");
    if (d.get<uint64_t>() > uint64_t(INT64_MAX))
      return bad(fmt::format("field 'shape' holds the dimension {}, past 2^63 - 1", d.get<uint64_t>()));
    e.shape.push_back(d.get<int64_t>());
  }
  auto off = value.find("data_offsets");
  if (off == value.end() || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
      !(*off)[1].is_number_unsigned())
    return bad("field 'data_offsets' must be two non-negative integers");
  e.begin = (*off)[0].get<uint64_t>();
  e.end = (*off)[1].get<uint64_t>();
  if (e.begin > e.end)
    return bad(fmt::format("data_offsets [{}, {}]: begin is past end", e.begin, e.end));
  if (e.end > data_size)
    return bad(fmt::format("data_offsets [{}, {}] outside the data section of {} bytes", e.begin, e.end, data_size));
  // The shape's size in bytes, overflow-checked: a product that wraps (even in 128 bits: 2^63·2^63·4·8 = 2^131)
  // could otherwise match a small span. A zero dimension makes any other dimension legal.
  bool has_zero = std::find(e.shape.begin(), e.shape.end(), 0) != e.shape.end();
  uint64_t bytes = dtype_size(e.dtype);
  bool overflow = false;
  for (int64_t d : e.shape) overflow |= __builtin_mul_overflow(bytes, uint64_t(d), &bytes);
  if (has_zero) bytes = 0;
  if (overflow && !has_zero)
    return bad(fmt::format("shape {} of {} needs more than 2^64 bytes", shape_str(e.shape), dtype_name(e.dtype)));
  if (bytes != e.end - e.begin)
    return bad(fmt::format("shape {} of {} needs {} bytes but data_offsets span {}", shape_str(e.shape),
                           dtype_name(e.dtype), bytes, e.end - e.begin));
  return e;
}

}  // namespace

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  auto file = MappedFile::open(path);
  MAMBA3_CHECK(file->size() >= 8, "{}: truncated safetensors file ({} bytes, the header length alone needs 8)", path,
               file->size());
  uint64_t header_len;
  std::memcpy(&header_len, file->data(), 8);
  MAMBA3_CHECK(header_len <= file->size() - 8, "{}: header length {} runs past the end of the file ({} bytes)", path,
               header_len, file->size());
  const char* header = reinterpret_cast<const char*>(file->data() + 8);
  uint64_t data_size = file->size() - 8 - header_len;
  const unsigned char* data = file->data() + 8 + header_len;

  // Duplicate top-level keys are legal JSON but ambiguous here: catch them while parsing.
  std::set<std::string> seen;
  std::string duplicate;
  json::parser_callback_t on_event = [&](int depth, json::parse_event_t event, json& parsed) {
    if (depth == 1 && event == json::parse_event_t::key && !seen.insert(parsed.get<std::string>()).second)
      duplicate = parsed.get<std::string>();
    return true;
  };
  json root;
  try {
    root = json::parse(header, header + header_len, on_event);
  } catch (const json::exception& e) {
    fail("{}: header is not valid JSON: {}", path, e.what());
  }
  MAMBA3_CHECK(duplicate.empty(), "{}: tensor '{}' appears twice in the header", path, duplicate);
  MAMBA3_CHECK(root.is_object(), "{}: header JSON is not an object", path);

  SafetensorsFile out;
  out.path_ = path;
  std::vector<Entry> entries;
  for (auto it = root.begin(); it != root.end(); ++it) {
    if (it.key() == "__metadata__") {
      MAMBA3_CHECK(it->is_object(), "{}: field '__metadata__' is not an object", path);
      for (auto m = it->begin(); m != it->end(); ++m) {
        MAMBA3_CHECK(m->is_string(), "{}: __metadata__ value '{}' is not a string", path, m.key());
        out.metadata_[m.key()] = m->get<std::string>();
      }
      continue;
    }
    entries.push_back(parse_entry(path, it.key(), *it, data_size));
  }
  // No two tensors may share bytes. Empty tensors hold none, so they may sit at any offset (even inside another).
  std::vector<const Entry*> by_offset;
  for (const auto& e : entries)
    if (e.begin != e.end) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < by_offset.size(); ++i)
    MAMBA3_CHECK(by_offset[i]->begin >= by_offset[i - 1]->end, "{}: tensors '{}' and '{}' overlap in the data section",
                 path, by_offset[i - 1]->name, by_offset[i]->name);

  std::shared_ptr<const void> holder = file;
  for (const auto& e : entries) {
    const unsigned char* p = data + e.begin;
    Tensor t;
    if (reinterpret_cast<uintptr_t>(p) % dtype_size(e.dtype) == 0) {
      t = Tensor::view_of(holder, p, e.dtype, e.shape);
    } else {  // misaligned data (odd header length): copy rather than read unaligned
      t = Tensor::empty(e.dtype, e.shape);
      std::memcpy(t.raw(), p, t.nbytes());
    }
    out.names_.push_back(e.name);
    out.tensors_.emplace(e.name, std::move(t));
  }
  return out;
}

const Tensor& SafetensorsFile::get(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) fail("{}: no tensor named '{}'", path_, name);
  return it->second;
}

void write_safetensors(const std::string& path, const NamedTensors& tensors,
                       const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) {
    json meta = json::object();
    for (const auto& [k, v] : metadata) meta[k] = v;
    header["__metadata__"] = meta;
  }
  uint64_t offset = 0;
  std::set<std::string> names;
  for (const auto& [name, t] : tensors) {
    MAMBA3_CHECK(name != "__metadata__" && names.insert(name).second, "{}: duplicate or reserved tensor name '{}'",
                 path, name);
    MAMBA3_CHECK(t.defined(), "{}: tensor '{}' is undefined (holds no storage)", path, name);
    header[name] = {{"dtype", std::string(dtype_name(t.dtype()))},
                    {"shape", t.shape()},
                    {"data_offsets", {offset, offset + t.nbytes()}}};
    offset += t.nbytes();
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // keeps the data section 8-byte aligned
  uint64_t len = text.size();
  AtomicFile out(path);
  out.write(&len, 8);
  out.write(text);
  for (const auto& [name, t] : tensors) out.write(t.raw(), t.nbytes());
  out.commit();
}

}  // namespace mamba3
