// A small declarative option registry (gemma.cpp / marian style): every option is declared once, with a
// dotted key (`train.lr`), a type, a default, help text and an optional check. Everything else derives
// from that one declaration:
//   - loading a YAML file: nested maps flatten to dotted keys (`train: {lr: 1e-4}` == `train.lr: 1e-4`);
//     an unknown key is an error naming the file, the line and the closest known key;
//   - `key=value` overrides from the command line, with the same parsing and checks;
//   - the help table (`--help` of each subcommand, `sparsecl config list`);
//   - the resolved config as JSON / YAML, and its hash, written into every output.
//
// Values: a scalar given for a list option is split on commas, in a YAML file as on the command line
// (`methods: lora,orth` == `methods: [lora, orth]`); an override value starting with `[` is parsed as
// a YAML flow sequence. Booleans accept true/false, yes/no, on/off, 1/0.
//
// Hash: FNV-1a 64 over the canonical JSON (`to_json(false).dump()`: nested objects, keys sorted, no
// whitespace) of every option whose `hashed` flag is set, printed as 16 lower-case hex digits. Options
// that do not change what a run computes (the output directory) are declared `hashed = false`, so the
// same experiment has the same hash wherever it is written. Every option takes part, defaults included:
// changing a default changes the hashes of the configs that relied on it.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <variant>
#include <vector>

namespace sparsecl::config {

enum class Type { Bool, Int, Double, String, StringList, IntList };

// "bool", "int", "double", "string", "list<string>", "list<int>".
const char* type_name(Type t);

using StringList = std::vector<std::string>;
using IntList = std::vector<int64_t>;
using Value = std::variant<bool, int64_t, double, std::string, StringList, IntList>;

// A constraint on a value: `describe` is shown in the help table ("in (0, 1]", "one of a|b", ">= 0"); `check`
// returns "" when the value is acceptable and otherwise why not ("must be in (0, 1]"). Checks on scalars
// apply to every element of a list.
struct Check {
  std::string describe;
  std::function<std::string(const Value&)> check;
};

// Numeric ranges; `open_lo` / `open_hi` exclude the bound. For Int and Double options and list<int>.
Check range(double lo, double hi, bool open_lo = false, bool open_hi = false);
Check at_least(double lo);   // [lo, inf)
Check positive();            // (0, inf)
// Allowed strings, for String and list<string> options.
Check one_of(std::vector<std::string> allowed);

// What kind of filesystem path an option holds, for validate_paths (see schema.h).
enum class PathKind { None, File, Dir };

struct Option {
  std::string key;          // dotted: `section.name` or a top-level `name`
  Type type;
  Value default_value;
  std::string help;
  Check check{};            // empty: any value of the type
  PathKind path = PathKind::None;
  bool hashed = true;       // part of the config hash (false: e.g. the output directory)
};

// The registry: options in declaration order (the help table's order).
class Options {
 public:
  Options& add(Option o);  // throws sparsecl::Error on a duplicate key or a default that fails its check
  const Option* find(const std::string& key) const;  // nullptr if undeclared
  const Option& at(const std::string& key) const;    // throws (programming error) if undeclared
  const std::vector<Option>& all() const { return options_; }
  // The declared key closest to `key` (edit distance, with credit for a matching last segment).
  std::string closest(const std::string& key) const;
  // Help table: key, type, default, help (+ constraint), a blank line between sections. `sections`
  // restricts it to options whose first key segment is listed (top-level keys are their own section).
  std::string help(const std::vector<std::string>& sections = {}) const;

 private:
  std::vector<Option> options_;
  std::map<std::string, size_t> index_;
};

// A value rendered for humans / YAML: `0.0002`, `true`, `[a, b]`.
std::string format_value(const Value& v);

// One resolved configuration: a value for every declared option (its default until set).
class Config {
 public:
  explicit Config(const Options& schema);  // all defaults; `schema` must outlive the Config

  // Defaults, then the YAML file, then `key=value` overrides in order.
  static Config load(const Options& schema, const std::filesystem::path& yaml,
                     const std::vector<std::string>& overrides = {});

  // Merges a YAML file / YAML text over the current values. `name` appears in error messages.
  void merge_yaml_file(const std::filesystem::path& yaml);
  void merge_yaml(const std::string& text, const std::string& name);
  // Applies one `key=value` override (command line); errors name the whole argument.
  void apply_override(const std::string& assignment);
  void apply_overrides(const std::vector<std::string>& assignments);
  // Sets a value from code (e.g. a sweep's runner setting `train.seed`); checked like any other.
  void set(const std::string& key, Value value, const std::string& origin = "code");

  // Typed access: T is bool, int64_t, int, double, std::string, StringList, IntList or
  // std::vector<int>, matching the option's declared type. An undeclared key or a mismatched T is a
  // programming error (sparsecl::Error saying so).
  template <typename T>
  T get(const std::string& key) const;
  const Value& value(const std::string& key) const;
  // Where the value came from: "default", "FILE:LINE", "override", or set()'s origin.
  const std::string& origin(const std::string& key) const;

  // Nested JSON object of every option (`hashed_only`: just those in the hash).
  nlohmann::json to_json(bool hashed_only = false) const;
  // The same as YAML (loadable again by merge_yaml with the same result), preceded by a comment with
  // the hash.
  std::string to_yaml() const;
  // FNV-1a 64 of to_json(true).dump(), 16 hex digits (see the header comment).
  std::string hash() const;

  const Options& schema() const { return *schema_; }

 private:
  void assign(const Option& opt, Value v, const std::string& origin, const std::string& where);

  const Options* schema_;
  std::map<std::string, Value> values_;
  std::map<std::string, std::string> origins_;
};

// FNV-1a 64 of a byte string as 16 lower-case hex digits.
std::string fnv1a64_hex(const std::string& bytes);

}  // namespace sparsecl::config
