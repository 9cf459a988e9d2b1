"""
PCIe TLP codec (private: use mlx5tlp.tlp)
"""
from __future__ import annotations
import typing
__all__: list[str] = ['FIELDS', 'KINDS', 'MAX_COMPLETIONS', 'REASONS', 'STATUS_NAMES', 'build_bulk', 'completions', 'decode', 'encode']
def build_bulk(requests: typing.Any, data: typing.Any, statuses: typing.Any, completer_id: typing.SupportsInt | typing.SupportsIndex, max_payload: typing.SupportsInt | typing.SupportsIndex, rcb: typing.SupportsInt | typing.SupportsIndex, status: typing.SupportsInt | typing.SupportsIndex) -> tuple:
    """
    (status, buffer, offsets u32, request_first u32, errors u8) for concatenated requests.
    """
def completions(request: tuple, data: typing.Any, completer_id: typing.SupportsInt | typing.SupportsIndex, max_payload: typing.SupportsInt | typing.SupportsIndex, rcb: typing.SupportsInt | typing.SupportsIndex, status: typing.SupportsInt | typing.SupportsIndex) -> tuple:
    """
    (status, [fields] | None): completions for a request.
    """
def decode(buf: typing.Any) -> tuple:
    """
    (status, fields | None) for exactly one TLP in buf.
    """
def encode(fields: tuple, auto_format: bool) -> tuple:
    """
    (status, bytes | None); auto_format picks Fmt/Type from kind and address.
    """
FIELDS: tuple = ('kind', 'fmt', 'type', 'tc', 'attr', 'td', 'ep', 'length', 'requester_id', 'completer_id', 'tag', 'first_be', 'last_be', 'address', 'dest_id', 'status', 'bcm', 'byte_count', 'lower_address', 'message_code', 'routing', 'digest', 'data')
KINDS: tuple = ('MRd', 'MRdLk', 'MWr', 'IORd', 'IOWr', 'CfgRd0', 'CfgWr0', 'CfgRd1', 'CfgWr1', 'Cpl', 'CplD', 'CplLk', 'CplDLk', 'Msg', 'MsgD')
MAX_COMPLETIONS: int = 65
REASONS: tuple = ('ok', 'buffer shorter than the TLP header', 'buffer shorter than the payload (and TLP digest) the header announces', 'buffer longer than the header, payload and digest the header announces', 'TLP Prefixes (Fmt 100b) are not supported', 'reserved Fmt value (101b..111b)', 'reserved Fmt/Type combination', 'AtomicOp, DMWr and TCfg requests are not supported', 'TH, LN or AT set: TPH, LN and translated addresses are not supported', 'IO/Configuration Request Length must be 1 DW', 'IO/Configuration Request TC must be 0', 'IO/Configuration Request Attr must be 0', 'IO/Configuration Request Last DW BE must be 0000b', 'Last DW BE must be 0000b on a 1-DW request', 'Last DW BE must not be 0000b on a multi-DW request', 'First DW BE must not be 0000b on a multi-DW request', 'memory request crosses a 4 KiB boundary', '4DW memory request header with an address below 4 GiB', 'reserved Completion Status value', 'completion with data must have Successful Completion status', 'completion payload longer than the remaining byte count', 'a field value does not fit its range', 'address bits 1:0 must be 0 (DW address)', 'address too wide for the header format (3DW: below 4 GiB; Cfg: 0..0xFFC)', 'data length differs from Length * 4 (or data on a kind without payload)', 'output buffer too small', 'request gets no completion (posted request or a completion)', 'max_payload must be a power of two in 128..4096', 'rcb must be 64 or 128', 'completion status must be SC, UR, CRS or CA', 'CRS is only a Configuration Request completion status', 'completion data must be Length * 4 bytes for an SC read, else empty')
STATUS_NAMES: tuple = ('ok', 'truncated_header', 'truncated_payload', 'payload_too_long', 'tlp_prefix', 'reserved_fmt', 'reserved_type', 'unsupported_type', 'unsupported_header_bits', 'io_cfg_length', 'io_cfg_tc', 'io_cfg_attr', 'io_cfg_last_be', 'last_be_on_single_dw', 'last_be_zero', 'first_be_zero', 'crosses_4k', 'addr64_below_4g', 'reserved_status', 'error_status_with_data', 'cpl_length_exceeds_byte_count', 'field_out_of_range', 'address_unaligned', 'address_too_wide', 'payload_length_mismatch', 'output_too_small', 'no_completion', 'bad_max_payload', 'bad_rcb', 'bad_completion_status', 'crs_not_config', 'data_length_mismatch')
