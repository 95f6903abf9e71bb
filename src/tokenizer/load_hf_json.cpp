// Hugging Face tokenizer.json → Tokenizer. Supported: model BPE over byte-level strings (vocab, merges as "a b" or
// ["a", "b"], ignore_merges), added tokens, pre-tokenizers ByteLevel / Split(Isolated) / Sequence, decoder
// ByteLevel, post-processor TemplateProcessing (recorded, not applied). Anything that would change the ids and is not
// implemented (normalizers, dropout, suffixes, byte fallback, other split behaviours) is an error, never ignored.
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tokenizer/byte_level.h"
#include "tokenizer/tokenizer_impl.h"

namespace mamba3 {
namespace {

using nlohmann::json;

struct Loader {
  const std::string& origin;
  Tokenizer::Impl& t;

  [[noreturn]] void error(std::string_view entry, std::string_view what) const {
    fail("{}: {}: {}", origin, entry, what);
  }
  const json& member(const json& obj, const char* key, std::string_view where) const {
    const auto it = obj.find(key);
    if (it == obj.end()) error(where, fmt::format("\"{}\" is missing", key));
    return *it;
  }
  bool flag(const json& obj, const char* key, bool fallback, std::string_view where) const {
    const auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) return fallback;
    if (!it->is_boolean()) error(where, fmt::format("\"{}\" must be true or false", key));
    return it->get<bool>();
  }
  static std::string type_of(const json& obj) {
    const auto it = obj.find("type");
    return it != obj.end() && it->is_string() ? it->get<std::string>() : std::string();
  }

  void pre_tokenizer(const json& p, const std::string& where) {
    if (p.is_null()) return;
    if (!p.is_object()) error(where, "must be an object or null");
    const std::string type = type_of(p);
    if (type == "Sequence") {
      const json& list = member(p, "pretokenizers", where);
      if (!list.is_array()) error(where + ".pretokenizers", "must be an array");
      for (size_t i = 0; i < list.size(); ++i) pre_tokenizer(list[i], fmt::format("{}.pretokenizers[{}]", where, i));
    } else if (type == "ByteLevel") {
      if (flag(p, "add_prefix_space", false, where)) t.steps.push_back(PreStep{nullptr, true});
      if (flag(p, "use_regex", true, where))
        t.steps.push_back(PreStep{std::make_unique<SplitRegex>(patterns::gpt2, origin + ": " + where), false});
      t.pattern_note += t.pattern_note.empty() ? "" : " + ";
      t.pattern_note += "ByteLevel";
    } else if (type == "Split") {
      const json& pattern = member(p, "pattern", where);
      std::string regex;
      if (pattern.is_object() && pattern.contains("Regex") && pattern["Regex"].is_string()) {
        regex = pattern["Regex"].get<std::string>();
      } else if (pattern.is_object() && pattern.contains("String") && pattern["String"].is_string()) {
        for (char c : pattern["String"].get<std::string>()) {  // a literal: escape every non-alphanumeric byte
          if (!std::isalnum(static_cast<unsigned char>(c)) && !(static_cast<unsigned char>(c) & 0x80)) regex += '\\';
          regex += c;
        }
      } else {
        error(where + ".pattern", "must be {\"Regex\": \"…\"} or {\"String\": \"…\"}");
      }
      const auto behavior = p.value("behavior", std::string("Isolated"));
      if (behavior != "Isolated") error(where + ".behavior", fmt::format("\"{}\" is not supported (only Isolated)", behavior));
      if (flag(p, "invert", false, where)) error(where + ".invert", "true is not supported");
      t.steps.push_back(PreStep{std::make_unique<SplitRegex>(regex, origin + ": " + where + ".pattern"), false});
      t.pattern_note += t.pattern_note.empty() ? "" : " + ";
      t.pattern_note += "Split";
    } else {
      error(where, fmt::format("pre-tokenizer type \"{}\" is not supported", type));
    }
  }

