// Bindings are split per concept; module.cpp calls each bind_* once.
#pragma once

#include <pybind11/pybind11.h>

namespace mlx5tlp::bind {
void bind_errors(pybind11::module_& m);
void bind_loader(pybind11::module_& m);
void bind_tlp(pybind11::module_& m);
void bind_context(pybind11::module_& m);
void bind_objects(pybind11::module_& m);
void bind_sim(pybind11::module_& m);
void bind_gateway(pybind11::module_& m);
void bind_function(pybind11::module_& m);
}  // namespace mlx5tlp::bind
