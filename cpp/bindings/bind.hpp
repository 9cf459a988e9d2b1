// Bindings are split per concept; module.cpp calls each bind_* once.
#pragma once

#include <pybind11/pybind11.h>

#include "mlx5tlp/function_spec.hpp"

namespace mlx5tlp::bind {
void bind_errors(pybind11::module_& m);
void bind_loader(pybind11::module_& m);
void bind_tlp(pybind11::module_& m);
void bind_context(pybind11::module_& m);
void bind_objects(pybind11::module_& m);
void bind_sim(pybind11::module_& m);
void bind_gateway(pybind11::module_& m);
void bind_function(pybind11::module_& m);
void bind_engine(pybind11::module_& m);
void bind_envelope(pybind11::module_& m);
// The spec file format's dict (docs/function.md) as a FunctionSpec (bind_function.cpp).
pci::FunctionSpec spec_from_dict(const pybind11::dict& d);
}  // namespace mlx5tlp::bind
