// Errors raised by native code carry a machine-readable code and numeric fields, so the
// TypeScript loader can turn them into typed errors without parsing messages.
#pragma once
#include <map>
#include <stdexcept>
#include <string>

namespace magix {

struct MagixError : std::runtime_error {
  std::string code;
  std::map<std::string, double> fields;
  std::map<std::string, std::string> texts;
  MagixError(std::string code_, const std::string& message) : std::runtime_error(message), code(std::move(code_)) {}
  MagixError& with(const std::string& k, double v) { fields[k] = v; return *this; }
  MagixError& with(const std::string& k, const std::string& v) { texts[k] = v; return *this; }
};

// An op was called with arguments that do not fit its buffers: a bug in the caller, never user data.
[[noreturn]] inline void invalid(const std::string& message) { throw MagixError("INVALID_ARGUMENT", message); }

inline void check(bool ok, const std::string& message) {
  if (!ok) invalid(message);
}

}  // namespace magix
