// The option registry and resolved configs (see include/sparsecl/config/options.h): parsing of YAML
// files and `key=value` overrides against the declarations, the checks, the help table, the JSON / YAML
// dumps and the FNV-1a hash. Errors are sparsecl::Error naming the source (file:line or the override),
// the key, the value and what was expected.
#include "sparsecl/config/options.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <optional>
#include <sstream>

#include "sparsecl/common/error.h"

namespace sparsecl::config {

namespace {

bool is_list(Type t) { return t == Type::StringList || t == Type::IntList; }
Type element_type(Type t) { return t == Type::IntList ? Type::Int : t == Type::StringList ? Type::String : t; }

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(" \t\r\n") - b + 1);
}

std::string last_segment(const std::string& key) {
  const auto dot = key.rfind('.');
  return dot == std::string::npos ? key : key.substr(dot + 1);
}

std::string first_segment(const std::string& key) { return key.substr(0, key.find('.')); }

size_t levenshtein(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

// One scalar of type t (Bool, Int, Double, String) from its text, or nothing if it does not parse.
std::optional<Value> parse_scalar(Type t, const std::string& raw) {
  const std::string s = t == Type::String ? raw : trim(raw);
  switch (t) {
    case Type::Bool: {
      std::string l = s;
      std::transform(l.begin(), l.end(), l.begin(), [](unsigned char c) { return std::tolower(c); });
      if (l == "true" || l == "yes" || l == "on" || l == "1") return Value{true};
      if (l == "false" || l == "no" || l == "off" || l == "0") return Value{false};
      return std::nullopt;
    }
    case Type::Int: {
      int64_t v = 0;
      const char* b = s.data() + (s.starts_with('+') ? 1 : 0);
      const auto [end, ec] = std::from_chars(b, s.data() + s.size(), v);
      if (s.empty() || ec != std::errc() || end != s.data() + s.size()) return std::nullopt;
      return Value{v};
    }
    case Type::Double: {
      double v = 0;
      const char* b = s.data() + (s.starts_with('+') ? 1 : 0);
      const auto [end, ec] = std::from_chars(b, s.data() + s.size(), v);
      if (s.empty() || ec != std::errc() || end != s.data() + s.size() || !std::isfinite(v)) return std::nullopt;
      return Value{v};
    }
    case Type::String: return Value{s};
    default: return std::nullopt;
  }
}

[[noreturn]] void type_error(const std::string& where, const Option& opt, const std::string& got) {
  throw Error(where + opt.key + ": expected " + type_name(opt.type) + ", got " + got);
}

// Appends one parsed list element to a StringList / IntList value.
void push_element(Value& list, const Value& e) {
  if (auto* l = std::get_if<StringList>(&list)) l->push_back(std::get<std::string>(e));
  else std::get<IntList>(list).push_back(std::get<int64_t>(e));
}

Value empty_list(Type t) { return t == Type::IntList ? Value{IntList{}} : Value{StringList{}}; }

Value from_node(const Option& opt, const YAML::Node& node, const std::string& where);

// A value from command-line / scalar text: lists split on commas, or a YAML flow sequence `[a, b]`.
Value from_text(const Option& opt, const std::string& text, const std::string& where) {
  if (!is_list(opt.type)) {
    if (auto v = parse_scalar(opt.type, text)) return *v;
    type_error(where, opt, "'" + text + "'");
  }
  const std::string t = trim(text);
  if (t.starts_with('[')) {
    YAML::Node node;
    try {
      node = YAML::Load(t);
    } catch (const YAML::Exception&) {
      type_error(where, opt, "'" + text + "' (not a valid [a, b] list)");
    }
    return from_node(opt, node, where);
  }
  Value list = empty_list(opt.type);
  if (t.empty()) return list;
  std::stringstream ss(t);
  for (std::string item; std::getline(ss, item, ',');) {
    auto e = parse_scalar(element_type(opt.type), trim(item));
    if (!e) type_error(where, opt, "'" + trim(item) + "' in '" + text + "'");
    push_element(list, *e);
  }
  return list;
}

Value from_node(const Option& opt, const YAML::Node& node, const std::string& where) {
  if (node.IsNull()) {
    if (is_list(opt.type)) return empty_list(opt.type);
    type_error(where, opt, "no value");
  }
  if (node.IsMap()) type_error(where, opt, "a map");
  if (node.IsScalar()) return from_text(opt, node.Scalar(), where);
  if (!is_list(opt.type)) type_error(where, opt, "a list");
  Value list = empty_list(opt.type);
  for (const auto& item : node) {
    if (!item.IsScalar()) type_error(where, opt, "a list with a non-scalar element");
    auto e = parse_scalar(element_type(opt.type), item.Scalar());
    if (!e) type_error(where, opt, "'" + item.Scalar() + "' in the list");
    push_element(list, *e);
  }
  return list;
}

bool same_type(const Value& v, Type t) {
  switch (t) {
    case Type::Bool: return std::holds_alternative<bool>(v);
    case Type::Int: return std::holds_alternative<int64_t>(v);
    case Type::Double: return std::holds_alternative<double>(v);
    case Type::String: return std::holds_alternative<std::string>(v);
    case Type::StringList: return std::holds_alternative<StringList>(v);
    case Type::IntList: return std::holds_alternative<IntList>(v);
  }
  return false;
}

nlohmann::json value_json(const Value& v) {
  return std::visit([](const auto& x) { return nlohmann::json(x); }, v);
}

std::string fmt_double(double d) { return nlohmann::json(d).dump(); }  // shortest round-trip form

// A bound as people write it: `1`, not `1.0`.
std::string fmt_bound(double x) {
  if (x == std::floor(x) && std::fabs(x) < 1e15) return std::to_string(static_cast<long long>(x));
  return fmt_double(x);
}

std::string bound_text(double lo, double hi, bool open_lo, bool open_hi) {
  if (std::isinf(hi)) return (open_lo ? "> " : ">= ") + fmt_bound(lo);
  return std::string(open_lo ? "in (" : "in [") + fmt_bound(lo) + ", " + fmt_bound(hi) + (open_hi ? ")" : "]");
}

// `train.lr` -> JSON pointer `/train/lr`.
std::string pointer(const std::string& key) {
  std::string p = "/";
  for (char c : key) p += c == '.' ? '/' : c;
  return p;
}

// The YAML rendering of one JSON leaf: JSON scalars and flow arrays are valid YAML.
std::string yaml_leaf(const nlohmann::ordered_json& j) {
  if (!j.is_array()) return j.dump();
  std::string s = "[";
  for (size_t i = 0; i < j.size(); ++i) s += (i ? ", " : "") + j[i].dump();
  return s + "]";
}

void emit_yaml(const nlohmann::ordered_json& obj, int indent, std::string& out) {
  for (const auto& [k, v] : obj.items()) {
    out += std::string(indent, ' ') + k + ":";
    if (v.is_object()) {
      out += "\n";
      emit_yaml(v, indent + 2, out);
    } else {
      out += " " + yaml_leaf(v) + "\n";
    }
  }
}

}  // namespace

