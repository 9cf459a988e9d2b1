// handover_ctl: the operator's request from a native program (mlx5tlp/handover_client.hpp).
//
//   handover_ctl CONTROL_PATH KEY_FILE ACTION [TIMEOUT_SECONDS]
//
// ACTION is handover, stop or status. Prints the primary's reply as one JSON object on stdout
// and exits 0; on failure prints {"error": <message>, "errno": <n>} and exits 1 (2 for usage).
// The key file is read like `mlx5tlp serve --key-file` reads it (surrounding whitespace
// stripped).
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>

#include "mlx5tlp/handover_client.hpp"

namespace json = mlx5tlp::json;

static std::string strip(std::string s) {
  const char* ws = " \t\n\r\f\v";
  const size_t b = s.find_first_not_of(ws);
  if (b == std::string::npos) return {};
  return s.substr(b, s.find_last_not_of(ws) - b + 1);
}

static std::string to_json(const json::Value& v) {
  switch (v.kind) {
    case json::Value::Kind::null: return "null";
    case json::Value::Kind::boolean: return v.boolean ? "true" : "false";
    case json::Value::Kind::integer: return std::to_string(v.integer);
    case json::Value::Kind::real: {
      char buf[32];
      std::snprintf(buf, sizeof buf, "%.17g", v.real);
      return buf;
    }
    case json::Value::Kind::string: return json::quote(v.string);
  }
  return "null";
}

int main(int argc, char** argv) {
  if (argc < 4 || argc > 5) {
    std::fprintf(stderr, "usage: %s CONTROL_PATH KEY_FILE handover|stop|status [TIMEOUT_S]\n",
                 argv[0]);
    return 2;
  }
  std::ifstream f(argv[2], std::ios::binary);
  if (!f) {
    std::fprintf(stderr, "cannot read key file %s\n", argv[2]);
    return 2;
  }
  const std::string key = strip({std::istreambuf_iterator<char>(f), {}});
  const double timeout = argc == 5 ? std::strtod(argv[4], nullptr) : 10.0;
  try {
    const auto reply = mlx5tlp::handover::request(argv[1], key, argv[3],
                                                  mlx5tlp::Deadline::in_seconds(timeout));
    std::string out = "{";
    for (const auto& [name, value] : reply.fields)
      out += (out.size() > 1 ? "," : "") + json::quote(name) + ":" + to_json(value);
    std::printf("%s}\n", out.c_str());
    return 0;
  } catch (const mlx5tlp::Error& e) {
    std::printf("{\"error\":%s,\"errno\":%d}\n", json::quote(e.what()).c_str(),
                e.error_number());
    return 1;
  }
}