  void decoder(const json& d, const std::string& where) {
    if (d.is_null()) return;
    const std::string type = type_of(d);
    if (type == "ByteLevel") return;
    if (type == "Sequence" && d.contains("decoders") && d["decoders"].is_array()) {
      for (size_t i = 0; i < d["decoders"].size(); ++i)
        decoder(d["decoders"][i], fmt::format("{}.decoders[{}]", where, i));
      return;
    }
    error(where, fmt::format("decoder type \"{}\" is not supported (byte-level BPE needs ByteLevel)", type));
  }

  void post_processor(const json& p, const std::string& where) {
    if (p.is_null()) return;
    const std::string type = type_of(p);
    if (type == "Sequence" && p.contains("processors") && p["processors"].is_array()) {
      for (size_t i = 0; i < p["processors"].size(); ++i)
        post_processor(p["processors"][i], fmt::format("{}.processors[{}]", where, i));
    } else if (type == "TemplateProcessing") {
      const json& single = member(p, "single", where);
      const json& specials = p.value("special_tokens", json::object());
      bool seen_sequence = false;
      for (const json& item : single) {
        if (item.contains("Sequence")) {
          seen_sequence = true;
        } else if (item.contains("SpecialToken")) {
          const std::string name = item["SpecialToken"].value("id", std::string());
          if (!specials.contains(name) || !specials[name].contains("ids"))
            error(where + ".special_tokens", fmt::format("\"{}\" is used by the template but not defined", name));
          for (const json& id : specials[name]["ids"]) (seen_sequence ? t.suffix : t.prefix).push_back(id.get<uint32_t>());
        }
      }
    }
    // Other processors (ByteLevel offsets, Roberta/Bert templates) do not change encode()'s ids.
  }
};

}  // namespace

