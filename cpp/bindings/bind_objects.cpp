#include <sys/mman.h>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bind.hpp"
#include "boundary.hpp"
#include "mlx5tlp/devx_obj.hpp"
#include "mlx5tlp/umem.hpp"
#include "mlx5tlp/var.hpp"

namespace py = pybind11;

namespace mlx5tlp::bind {

py::bytes to_bytes(const std::vector<uint8_t>& v);

namespace {

template <typename T, typename Cls>
void bind_handle(Cls& cls) {
  using nogil = py::call_guard<py::gil_scoped_release>;
  cls.def("free", &T::free, nogil())
      .def("unimport", &T::unimport, nogil())
      .def("close", &T::close, nogil())
      .def_property_readonly("closed", &T::closed)
      .def_property_readonly("imported", &T::imported)
      .def_property_readonly("context", &T::context)
      .def("export_raw", [](const T& h) { return to_bytes(h.export_raw()); });
}

}  // namespace

void bind_objects(py::module_& m) {
  py::class_<MappingHold>(m, "MappingHold")
      .def("release", &MappingHold::release, "Uncount the mapping (idempotent).")
      .def_property_readonly("released", &MappingHold::released)
      .def("guard", [](MappingHold& h, const py::buffer& mapping, int prot) {
        // Only the address and length are taken; the buffer export ends with this call.
        void* addr = nullptr;
        size_t len = 0;
        {
          const py::buffer_info info = mapping.request();
          addr = info.ptr;
          len = size_t(info.size * info.itemsize);
        }
        return h.guard(addr, len, prot);
      }, py::arg("mapping"), py::arg("prot"),
           "Guard the outside mapping (an mmap) against SIGBUS (the software device's page only).")
      .def("unguard", &MappingHold::unguard, "Unregister the guard: before the munmap.")
      .def_property_readonly("lost", &MappingHold::lost);

  py::class_<Var, std::shared_ptr<Var>> var(m, "Var");
  bind_handle<Var>(var);
  var.def_static("alloc", &Var::alloc, py::arg("ctx"), py::arg("tlp"),
                 py::call_guard<py::gil_scoped_release>())
      .def_static("import_", [](std::shared_ptr<Context> ctx, py::handle raw, bool tlp) {
        const std::vector<uint8_t> s = copy_bytes(raw, "raw");
        py::gil_scoped_release r;
        return Var::import(std::move(ctx), s.data(), s.size(), tlp);
      }, py::arg("ctx"), py::arg("raw"), py::arg("tlp"))
      .def_property_readonly("page_id", &Var::page_id)
      .def_property_readonly("length", &Var::length)
      .def_property_readonly("mmap_off", [](const Var& v) { return int64_t(v.mmap_off()); })
      .def_property_readonly("is_tlp", &Var::is_tlp)
      .def_property_readonly("mappings", &Var::mappings)
      .def("hold_mapping", &Var::hold_mapping,
           "Count a mapping made outside the core (free() refuses while it is held).")
      .def("probe", &Var::probe, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("identity_checked", &Var::identity_checked,
                             "Whether import confirmed the live VAR behind the handle.");

  py::class_<Umem, std::shared_ptr<Umem>> umem(m, "Umem");
  bind_handle<Umem>(umem);
  // The memoryview passed in is kept alive by the returned Umem (keep_alive), which also keeps
  // its buffer export: a bytearray cannot be resized (moved) while registered. The façade
  // (mlx5tlp.Umem) owns that memoryview and releases it only after the dereg succeeded; a
  // caller of this private binding that releases the memoryview itself unpins the memory.
  umem.def_static("reg", [](std::shared_ptr<Context> ctx, py::handle buf, uint32_t access) {
        const BufferView v(buf, "buffer", Item::byte, Access::write);
        if (v.size() == 0) throw py::value_error("cannot register an empty buffer");
        void* ptr = v.mutable_data();
        const size_t size = v.size();
        py::gil_scoped_release r;
        return Umem::reg(std::move(ctx), ptr, size, access);
      }, py::arg("ctx"), py::arg("buffer"), py::arg("access"), py::keep_alive<0, 2>())
      .def_static("import_", [](std::shared_ptr<Context> ctx, py::handle raw) {
        const std::vector<uint8_t> s = copy_bytes(raw, "raw");
        py::gil_scoped_release r;
        return Umem::import(std::move(ctx), s.data(), s.size());
      }, py::arg("ctx"), py::arg("raw"))
      .def_property_readonly("umem_id", &Umem::umem_id)
      .def_property_readonly("size", &Umem::size);

  py::class_<DevxObj, std::shared_ptr<DevxObj>> obj(m, "DevxObj");
  bind_handle<DevxObj>(obj);
  obj.def_static("create", [](std::shared_ptr<Context> ctx, py::handle in, size_t outlen) {
        const std::vector<uint8_t> s = copy_bytes(in, "cmd_in");
        std::vector<uint8_t> out;
        std::shared_ptr<DevxObj> o;
        {
          py::gil_scoped_release r;
          o = DevxObj::create(std::move(ctx), s.data(), s.size(), outlen, &out);
        }
        return py::make_tuple(o, to_bytes(out));
      }, py::arg("ctx"), py::arg("cmd_in"), py::arg("out_len"))
      .def_static("import_", [](std::shared_ptr<Context> ctx, py::handle raw) {
        const std::vector<uint8_t> s = copy_bytes(raw, "raw");
        py::gil_scoped_release r;
        return DevxObj::import(std::move(ctx), s.data(), s.size());
      }, py::arg("ctx"), py::arg("raw"))
      .def("query", [](DevxObj& o, py::handle in, size_t outlen) {
        const std::vector<uint8_t> s = copy_bytes(in, "cmd_in");
        std::vector<uint8_t> out;
        {
          py::gil_scoped_release r;
          out = o.query(s.data(), s.size(), outlen);
        }
        return to_bytes(out);
      }, py::arg("cmd_in"), py::arg("out_len"))
      .def("modify", [](DevxObj& o, py::handle in, size_t outlen) {
        const std::vector<uint8_t> s = copy_bytes(in, "cmd_in");
        std::vector<uint8_t> out;
        {
          py::gil_scoped_release r;
          out = o.modify(s.data(), s.size(), outlen);
        }
        return to_bytes(out);
      }, py::arg("cmd_in"), py::arg("out_len"));
}

}  // namespace mlx5tlp::bind
