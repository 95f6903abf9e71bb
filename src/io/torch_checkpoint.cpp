#include "io/torch_checkpoint.h"

#include <array>
#include <cstring>
#include <functional>
#include <map>
#include <unordered_map>

namespace mamba3 {

namespace {

uint16_t rd16(const unsigned char* p) { return uint16_t(p[0] | p[1] << 8); }
uint32_t rd32(const unsigned char* p) { return uint32_t(rd16(p)) | uint32_t(rd16(p + 2)) << 16; }
uint64_t rd64(const unsigned char* p) { return uint64_t(rd32(p)) | uint64_t(rd32(p + 4)) << 32; }

uint32_t crc32(const unsigned char* data, size_t n) {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) c = table[(c ^ data[i]) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

// ------------------------------------------------------------------------------------------------------------------
// ZIP: the end-of-central-directory record (and its ZIP64 form, which torch's writer always adds) locates the
// central directory; each central entry points to a local header, after which the stored bytes follow.

struct ZipEntry {
  std::string name;
  uint64_t offset = 0;  // of the data, from the start of the file
  uint64_t size = 0;
  uint32_t crc = 0;
  uint16_t method = 0;
  uint16_t flags = 0;
};

constexpr uint32_t kLocalSig = 0x04034b50, kCentralSig = 0x02014b50, kEndSig = 0x06054b50;
constexpr uint32_t kEnd64Sig = 0x06064b50, kLocator64Sig = 0x07064b50;

class ZipArchive {
 public:
  explicit ZipArchive(const MappedFile& file) : file_(file) { parse(); }

  const ZipEntry* find(const std::string& name) const {
    auto it = index_.find(name);
    return it == index_.end() ? nullptr : &entries_[it->second];
  }
  const std::vector<ZipEntry>& entries() const { return entries_; }

  // The bytes of a stored entry; compressed or encrypted entries are refused here, when they are needed.
  const unsigned char* data(const ZipEntry& e) const {
    MAMBA3_CHECK(e.method != 8,
                 "{}: zip entry '{}' is deflate-compressed; torch.save never compresses, so this archive was "
                 "rewritten by another tool (re-save it with torch.save or store it uncompressed)",
                 file_.path(), e.name);
    MAMBA3_CHECK(e.method == 0, "{}: zip entry '{}' uses compression method {} (only stored entries are supported)",
                 file_.path(), e.name, e.method);
    MAMBA3_CHECK(!(e.flags & 1), "{}: zip entry '{}' is encrypted", file_.path(), e.name);
    return file_.data() + e.offset;
  }

 private:
  [[noreturn]] void bad(const std::string& why) const {
    fail("{}: not a valid zip archive (torch.save format): {}", file_.path(), why);
  }

  void parse() {
    const unsigned char* d = file_.data();
    const uint64_t size = file_.size();
    if (size < 22) {
      if (size > 0 && d[0] == 0x80)
        fail("{}: legacy torch.save format (PyTorch < 1.6, a bare pickle) is not supported; re-save it with a "
             "newer torch",
             file_.path());
      bad(fmt::format("{} bytes, too short for an end-of-central-directory record", size));
    }
    // The end record sits at the very end, followed only by its comment (at most 65535 bytes).
    uint64_t end = UINT64_MAX;
    uint64_t lowest = size - 22 > 65535 ? size - 22 - 65535 : 0;
    for (uint64_t p = size - 22 + 1; p-- > lowest;) {
      if (rd32(d + p) == kEndSig && p + 22 + rd16(d + p + 20) <= size) {
        end = p;
        break;
      }
    }
    if (end == UINT64_MAX) {
      if (d[0] == 0x80)
        fail("{}: legacy torch.save format (PyTorch < 1.6, a bare pickle) is not supported; re-save it with a "
             "newer torch",
             file_.path());
      bad("no end-of-central-directory record (the file is truncated or not a zip archive)");
    }
    uint64_t count = rd16(d + end + 10);
    uint64_t cd_size = rd32(d + end + 12);
    uint64_t cd_offset = rd32(d + end + 16);
    if (rd16(d + end + 4) != 0 || rd16(d + end + 6) != 0) bad("multi-disk archives are not supported");

    if (end >= 20 && rd32(d + end - 20) == kLocator64Sig) {
      uint64_t at = rd64(d + end - 20 + 8);
      if (at > size || size - at < 56 || rd32(d + at) != kEnd64Sig)
        bad(fmt::format("ZIP64 end record expected at offset {} is missing or out of bounds", at));
      if (rd32(d + at + 16) != 0 || rd32(d + at + 20) != 0) bad("multi-disk archives are not supported");
      count = rd64(d + at + 32);
      cd_size = rd64(d + at + 40);
      cd_offset = rd64(d + at + 48);
    } else if (count == 0xFFFF || cd_size == 0xFFFFFFFF || cd_offset == 0xFFFFFFFF) {
      bad("the end record asks for ZIP64 fields but no ZIP64 locator precedes it");
    }
    if (cd_offset > size || cd_size > size - cd_offset)
      bad(fmt::format("central directory [{}, +{}) outside the file of {} bytes (truncated?)", cd_offset, cd_size,
                      size));
    if (count > cd_size / 46) bad(fmt::format("{} entries cannot fit a central directory of {} bytes", count, cd_size));

    const uint64_t cd_end = cd_offset + cd_size;
    uint64_t p = cd_offset;
    entries_.reserve(count);
    for (uint64_t i = 0; i < count; ++i) {
      if (cd_end - p < 46 || rd32(d + p) != kCentralSig)
        bad(fmt::format("central directory entry {} at offset {} has no valid signature", i, p));
      ZipEntry e;
      e.flags = rd16(d + p + 8);
      e.method = rd16(d + p + 10);
      e.crc = rd32(d + p + 16);
      uint64_t comp = rd32(d + p + 20), uncomp = rd32(d + p + 24);
      uint16_t name_len = rd16(d + p + 28), extra_len = rd16(d + p + 30), comment_len = rd16(d + p + 32);
      uint64_t local = rd32(d + p + 42);
      if (cd_end - p - 46 < uint64_t(name_len) + extra_len + comment_len)
        bad(fmt::format("central directory entry {} runs past the directory", i));
      e.name.assign(reinterpret_cast<const char*>(d + p + 46), name_len);
      // ZIP64 extended information: the 64-bit values of exactly those fields that hold 0xFFFFFFFF, in order.
      const unsigned char* x = d + p + 46 + name_len;
      const unsigned char* x_end = x + extra_len;
      while (x_end - x >= 4) {
        uint16_t id = rd16(x), len = rd16(x + 2);
        if (x_end - x - 4 < len) bad(fmt::format("entry '{}': extra field runs past its record", e.name));
        if (id == 0x0001) {
          const unsigned char* f = x + 4;
          uint16_t left = len;
          for (uint64_t* v : {&uncomp, &comp, &local}) {
            if (*v != 0xFFFFFFFF) continue;
            if (left < 8) bad(fmt::format("entry '{}': ZIP64 extra field too short", e.name));
            *v = rd64(f);
            f += 8;
            left -= 8;
          }
        }
        x += 4 + len;
      }
      p += 46 + uint64_t(name_len) + extra_len + comment_len;

      if (local > size || size - local < 30 || rd32(d + local) != kLocalSig)
        bad(fmt::format("entry '{}': no local header at offset {} (corrupted or truncated)", e.name, local));
      e.offset = local + 30 + rd16(d + local + 26) + rd16(d + local + 28);
      e.size = comp;
      if (e.offset > size || comp > size - e.offset)
        bad(fmt::format("entry '{}': data [{}, +{}) runs past the end of the file ({} bytes; truncated?)", e.name,
                        e.offset, comp, size));
      if (e.method == 0 && comp != uncomp)
        bad(fmt::format("stored entry '{}' has compressed size {} but uncompressed size {}", e.name, comp, uncomp));
      if (!index_.emplace(e.name, entries_.size()).second) bad(fmt::format("entry '{}' appears twice", e.name));
      entries_.push_back(std::move(e));
    }
  }

  const MappedFile& file_;
  std::vector<ZipEntry> entries_;
  std::unordered_map<std::string, size_t> index_;
};

// ------------------------------------------------------------------------------------------------------------------
// Pickle values: just enough of Python's object model for a state_dict.

struct Storage {
  std::string key;
  DType dtype = DType::F32;
  int64_t numel = 0;
  std::shared_ptr<const void> holder;
  const unsigned char* data = nullptr;
};

struct Value;
using ValuePtr = std::shared_ptr<Value>;

struct TensorSpec {
  std::shared_ptr<const Storage> storage;
  int64_t offset = 0;
  std::vector<int64_t> size, stride;
};

enum class Kind { None, Bool, Int, Float, String, Tuple, List, Dict, Global, Storage, Tensor };

const char* kind_name(Kind k) {
  static const char* names[] = {"None",   "bool",   "int",          "float",   "str",   "tuple",
                                "list",   "dict",   "global",       "storage", "tensor"};
  return names[int(k)];
}

struct Value {
  Kind kind = Kind::None;
  int64_t i = 0;                                       // Bool, Int
  double f = 0;                                        // Float
  std::string s, name;                                 // String; Global: module and name
  std::vector<ValuePtr> items;                         // Tuple, List
  std::vector<std::pair<ValuePtr, ValuePtr>> entries;  // Dict, in insertion order
  std::unordered_map<std::string, size_t> str_index;   // Dict: string keys -> entries index
  std::shared_ptr<const Storage> storage;              // Storage
  std::shared_ptr<const TensorSpec> tensor;            // Tensor
};

ValuePtr make(Kind k) {
  auto v = std::make_shared<Value>();
  v->kind = k;
  return v;
}

// The callables a state_dict pickle may name, and the storage classes with their element types.
bool storage_dtype(const std::string& name, DType* out) {
  static const std::map<std::string, DType> types = {
      {"FloatStorage", DType::F32}, {"DoubleStorage", DType::F64}, {"HalfStorage", DType::F16},
      {"BFloat16Storage", DType::BF16}, {"LongStorage", DType::I64}, {"IntStorage", DType::I32}};
  auto it = types.find(name);
  if (it == types.end()) return false;
  *out = it->second;
  return true;
}

bool allowed_global(const std::string& module, const std::string& name) {
  DType unused;
  if (module == "collections" && name == "OrderedDict") return true;
  if (module == "torch._utils" && (name == "_rebuild_tensor_v2" || name == "_rebuild_parameter")) return true;
  return module == "torch" && storage_dtype(name, &unused);
}

using StorageLoader = std::function<std::shared_ptr<const Storage>(const Value& pid)>;

class Unpickler {
 public:
  Unpickler(std::string where, const unsigned char* data, size_t size, StorageLoader load)
      : where_(std::move(where)), d_(data), n_(size), load_(std::move(load)) {}

  ValuePtr run() {
    while (true) {
      if (pos_ >= n_) fail("{}: pickle ends at byte {} without a STOP opcode (truncated)", where_, pos_);
      op_pos_ = pos_;
      op_ = d_[pos_++];
      switch (op_) {
        case 0x80: take(1); break;  // PROTO: any version; unsupported opcodes are caught one by one
        case 0x95: take(8); break;  // FRAME: a length hint only
        case '.': {                 // STOP
          ValuePtr result = pop();
          return result;
        }
        case '(': marks_.push_back(stack_.size()); break;  // MARK
        case '0': pop(); break;                            // POP
        case '1': pop_mark(); break;                       // POP_MARK
        case '2': push(top()); break;                      // DUP
        case 'N': push(make(Kind::None)); break;
        case 0x88: push(boolean(true)); break;   // NEWTRUE
        case 0x89: push(boolean(false)); break;  // NEWFALSE
        case 'J': {                              // BININT
          uint32_t v = rd32(take(4));
          push(integer(int32_t(v)));
          break;
        }
        case 'K': push(integer(*take(1))); break;       // BININT1
        case 'M': push(integer(rd16(take(2)))); break;  // BININT2
        case 0x8a: push(long_int(*take(1))); break;     // LONG1
        case 0x8b: {                                    // LONG4
          uint32_t len = rd32(take(4));
          push(long_int(len));
          break;
        }
        case 'G': {  // BINFLOAT: big-endian double
          const unsigned char* p = take(8);
          uint64_t bits = 0;
          for (int k = 0; k < 8; ++k) bits = bits << 8 | p[k];
          auto v = make(Kind::Float);
          std::memcpy(&v->f, &bits, 8);
          push(v);
          break;
        }
        case 'X': string(rd32(take(4))); break;  // BINUNICODE
        case 0x8c: string(*take(1)); break;      // SHORT_BINUNICODE
        case 0x8d: string(rd64(take(8))); break;  // BINUNICODE8
        case 'T': string(rd32(take(4))); break;  // BINSTRING (bytes read as text)
        case 'U': string(*take(1)); break;       // SHORT_BINSTRING
        case 'B': string(rd32(take(4))); break;  // BINBYTES
        case 'C': string(*take(1)); break;       // SHORT_BINBYTES
        case ')': push(make(Kind::Tuple)); break;  // EMPTY_TUPLE
        case 't': tuple(pop_mark()); break;        // TUPLE
        case 0x85: tuple(pop_n(1)); break;         // TUPLE1
        case 0x86: tuple(pop_n(2)); break;         // TUPLE2
        case 0x87: tuple(pop_n(3)); break;         // TUPLE3
        case ']': push(make(Kind::List)); break;   // EMPTY_LIST
        case 'l': {                                // LIST
          auto v = make(Kind::List);
          v->items = pop_mark();
          push(v);
          break;
        }
        case 'a': {  // APPEND
          ValuePtr item = pop();
          expect(top(), Kind::List, "APPEND target")->items.push_back(item);
          break;
        }
        case 'e': {  // APPENDS
          auto items = pop_mark();
          auto& list = expect(top(), Kind::List, "APPENDS target")->items;
          list.insert(list.end(), items.begin(), items.end());
          break;
        }
        case '}': push(make(Kind::Dict)); break;  // EMPTY_DICT
        case 'd': {                               // DICT
          auto items = pop_mark();
          auto v = make(Kind::Dict);
          set_items(*v, items);
          push(v);
          break;
        }
        case 's': {  // SETITEM
          auto kv = pop_n(2);
          set_items(*expect(top(), Kind::Dict, "SETITEM target"), kv);
          break;
        }
        case 'u': {  // SETITEMS
          auto kv = pop_mark();
          set_items(*expect(top(), Kind::Dict, "SETITEMS target"), kv);
          break;
        }
        case 'c': {  // GLOBAL: "module\nname\n"
          std::string module = line(), name = line();
          global(module, name);
          break;
        }
        case 0x93: {  // STACK_GLOBAL
          ValuePtr name = pop(), module = pop();
          global(expect(module, Kind::String, "STACK_GLOBAL module")->s,
                 expect(name, Kind::String, "STACK_GLOBAL name")->s);
          break;
        }
        case 'Q': {  // BINPERSID
          ValuePtr pid = pop();
          auto v = make(Kind::Storage);
          v->storage = load_(*pid);
          push(v);
          break;
        }
        case 'R': {  // REDUCE
          ValuePtr args = pop();
          ValuePtr callable = pop();
          push(reduce(*expect(callable, Kind::Global, "REDUCE callable"), *expect(args, Kind::Tuple, "REDUCE args")));
          break;
        }
        case 'b': {  // BUILD: a state_dict's OrderedDict gets its `_metadata` attribute; nothing we need
          ValuePtr state = pop();
          if (top()->kind != Kind::Dict)
            bad(fmt::format("BUILD on a {} (only the state_dict's OrderedDict is expected)", kind_name(top()->kind)));
          break;
        }
        case 'q': memo_[*take(1)] = top(); break;        // BINPUT
        case 'r': memo_[rd32(take(4))] = top(); break;   // LONG_BINPUT
        case 0x94: memo_[memo_.size()] = top(); break;   // MEMOIZE
        case 'h': push(memo(*take(1))); break;           // BINGET
        case 'j': push(memo(rd32(take(4)))); break;      // LONG_BINGET
        default:
          bad("unsupported pickle opcode (a state_dict of tensors never needs it)");
      }
    }
  }

 private:
  [[noreturn]] void bad(const std::string& why) const {
    char c = (op_ >= 0x20 && op_ < 0x7f) ? char(op_) : '?';
    fail("{}: pickle opcode 0x{:02x} ('{}') at byte {}: {}", where_, op_, c, op_pos_, why);
  }
  const unsigned char* take(uint64_t k) {
    if (k > n_ - pos_) bad(fmt::format("needs {} more bytes but the pickle ends at byte {} (truncated)", k, n_));
    const unsigned char* p = d_ + pos_;
    pos_ += k;
    return p;
  }
  std::string line() {
    const void* nl = std::memchr(d_ + pos_, '\n', n_ - pos_);
    if (!nl) bad("unterminated GLOBAL name");
    size_t len = static_cast<const unsigned char*>(nl) - (d_ + pos_);
    std::string s(reinterpret_cast<const char*>(d_ + pos_), len);
    pos_ += len + 1;
    return s;
  }
  void push(ValuePtr v) { stack_.push_back(std::move(v)); }
  ValuePtr pop() {
    if (stack_.empty() || (!marks_.empty() && stack_.size() <= marks_.back())) bad("stack underflow");
    ValuePtr v = std::move(stack_.back());
    stack_.pop_back();
    return v;
  }
  const ValuePtr& top() {
    if (stack_.empty() || (!marks_.empty() && stack_.size() <= marks_.back())) bad("stack underflow");
    return stack_.back();
  }
  std::vector<ValuePtr> pop_n(size_t k) {
    size_t floor = marks_.empty() ? 0 : marks_.back();
    if (stack_.size() - floor < k) bad("stack underflow");
    std::vector<ValuePtr> out(stack_.end() - k, stack_.end());
    stack_.resize(stack_.size() - k);
    return out;
  }
  std::vector<ValuePtr> pop_mark() {
    if (marks_.empty()) bad("no MARK on the stack");
    size_t at = marks_.back();
    marks_.pop_back();
    std::vector<ValuePtr> out(stack_.begin() + at, stack_.end());
    stack_.resize(at);
    return out;
  }
  ValuePtr memo(uint64_t k) {
    auto it = memo_.find(k);
    if (it == memo_.end()) bad(fmt::format("memo key {} was never stored", k));
    return it->second;
  }
  Value* expect(const ValuePtr& v, Kind k, const char* what) {
    if (v->kind != k) bad(fmt::format("{} is a {}, expected a {}", what, kind_name(v->kind), kind_name(k)));
    return v.get();
  }
  static ValuePtr integer(int64_t i) {
    auto v = make(Kind::Int);
    v->i = i;
    return v;
  }
  static ValuePtr boolean(bool b) {
    auto v = make(Kind::Bool);
    v->i = b;
    return v;
  }
  // LONG1/LONG4: little-endian two's complement of `len` bytes.
  ValuePtr long_int(uint64_t len) {
    if (len > 8) bad(fmt::format("integer of {} bytes does not fit 64 bits", len));
    const unsigned char* p = take(len);
    uint64_t u = 0;
    for (uint64_t k = 0; k < len; ++k) u |= uint64_t(p[k]) << (8 * k);
    if (len > 0 && len < 8 && (p[len - 1] & 0x80)) u |= ~uint64_t(0) << (8 * len);  // sign-extend
    return integer(int64_t(u));
  }
  void string(uint64_t len) {
    const unsigned char* p = take(len);
    auto v = make(Kind::String);
    v->s.assign(reinterpret_cast<const char*>(p), len);
    push(v);
  }
  void tuple(std::vector<ValuePtr> items) {
    auto v = make(Kind::Tuple);
    v->items = std::move(items);
    push(v);
  }
  void set_items(Value& dict, const std::vector<ValuePtr>& kv) {
    if (kv.size() % 2) bad("odd number of items for a dict");
    for (size_t k = 0; k < kv.size(); k += 2) {
      if (kv[k]->kind == Kind::String) {
        auto [it, fresh] = dict.str_index.emplace(kv[k]->s, dict.entries.size());
        if (!fresh) {
          dict.entries[it->second].second = kv[k + 1];
          continue;
        }
      }
      dict.entries.emplace_back(kv[k], kv[k + 1]);
    }
  }
  void global(const std::string& module, const std::string& name) {
    if (!allowed_global(module, name))
      bad(fmt::format("unsupported global '{}.{}' (a state_dict needs only collections.OrderedDict, "
                      "torch._utils._rebuild_tensor_v2 and the storage classes torch.FloatStorage, DoubleStorage, "
                      "HalfStorage, BFloat16Storage, LongStorage, IntStorage)",
                      module, name));
    auto v = make(Kind::Global);
    v->s = module;
    v->name = name;
    push(v);
  }
  std::vector<int64_t> int_tuple(const ValuePtr& v, const char* what) {
    std::vector<int64_t> out;
    for (const auto& item : expect(v, Kind::Tuple, what)->items) out.push_back(expect(item, Kind::Int, what)->i);
    return out;
  }
  ValuePtr reduce(const Value& callable, const Value& args) {
    const auto& a = args.items;
    if (callable.name == "OrderedDict") {
      if (!a.empty()) bad("OrderedDict called with arguments");
      return make(Kind::Dict);
    }
    if (callable.name == "_rebuild_tensor_v2") {
      // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
      if (a.size() != 6 && a.size() != 7)
        bad(fmt::format("_rebuild_tensor_v2 takes 6 or 7 arguments, got {}", a.size()));
      auto spec = std::make_shared<TensorSpec>();
      spec->storage = expect(a[0], Kind::Storage, "_rebuild_tensor_v2 storage")->storage;
      spec->offset = expect(a[1], Kind::Int, "_rebuild_tensor_v2 storage_offset")->i;
      spec->size = int_tuple(a[2], "_rebuild_tensor_v2 size");
      spec->stride = int_tuple(a[3], "_rebuild_tensor_v2 stride");
      auto v = make(Kind::Tensor);
      v->tensor = std::move(spec);
      return v;
    }
    if (callable.name == "_rebuild_parameter") {  // nn.Parameter(data, requires_grad, hooks): the data is the tensor
      if (a.size() != 3) bad(fmt::format("_rebuild_parameter takes 3 arguments, got {}", a.size()));
      expect(a[0], Kind::Tensor, "_rebuild_parameter data");
      return a[0];
    }
    bad(fmt::format("'{}.{}' cannot be called", callable.s, callable.name));
  }

  std::string where_;
  const unsigned char* d_;
  size_t n_;
  size_t pos_ = 0, op_pos_ = 0;
  unsigned char op_ = 0;
  StorageLoader load_;
  std::vector<ValuePtr> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, ValuePtr> memo_;
};

// ------------------------------------------------------------------------------------------------------------------
// Tensors from (storage, offset, size, stride): a view when the layout is row-major contiguous, else a copy.

Tensor materialize(const std::string& path, const std::string& name, const TensorSpec& spec) {
  const Storage& st = *spec.storage;
  auto bad = [&](const std::string& why) { fail("{}: tensor '{}': {}", path, name, why); };
  if (spec.size.size() != spec.stride.size())
    bad(fmt::format("size has {} dimensions but stride has {}", spec.size.size(), spec.stride.size()));
  if (spec.offset < 0) bad(fmt::format("negative storage offset {}", spec.offset));
  unsigned __int128 numel = 1, last = uint64_t(spec.offset);
  for (size_t k = 0; k < spec.size.size(); ++k) {
    if (spec.size[k] < 0 || spec.stride[k] < 0)
      bad(fmt::format("negative size or stride (size {}, stride {})", shape_str(spec.size), shape_str(spec.stride)));
    numel *= uint64_t(spec.size[k]);
    if (numel > uint64_t(INT64_MAX)) bad(fmt::format("size {} overflows", shape_str(spec.size)));
    if (spec.size[k] > 0) last += (unsigned __int128)uint64_t(spec.size[k] - 1) * uint64_t(spec.stride[k]);
  }
  Shape shape(spec.size.begin(), spec.size.end());
  if (numel == 0) return Tensor::empty(st.dtype, shape);
  if (last >= (unsigned __int128)uint64_t(st.numel))
    bad(fmt::format("size {} stride {} at offset {} reaches element {} but storage '{}' holds only {}",
                    shape_str(spec.size), shape_str(spec.stride), spec.offset, uint64_t(last), st.key, st.numel));
  const size_t el = dtype_size(st.dtype);
  const unsigned char* base = st.data + size_t(spec.offset) * el;

  bool contiguous = true;
  int64_t expected = 1;
  for (size_t k = spec.size.size(); k-- > 0;) {
    if (spec.size[k] != 1 && spec.stride[k] != expected) contiguous = false;
    expected *= spec.size[k];
  }
  if (contiguous) return Tensor::view_of(st.holder, base, st.dtype, shape);

  // Strided gather into a fresh row-major tensor (expanded or transposed tensors saved as such).
  Tensor t = Tensor::empty(st.dtype, shape);
  unsigned char* out = static_cast<unsigned char*>(t.raw());
  const size_t rank = shape.size();
  std::vector<int64_t> index(rank, 0);
  for (int64_t i = 0, n = int64_t(numel); i < n; ++i) {
    int64_t at = 0;
    for (size_t k = 0; k < rank; ++k) at += index[k] * spec.stride[k];
    std::memcpy(out + size_t(i) * el, base + size_t(at) * el, el);
    for (size_t k = rank; k-- > 0;) {
      if (++index[k] < shape[k]) break;
      index[k] = 0;
    }
  }
  return t;
}

}  // namespace

NamedTensors read_torch_checkpoint(const std::string& path) {
  auto file = MappedFile::open(path);
  ZipArchive zip(*file);

  // The one top folder holding data.pkl (its name is whatever the file was called when saved).
  const ZipEntry* pkl = nullptr;
  for (const auto& e : zip.entries()) {
    if (e.name.size() > 9 && e.name.compare(e.name.size() - 9, 9, "/data.pkl") == 0 &&
        e.name.find('/') == e.name.size() - 9) {
      MAMBA3_CHECK(!pkl, "{}: two pickles '{}' and '{}' in one archive", path, pkl->name, e.name);
      pkl = &e;
    }
  }
  MAMBA3_CHECK(pkl, "{}: no '<top>/data.pkl' entry: not a torch.save archive (TorchScript archives are not supported)",
               path);
  const std::string top = pkl->name.substr(0, pkl->name.size() - 8);  // "<top>/"
  const unsigned char* pkl_data = zip.data(*pkl);
  MAMBA3_CHECK(crc32(pkl_data, pkl->size) == pkl->crc, "{}: zip entry '{}' fails its CRC-32 check (corrupted)", path,
               pkl->name);
  if (const ZipEntry* order = zip.find(top + "byteorder")) {
    std::string text(reinterpret_cast<const char*>(zip.data(*order)), order->size);
    MAMBA3_CHECK(text == "little", "{}: byteorder '{}' is not supported (only little-endian checkpoints)", path, text);
  }

  std::shared_ptr<const void> holder = file;
  std::map<std::string, std::shared_ptr<const Storage>> storages;
  StorageLoader load = [&](const Value& pid) -> std::shared_ptr<const Storage> {
    auto bad = [&](const std::string& why) -> std::shared_ptr<const Storage> {
      fail("{}: {}: storage reference: {}", path, pkl->name, why);
    };
    // ('storage', torch.XStorage, key, location, numel)
    const auto& t = pid.items;
    if (pid.kind != Kind::Tuple || t.size() != 5 || t[0]->kind != Kind::String || t[0]->s != "storage" ||
        t[1]->kind != Kind::Global || t[2]->kind != Kind::String || t[4]->kind != Kind::Int || t[4]->i < 0)
      return bad("expected ('storage', <torch storage class>, key, location, numel)");
    DType dtype;
    if (t[1]->s != "torch" || !storage_dtype(t[1]->name, &dtype))
      return bad(fmt::format("'{}.{}' is not a supported storage class", t[1]->s, t[1]->name));
    const std::string& key = t[2]->s;
    if (auto it = storages.find(key); it != storages.end()) {
      if (it->second->dtype != dtype || it->second->numel != t[4]->i)
        return bad(fmt::format("storage '{}' is referenced with two different types or sizes", key));
      return it->second;
    }
    const std::string entry_name = top + "data/" + key;
    const ZipEntry* entry = zip.find(entry_name);
    if (!entry) return bad(fmt::format("missing data file '{}' for storage '{}'", entry_name, key));
    const size_t el = dtype_size(dtype);
    if (uint64_t(t[4]->i) > entry->size / el)
      return bad(fmt::format("storage '{}' needs {} elements of {} but '{}' holds only {} bytes", key, t[4]->i,
                             dtype_name(dtype), entry_name, entry->size));
    auto st = std::make_shared<Storage>();
    st->key = key;
    st->dtype = dtype;
    st->numel = t[4]->i;
    const unsigned char* bytes = zip.data(*entry);
    if (reinterpret_cast<uintptr_t>(bytes) % el == 0) {
      st->holder = holder;
      st->data = bytes;
    } else {  // torch aligns storages to 64 bytes; another writer may not: copy once, shared by every view
      size_t n = size_t(st->numel) * el;
      std::shared_ptr<uint64_t[]> copy(new uint64_t[(n + 7) / 8 + 1]);
      std::memcpy(copy.get(), bytes, n);
      st->data = reinterpret_cast<const unsigned char*>(copy.get());
      st->holder = std::shared_ptr<const void>(copy, copy.get());
    }
    storages.emplace(key, st);
    return st;
  };

  Unpickler unpickler(path + ": " + pkl->name, pkl_data, pkl->size, load);
  ValuePtr root = unpickler.run();
  MAMBA3_CHECK(root->kind == Kind::Dict, "{}: {}: the pickled object is a {}, not a state_dict (a dict of tensors)",
               path, pkl->name, kind_name(root->kind));
  NamedTensors out;
  out.reserve(root->entries.size());
  for (const auto& [key, value] : root->entries) {
    MAMBA3_CHECK(key->kind == Kind::String, "{}: {}: state_dict key is a {}, not a str", path, pkl->name,
                 kind_name(key->kind));
    MAMBA3_CHECK(value->kind == Kind::Tensor, "{}: state_dict entry '{}' is a {}, not a tensor", path, key->s,
                 kind_name(value->kind));
    out.emplace_back(key->s, materialize(path, key->s, *value->tensor));
  }
  return out;
}

}  // namespace mamba3