Tokenizer Tokenizer::from_hf_json_text(std::string_view text, const std::string& origin) {
  json root;
  try {
    root = json::parse(text.begin(), text.end());
  } catch (const json::exception& e) {
    fail("{}: not valid JSON: {}", origin, e.what());
  }
  auto impl = std::make_shared<Impl>();
  Impl& t = *impl;
  t.kind = Kind::HuggingFace;
  t.origin = origin;
  Loader L{origin, t};
  if (!root.is_object()) L.error("(top level)", "must be a JSON object");

  try {
    // Added tokens first: a vocabulary entry that is not a byte-level string is accepted when it is one of them.
    std::unordered_map<std::string, uint32_t> added_by_content;
    if (root.contains("added_tokens") && !root["added_tokens"].is_null()) {
      const json& list = root["added_tokens"];
      if (!list.is_array()) L.error("added_tokens", "must be an array");
      for (size_t i = 0; i < list.size(); ++i) {
        const std::string where = fmt::format("added_tokens[{}]", i);
        const json& a = list[i];
        if (!a.is_object() || !a.contains("id") || !a["id"].is_number_unsigned() || !a.contains("content") ||
            !a["content"].is_string())
          L.error(where, "needs an unsigned \"id\" and a string \"content\"");
        AddedToken tok{a["content"].get<std::string>(), a["id"].get<uint32_t>(), L.flag(a, "special", false, where)};
        if (tok.content.empty()) L.error(where, "content is empty");
        for (const char* unsupported : {"single_word", "lstrip", "rstrip"})
          if (L.flag(a, unsupported, false, where))
            L.error(where, fmt::format("\"{}\": true is not supported (token \"{}\")", unsupported, tok.content));
        added_by_content[tok.content] = tok.id;
        t.added.add(tok);
        t.set_id(tok.id, tok.content, tok.special ? Impl::kSpecial : Impl::kAdded);
      }
    }

    const json& model = L.member(root, "model", "(top level)");
    if (!model.is_object()) L.error("model", "must be an object");
    const std::string type = Loader::type_of(model);
    if (!type.empty() && type != "BPE") L.error("model.type", fmt::format("\"{}\" is not supported (only BPE)", type));
    if (model.contains("dropout") && !model["dropout"].is_null() && model["dropout"] != 0)
      L.error("model.dropout", "BPE dropout is not supported");
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
      if (model.contains(key) && !model[key].is_null() && model[key] != "")
        L.error(fmt::format("model.{}", key), "is not supported by byte-level BPE");
    if (L.flag(model, "byte_fallback", false, "model")) L.error("model.byte_fallback", "true is not supported");
    t.bpe.set_whole_piece_lookup(L.flag(model, "ignore_merges", false, "model"));

    const json& vocab = L.member(model, "vocab", "model");
    if (!vocab.is_object()) L.error("model.vocab", "must be an object of token → id");
    std::unordered_map<std::string, uint32_t> symbol_ids;  // byte-level string → id, for the merges
    symbol_ids.reserve(vocab.size());
    std::vector<const std::string*> seen;
    for (const auto& [symbols, id_json] : vocab.items()) {
      if (!id_json.is_number_unsigned())
        L.error("model.vocab", fmt::format("entry \"{}\": the id must be an unsigned integer", symbols));
      const uint32_t id = id_json.get<uint32_t>();
      if (id < seen.size() && seen[id])
        L.error("model.vocab", fmt::format("id {} is used by both \"{}\" and \"{}\"", id, *seen[id], symbols));
      symbol_ids[symbols] = id;
      if (id >= seen.size()) seen.resize(size_t(id) + 1, nullptr);
      seen[id] = &symbol_ids.find(symbols)->first;
      auto bytes = byte_level::decode(symbols);
      if (!bytes) {
        if (added_by_content.count(symbols)) continue;  // an added token listed in the vocabulary too
        L.error("model.vocab", fmt::format("entry \"{}\" (id {}) is not a byte-level string", symbols, id));
      }
      t.bpe.add_token(id, *bytes);
      if (id >= t.id_kind.size() || t.id_kind[id] == Impl::kAbsent) t.set_id(id, *bytes, Impl::kRegular);
    }

    const json& merges = L.member(model, "merges", "model");
    if (!merges.is_array()) L.error("model.merges", "must be an array");
    for (size_t i = 0; i < merges.size(); ++i) {
      const json& m = merges[i];
      std::string a, b;
      if (m.is_string()) {
        const std::string s = m.get<std::string>();
        const size_t sp = s.find(' ');
        if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
          L.error(fmt::format("model.merges[{}]", i), fmt::format("\"{}\" is not two tokens separated by a space", s));
        a = s.substr(0, sp);
        b = s.substr(sp + 1);
      } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
        a = m[0].get<std::string>();
        b = m[1].get<std::string>();
      } else {
        L.error(fmt::format("model.merges[{}]", i), "must be \"a b\" or [\"a\", \"b\"]");
      }
      const auto ia = symbol_ids.find(a), ib = symbol_ids.find(b), iab = symbol_ids.find(a + b);
      const std::string where = fmt::format("model.merges[{}] \"{} {}\"", i, a, b);
      if (ia == symbol_ids.end()) L.error(where, fmt::format("unknown token \"{}\"", a));
      if (ib == symbol_ids.end()) L.error(where, fmt::format("unknown token \"{}\"", b));
      if (iab == symbol_ids.end()) L.error(where, fmt::format("the merged token \"{}\" is not in model.vocab", a + b));
      t.bpe.add_merge(ia->second, ib->second, uint32_t(i), iab->second);
    }

    if (root.contains("normalizer") && !root["normalizer"].is_null())
      L.error("normalizer", fmt::format("type \"{}\" is not supported", Loader::type_of(root["normalizer"])));
    if (root.contains("pre_tokenizer")) L.pre_tokenizer(root["pre_tokenizer"], "pre_tokenizer");
    if (root.contains("decoder")) L.decoder(root["decoder"], "decoder");
    if (root.contains("post_processor")) L.post_processor(root["post_processor"], "post_processor");
  } catch (const json::exception& e) {
    fail("{}: unexpected structure: {}", origin, e.what());
  }
  if (t.bpe.token_count() == 0) L.error("model.vocab", "is empty");
  return TokenizerBuilder::make(std::move(impl));
}

}  // namespace mamba3