const char* type_name(Type t) {
  switch (t) {
    case Type::Bool: return "bool";
    case Type::Int: return "int";
    case Type::Double: return "double";
    case Type::String: return "string";
    case Type::StringList: return "list<string>";
    case Type::IntList: return "list<int>";
  }
  return "?";
}

// ---- checks ---------------------------------------------------------------------------------------

Check range(double lo, double hi, bool open_lo, bool open_hi) {
  const std::string text = bound_text(lo, hi, open_lo, open_hi);
  auto ok = [=](double x) { return (open_lo ? x > lo : x >= lo) && (open_hi ? x < hi : x <= hi); };
  return {text, [=](const Value& v) -> std::string {
            std::vector<double> xs;
            if (auto* d = std::get_if<double>(&v)) xs.push_back(*d);
            if (auto* i = std::get_if<int64_t>(&v)) xs.push_back(static_cast<double>(*i));
            if (auto* l = std::get_if<IntList>(&v)) for (int64_t i : *l) xs.push_back(static_cast<double>(i));
            for (double x : xs)
              if (!ok(x)) return "must be " + text;
            return "";
          }};
}

Check at_least(double lo) { return range(lo, std::numeric_limits<double>::infinity()); }
Check positive() { return range(0, std::numeric_limits<double>::infinity(), true, true); }

