"""
mlx5tlp C++ core (private: use the mlx5tlp package)
"""
from __future__ import annotations
import typing
import typing_extensions
from . import tlp
from . import sim
from . import function
from . import engine
__all__: list[str] = ['Context', 'DevxObj', 'Gateway', 'MappingHold', 'Umem', 'Var', 'engine', 'envelope_accept', 'format_guid', 'function', 'library_info', 'list_devices', 'resolve_backend', 'sim', 'symbol_version', 'tlp']
class Context:
    @staticmethod
    def import_fd(fd: typing.SupportsInt | typing.SupportsIndex, backend: str) -> Context:
        ...
    @staticmethod
    def open(name: str, backend: str) -> Context:
        ...
    def close(self) -> None:
        ...
    def export_size(self, kind: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
    def general_cmd(self, cmd_in: typing.Any, out_len: typing.SupportsInt | typing.SupportsIndex) -> bytes:
        ...
    def open_children(self) -> int:
        ...
    def query_tlp_caps(self) -> tuple[bool, int, int, int, int]:
        ...
    @property
    def backend(self) -> str:
        ...
    @property
    def closed(self) -> bool:
        ...
    @property
    def cmd_fd(self) -> int:
        ...
    @property
    def imported(self) -> bool:
        ...
    @property
    def name(self) -> str:
        ...
    @property
    def node_guid(self) -> int:
        ...
    @property
    def rdma_core_version(self) -> str:
        ...
class MappingHold:
    def guard(self, mapping: typing_extensions.Buffer, prot: typing.SupportsInt | typing.SupportsIndex) -> bool:
        """
        Guard the outside mapping (an mmap) against SIGBUS (the software device's page only).
        """
    def release(self) -> None:
        """
        Uncount the mapping (idempotent).
        """
    def unguard(self) -> None:
        """
        Unregister the guard: before the munmap.
        """
    @property
    def lost(self) -> bool:
        ...
    @property
    def released(self) -> bool:
        ...
class Var:
    @staticmethod
    def alloc(ctx: Context, tlp: bool) -> Var:
        ...
    @staticmethod
    def import_(ctx: Context, raw: typing.Any, tlp: bool) -> Var:
        ...
    def close(self) -> None:
        ...
    def export_raw(self) -> bytes:
        ...
    def free(self) -> None:
        ...
    def hold_mapping(self) -> MappingHold:
        """
        Count a mapping made outside the core (free() refuses while it is held).
        """
    def probe(self) -> bool:
        ...
    def unimport(self) -> None:
        ...
    @property
    def closed(self) -> bool:
        ...
    @property
    def context(self) -> Context:
        ...
    @property
    def identity_checked(self) -> bool:
        """
        Whether import confirmed the live VAR behind the handle.
        """
    @property
    def imported(self) -> bool:
        ...
    @property
    def is_tlp(self) -> bool:
        ...
    @property
    def length(self) -> int:
        ...
    @property
    def mappings(self) -> int:
        ...
    @property
    def mmap_off(self) -> int:
        ...
    @property
    def page_id(self) -> int:
        ...
class Umem:
    @staticmethod
    def import_(ctx: Context, raw: typing.Any) -> Umem:
        ...
    @staticmethod
    def reg(ctx: Context, buffer: typing.Any, access: typing.SupportsInt | typing.SupportsIndex) -> Umem:
        ...
    def close(self) -> None:
        ...
    def export_raw(self) -> bytes:
        ...
    def free(self) -> None:
        ...
    def unimport(self) -> None:
        ...
    @property
    def closed(self) -> bool:
        ...
    @property
    def context(self) -> Context:
        ...
    @property
    def imported(self) -> bool:
        ...
    @property
    def size(self) -> int:
        ...
    @property
    def umem_id(self) -> int:
        ...
class DevxObj:
    @staticmethod
    def create(ctx: Context, cmd_in: typing.Any, out_len: typing.SupportsInt | typing.SupportsIndex) -> tuple[DevxObj, bytes]:
        ...
    @staticmethod
    def import_(ctx: Context, raw: typing.Any) -> DevxObj:
        ...
    def close(self) -> None:
        ...
    def export_raw(self) -> bytes:
        ...
    def free(self) -> None:
        ...
    def modify(self, cmd_in: typing.Any, out_len: typing.SupportsInt | typing.SupportsIndex) -> bytes:
        ...
    def query(self, cmd_in: typing.Any, out_len: typing.SupportsInt | typing.SupportsIndex) -> bytes:
        ...
    def unimport(self) -> None:
        ...
    @property
    def closed(self) -> bool:
        ...
    @property
    def context(self) -> Context:
        ...
    @property
    def imported(self) -> bool:
        ...
class Gateway:
    @staticmethod
    def open(var: Var, layout: str, direct: bool, ring_slots: typing.SupportsInt | typing.SupportsIndex, batch_max: typing.SupportsInt | typing.SupportsIndex, drain_timeout: typing.Any) -> Gateway:
        ...
    def close(self, drain_timeout: typing.Any = None) -> None:
        ...
    def flush(self, timeout: typing.Any) -> bool:
        ...
    def post(self, record: typing.Any, timeout: typing.Any) -> bool:
        ...
    def post_batch(self, data: typing.Any, offsets: typing.Any, timeout: typing.Any) -> int:
        ...
    def post_completions(self, requests: typing.Any, data: typing.Any, statuses: typing.Any, completer_id: typing.SupportsInt | typing.SupportsIndex, max_payload: typing.SupportsInt | typing.SupportsIndex, rcb: typing.SupportsInt | typing.SupportsIndex, status: typing.SupportsInt | typing.SupportsIndex, timeout: typing.Any, skip_bad: bool) -> tuple:
        ...
    def stats(self) -> dict:
        ...
    def write(self, record: typing.Any, timeout: typing.Any) -> bool:
        ...
    def write_batch(self, data: typing.Any, offsets: typing.Any, timeout: typing.Any, whole: bool = False) -> int:
        ...
    @property
    def closed(self) -> bool:
        ...
    @property
    def direct(self) -> bool:
        ...
    @property
    def layout(self) -> str:
        ...
    @property
    def max_record(self) -> int:
        ...
    @property
    def page_prot(self) -> int:
        ...
    @property
    def state(self) -> str:
        ...
    @property
    def store_path(self) -> str:
        ...
    @property
    def var(self) -> Var:
        ...
def _raise_for_test(arg0: typing.SupportsInt | typing.SupportsIndex, arg1: typing.SupportsInt | typing.SupportsIndex, arg2: str) -> None:
    """
    Raise a core error of the given kind (tests of the error mapping).
    """
def _throw_for_test(what: str) -> None:
    """
    Throw a C++ exception of the named family (tests of the one error model).
    """
def envelope_accept(blob: typing.Any, expected_kind: typing.SupportsInt | typing.SupportsIndex, raw_size: typing.SupportsInt | typing.SupportsIndex, name: bytes, node_guid: typing.SupportsInt | typing.SupportsIndex, backend: bytes, version: bytes) -> typing.Any:
    """
    (flags, raw) of an unkeyed envelope that passes every check of open_envelope, else None.
    """
def format_guid(guid: typing.SupportsInt | typing.SupportsIndex) -> str:
    ...
def library_info(backend: str) -> dict:
    """
    Load the backend's library (once) and describe it.
    """
def list_devices(backend: str) -> list:
    """
    [(name, node_guid, is_mlx5)] for every device of the backend.
    """
def resolve_backend(name: str | None = None) -> str:
    """
    Backend name from the argument, $MLX5TLP_BACKEND or 'rdma'.
    """
def symbol_version(function: str) -> str:
    ...
