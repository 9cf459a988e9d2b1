"""
PCIe function model (private: use mlx5tlp.function)
"""
from __future__ import annotations
import typing
__all__: list[str] = ['Function', 'STATE_SIZE', 'STATE_VERSION']
class Function:
    def __init__(self, spec: dict, state: typing.Any = None, adopt: bool = False) -> None:
        ...
    def bar_base(self, bar: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
    def clear_msix_pending(self, vector: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def completion_timeout(self) -> tuple[bool, int, int]:
        """
        (disabled, min_us, max_us)
        """
    def config_bytes(self) -> bytes:
        ...
    def config_read(self, dw_offset: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
    def config_write(self, dw_offset: typing.SupportsInt | typing.SupportsIndex, value: typing.SupportsInt | typing.SupportsIndex, byte_enables: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def decode_io(self, address: typing.SupportsInt | typing.SupportsIndex, length: typing.SupportsInt | typing.SupportsIndex) -> tuple[str, int, int]:
        ...
    def decode_memory(self, address: typing.SupportsInt | typing.SupportsIndex, length: typing.SupportsInt | typing.SupportsIndex) -> tuple[str, int, int]:
        """
        (status, bar, offset); bar 6 = Expansion ROM
        """
    def device_write(self, offset: typing.SupportsInt | typing.SupportsIndex, width: typing.SupportsInt | typing.SupportsIndex, value: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def layout(self) -> dict:
        """
        capability offsets (0: absent) and the spec digest
        """
    def msix_hit(self, bar: typing.SupportsInt | typing.SupportsIndex, offset: typing.SupportsInt | typing.SupportsIndex, length: typing.SupportsInt | typing.SupportsIndex) -> tuple[str, int]:
        ...
    def msix_pending(self, vector: typing.SupportsInt | typing.SupportsIndex) -> bool:
        ...
    def msix_read(self, bar: typing.SupportsInt | typing.SupportsIndex, offset: typing.SupportsInt | typing.SupportsIndex, length: typing.SupportsInt | typing.SupportsIndex) -> tuple[str, bytes]:
        ...
    def msix_write(self, bar: typing.SupportsInt | typing.SupportsIndex, offset: typing.SupportsInt | typing.SupportsIndex, data: typing.Any, first_be: typing.SupportsInt | typing.SupportsIndex, last_be: typing.SupportsInt | typing.SupportsIndex) -> str:
        ...
    def raise_msix(self, vector: typing.SupportsInt | typing.SupportsIndex) -> str:
        ...
    def reset(self) -> None:
        ...
    def restore(self, snapshot: typing.Any) -> None:
        ...
    def snapshot(self) -> bytes:
        ...
    def take_interrupts(self) -> list[tuple[int, int]]:
        """
        messages delivered since the last call: [(address, data)]
        """
    def template(self) -> tuple[bytes, bytes, bytes, bytes]:
        """
        (reset image, wmask, w1cmask, cmask), 4096 bytes each
        """
    @property
    def bus_master(self) -> bool:
        ...
    @property
    def interrupts_dropped(self) -> int:
        ...
    @property
    def io_enabled(self) -> bool:
        ...
    @property
    def max_payload_size(self) -> int:
        ...
    @property
    def max_read_request_size(self) -> int:
        ...
    @property
    def memory_enabled(self) -> bool:
        ...
    @property
    def messages_sent(self) -> int:
        ...
    @property
    def power_state(self) -> int:
        ...
    @property
    def read_completion_boundary(self) -> int:
        ...
STATE_SIZE: int = 37152
STATE_VERSION: int = 1