Check one_of(std::vector<std::string> allowed) {
  std::string text;
  for (const auto& a : allowed) text += (text.empty() ? "" : "|") + a;
  return {"one of " + text, [=](const Value& v) -> std::string {
            StringList xs;
            if (auto* s = std::get_if<std::string>(&v)) xs.push_back(*s);
            if (auto* l = std::get_if<StringList>(&v)) xs = *l;
            for (const auto& x : xs)
              if (std::find(allowed.begin(), allowed.end(), x) == allowed.end())
                return "'" + x + "' is not one of " + text;
            return "";
          }};
}

// ---- registry -------------------------------------------------------------------------------------

Options& Options::add(Option o) {
  if (index_.count(o.key)) throw Error("config schema: option '" + o.key + "' is declared twice");
  for (const auto& other : options_)  // a key is a leaf: never also a section (`a` and `a.b`)
    if (other.key.starts_with(o.key + ".") || o.key.starts_with(other.key + "."))
      throw Error("config schema: '" + o.key + "' and '" + other.key + "' are both keys and a section");
  if (!same_type(o.default_value, o.type))
    throw Error("config schema: default of '" + o.key + "' is not of type " + type_name(o.type));
  if (o.check.check) {
    const std::string why = o.check.check(o.default_value);
    if (!why.empty()) throw Error("config schema: default of '" + o.key + "' " + why);
  }
  index_[o.key] = options_.size();
  options_.push_back(std::move(o));
  return *this;
}

const Option* Options::find(const std::string& key) const {
  const auto it = index_.find(key);
  return it == index_.end() ? nullptr : &options_[it->second];
}

const Option& Options::at(const std::string& key) const {
  if (const Option* o = find(key)) return *o;
  throw Error("config: option '" + key + "' is not declared in the schema (programming error; closest: '" +
              closest(key) + "')");
}

std::string Options::closest(const std::string& key) const {
  std::string best;
  std::pair<size_t, size_t> best_score{SIZE_MAX, SIZE_MAX};
  for (const auto& o : options_) {
    const size_t full = levenshtein(key, o.key);
    const size_t tail = levenshtein(last_segment(key), last_segment(o.key)) + 1;
    const std::pair<size_t, size_t> score{std::min(full, tail), full};
    if (score < best_score) best_score = score, best = o.key;
  }
  return best;
}

std::string format_value(const Value& v) {
  if (auto* b = std::get_if<bool>(&v)) return *b ? "true" : "false";
  if (auto* i = std::get_if<int64_t>(&v)) return std::to_string(*i);
  if (auto* d = std::get_if<double>(&v)) return fmt_double(*d);
  if (auto* s = std::get_if<std::string>(&v)) return s->empty() ? "\"\"" : *s;
  std::string out = "[";
  if (auto* l = std::get_if<StringList>(&v))
    for (size_t i = 0; i < l->size(); ++i) out += (i ? ", " : "") + (*l)[i];
  if (auto* l = std::get_if<IntList>(&v))
    for (size_t i = 0; i < l->size(); ++i) out += (i ? ", " : "") + std::to_string((*l)[i]);
  return out + "]";
}

