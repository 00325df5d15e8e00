// Run-time knobs that the timing scripts set through the environment
// (FLASH_EXT_FWD_TUNING, FLASH_EXT_BWD_TUNING, FLASH_EXT_DECODE_TUNING) or in
// the process (flash_ext._C._set_fwd_tuning, _set_bwd_tuning, _set_decode_tuning): "key=N,key=N,...", a
// bare key meaning N = 1. Host code only.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace flash_ext::cuda {

// Calls set(key, N) for each item of `spec` (variable: the knobs' name in
// errors). A value that is not a whole number >= 0, or a key set() does not
// take (it returns false), throws, naming the variable, the item and the
// keys in `known`.
template <class Set>
void parse_tuning_spec(const char* variable, const std::string& spec, const char* known, const Set& set) {
  std::istringstream items(spec);
  std::string item;
  while (std::getline(items, item, ',')) {
    const size_t eq = item.find('=');
    const std::string key = item.substr(0, eq);
    int64_t value = 1;
    if (eq != std::string::npos) {
      const std::string text = item.substr(eq + 1);
      size_t used = 0;
      value = -1;
      try {
        value = std::stoll(text, &used);
      } catch (const std::exception&) {
      }
      if (text.empty() || used != text.size() || value < 0) {
        throw std::invalid_argument(std::string("flash_ext: ") + variable + " wants key=N with N >= 0, got '" +
                                    item + "'");
      }
    }
    if (!set(key, value)) {
      throw std::invalid_argument(std::string("flash_ext: ") + variable + " has an unknown key '" + key +
                                  "' (known: " + known + ")");
    }
  }
}

// A Tuning struct of int64_t knobs from `spec` (the value of `variable`),
// each key naming one field (`knobs`: name and member); the struct's
// defaults for the rest.
template <class Tuning, size_t N>
Tuning tuning_from_spec(const char* variable, const std::string& spec,
                        const std::pair<const char*, int64_t Tuning::*> (&knobs)[N]) {
  std::string known;
  for (const auto& [name, field] : knobs) known += (known.empty() ? "" : ", ") + std::string(name);
  Tuning t;
  parse_tuning_spec(variable, spec, known.c_str(), [&](const std::string& key, int64_t n) {
    for (const auto& [name, field] : knobs) {
      if (key == name) {
        t.*field = n;
        return true;
      }
    }
    return false;
  });
  return t;
}

// The variable's value ("" when it is unset: every knob at its default).
inline std::string environment_spec(const char* variable) {
  const char* spec = std::getenv(variable);
  return spec == nullptr ? std::string() : std::string(spec);
}

// tuning_from_spec of the variable's value.
template <class Tuning, size_t N>
Tuning tuning_from_environment(const char* variable, const std::pair<const char*, int64_t Tuning::*> (&knobs)[N]) {
  return tuning_from_spec(variable, environment_spec(variable), knobs);
}

}  // namespace flash_ext::cuda
