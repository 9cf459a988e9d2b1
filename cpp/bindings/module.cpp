#include "bind.hpp"

PYBIND11_MODULE(_core, m) {
  m.doc() = "mlx5tlp C++ core (private: use the mlx5tlp package)";
  mlx5tlp::bind::bind_errors(m);
  mlx5tlp::bind::bind_loader(m);
  mlx5tlp::bind::bind_tlp(m);
  mlx5tlp::bind::bind_context(m);
  mlx5tlp::bind::bind_objects(m);
  mlx5tlp::bind::bind_sim(m);
  mlx5tlp::bind::bind_gateway(m);
  mlx5tlp::bind::bind_function(m);
  mlx5tlp::bind::bind_engine(m);
  mlx5tlp::bind::bind_envelope(m);
}