std::string Options::help(const std::vector<std::string>& sections) const {
  std::vector<const Option*> shown;
  for (const auto& o : options_)
    if (sections.empty() || std::find(sections.begin(), sections.end(), first_segment(o.key)) != sections.end())
      shown.push_back(&o);
  constexpr size_t kMaxDefault = 26;  // a longer default pushes its help onto the next line
  size_t wk = 3, wt = 4, wd = 7;
  for (const Option* o : shown) {
    wk = std::max(wk, o->key.size());
    wt = std::max(wt, std::string(type_name(o->type)).size());
    wd = std::max(wd, std::min(kMaxDefault, format_value(o->default_value).size()));
  }
  auto pad = [](std::string s, size_t w) { return s.size() < w ? s + std::string(w - s.size(), ' ') : s; };
  std::string out = pad("key", wk) + "  " + pad("type", wt) + "  " + pad("default", wd) + "  help\n";
  std::string section;
  for (const Option* o : shown) {
    const std::string sec = o->key.find('.') == std::string::npos ? "" : first_segment(o->key);
    if (o != shown.front() && sec != section) out += "\n";
    section = sec;
    std::string def = format_value(o->default_value);
    std::string help = o->help + (o->check.describe.empty() ? "" : "; " + o->check.describe);
    std::string line = pad(o->key, wk) + "  " + pad(type_name(o->type), wt) + "  ";
    if (def.size() > wd) line += def + "\n" + std::string(wk + wt + wd + 6, ' ') + help;
    else line += pad(def, wd) + "  " + help;
    out += line + "\n";
  }
  return out;
}

// ---- resolved configs -----------------------------------------------------------------------------

Config::Config(const Options& schema) : schema_(&schema) {
  for (const auto& o : schema.all()) {
    values_[o.key] = o.default_value;
    origins_[o.key] = "default";
  }
}

Config Config::load(const Options& schema, const std::filesystem::path& yaml, const std::vector<std::string>& overrides) {
  Config cfg(schema);
  cfg.merge_yaml_file(yaml);
  cfg.apply_overrides(overrides);
  return cfg;
}

void Config::assign(const Option& opt, Value v, const std::string& origin, const std::string& where) {
  if (opt.check.check) {
    const std::string why = opt.check.check(v);
    if (!why.empty()) throw Error(where + opt.key + " = " + format_value(v) + ": " + why);
  }
  values_[opt.key] = std::move(v);
  origins_[opt.key] = origin;
}

void Config::merge_yaml_file(const std::filesystem::path& yaml) {
  std::ifstream in(yaml, std::ios::binary);
  if (!in) throw Error("config file '" + yaml.string() + "' cannot be read");
  std::stringstream text;
  text << in.rdbuf();
  merge_yaml(text.str(), yaml.string());
}

void Config::merge_yaml(const std::string& text, const std::string& name) {
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    throw Error(name + ":" + std::to_string(e.mark.line + 1) + ": YAML syntax error: " + e.msg);
  }
  if (root.IsNull()) return;
  if (!root.IsMap()) throw Error(name + ": the top level must be a map of option keys");
  std::map<std::string, int> seen;  // key -> line where this file set it
  std::function<void(const YAML::Node&, const std::string&)> walk = [&](const YAML::Node& map, const std::string& prefix) {
    for (const auto& kv : map) {
      const std::string key = prefix + kv.first.as<std::string>();
      const int line = kv.first.Mark().line + 1;
      const std::string where = name + ":" + std::to_string(line) + ": ";
      const Option* opt = schema_->find(key);
      if (!opt && kv.second.IsMap()) {  // a section: its keys continue the dotted path
        walk(kv.second, key + ".");
        continue;
      }
      if (!opt) throw Error(where + "unknown key '" + key + "' (did you mean '" + schema_->closest(key) + "'?)");
      if (auto it = seen.find(key); it != seen.end())
        throw Error(where + "key '" + key + "' is set twice (first at line " + std::to_string(it->second) + ")");
      seen[key] = line;
      assign(*opt, from_node(*opt, kv.second, where), name + ":" + std::to_string(line), where);
    }
  };
  walk(root, "");
}

void Config::apply_override(const std::string& assignment) {
  const std::string where = "override '" + assignment + "': ";
  const auto eq = assignment.find('=');
  if (eq == std::string::npos) throw Error(where + "expected key=value");
  const std::string key = trim(assignment.substr(0, eq));
  const Option* opt = schema_->find(key);
  if (!opt) throw Error(where + "unknown key '" + key + "' (did you mean '" + schema_->closest(key) + "'?)");
  assign(*opt, from_text(*opt, assignment.substr(eq + 1), where), "override", where);
}

void Config::apply_overrides(const std::vector<std::string>& assignments) {
  for (const auto& a : assignments) apply_override(a);
}

void Config::set(const std::string& key, Value value, const std::string& origin) {
  const Option& opt = schema_->at(key);
  if (opt.type == Type::Double && std::holds_alternative<int64_t>(value))
    value = static_cast<double>(std::get<int64_t>(value));
  if (!same_type(value, opt.type))
    throw Error("config: set('" + key + "') with a value that is not " + type_name(opt.type) + " (programming error)");
  assign(opt, std::move(value), origin, "set(): ");
}

const Value& Config::value(const std::string& key) const { return values_.at(schema_->at(key).key); }

const std::string& Config::origin(const std::string& key) const { return origins_.at(schema_->at(key).key); }

template <typename T>
T Config::get(const std::string& key) const {
  const Value& v = value(key);
  auto mismatch = [&]() -> Error {
    return Error("config: option '" + key + "' is " + type_name(schema_->at(key).type) +
                 ", read with the wrong C++ type (programming error)");
  };
  if constexpr (std::is_same_v<T, int>) {
    const auto* i = std::get_if<int64_t>(&v);
    if (!i) throw mismatch();
    if (*i < std::numeric_limits<int>::min() || *i > std::numeric_limits<int>::max())
      throw Error("config: " + key + " = " + std::to_string(*i) + " does not fit an int");
    return static_cast<int>(*i);
  } else if constexpr (std::is_same_v<T, std::vector<int>>) {
    const auto* l = std::get_if<IntList>(&v);
    if (!l) throw mismatch();
    std::vector<int> out;
    for (int64_t i : *l) {
      if (i < std::numeric_limits<int>::min() || i > std::numeric_limits<int>::max())
        throw Error("config: " + key + " element " + std::to_string(i) + " does not fit an int");
      out.push_back(static_cast<int>(i));
    }
    return out;
  } else {
    const auto* p = std::get_if<T>(&v);
    if (!p) throw mismatch();
    return *p;
  }
}

template bool Config::get<bool>(const std::string&) const;
template int64_t Config::get<int64_t>(const std::string&) const;
template int Config::get<int>(const std::string&) const;
template double Config::get<double>(const std::string&) const;
template std::string Config::get<std::string>(const std::string&) const;
template StringList Config::get<StringList>(const std::string&) const;
template IntList Config::get<IntList>(const std::string&) const;
template std::vector<int> Config::get<std::vector<int>>(const std::string&) const;

nlohmann::json Config::to_json(bool hashed_only) const {
  nlohmann::json j = nlohmann::json::object();
  for (const auto& o : schema_->all())
    if (!hashed_only || o.hashed) j[nlohmann::json::json_pointer(pointer(o.key))] = value_json(values_.at(o.key));
  return j;
}

std::string Config::to_yaml() const {
  nlohmann::ordered_json tree = nlohmann::ordered_json::object();  // declaration order
  for (const auto& o : schema_->all())
    tree[nlohmann::ordered_json::json_pointer(pointer(o.key))] = value_json(values_.at(o.key));
  std::string out = "# sparsecl resolved config, hash " + hash() + "\n";
  emit_yaml(tree, 0, out);
  return out;
}

std::string fnv1a64_hex(const std::string& bytes) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 0x100000001b3ULL;
  }
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

std::string Config::hash() const { return fnv1a64_hex(to_json(true).dump()); }

}  // namespace sparsecl::config
