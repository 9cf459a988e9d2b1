"""Emulated PCIe functions, declared in a few lines and compiled into a native model.

Declare a function with the dataclasses of :mod:`mlx5tlp.function.spec` (or load it from a
JSON/TOML spec file), compile it with :class:`Function`, and check it as a host would with
:func:`enumerate_function` and :func:`lspci_dump`::

    from mlx5tlp import function as fn

    spec = fn.FunctionSpec(
        identity=fn.Identity(vendor_id=0x15B3, device_id=0x1234, class_code=0x020000),
        bars=[fn.Bar(0, "mem64", 1 << 20, prefetchable=True), fn.Bar(2, "mem32", 64 << 10)],
        msix=fn.Msix(vectors=16, table_bar=2, pba_offset=0x1000),
        aer=fn.Aer(),
    )
    f = fn.Function(spec)
    found = fn.enumerate_function(f)        # IDs, capability walk, BAR sizing, enables

The model's rules, the spec file format and the state layout: ``docs/function.md``.
"""

from __future__ import annotations

from mlx5tlp.function.host import (
    BarInfo,
    CapabilityInfo,
    ConfigAccess,
    Enumeration,
    MsixInfo,
    RomInfo,
    enumerate_function,
    lspci_dump,
    read_config,
)
from mlx5tlp.function.model import (
    ROM_BAR,
    STATE_SIZE,
    STATE_VERSION,
    CompletionTimeout,
    ConfigTemplate,
    Decoded,
    Function,
)
from mlx5tlp.function.spec import (
    FORMAT,
    FORMAT_VERSION,
    Aer,
    Bar,
    BarKind,
    ExpansionRom,
    FunctionSpec,
    Identity,
    Msix,
    PciExpress,
    PowerManagement,
    SerialNumber,
    VendorCap,
    VendorExtCap,
    dump,
    load,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ROM_BAR",
    "STATE_SIZE",
    "STATE_VERSION",
    "Aer",
    "Bar",
    "BarInfo",
    "BarKind",
    "CapabilityInfo",
    "CompletionTimeout",
    "ConfigAccess",
    "ConfigTemplate",
    "Decoded",
    "Enumeration",
    "ExpansionRom",
    "Function",
    "FunctionSpec",
    "Identity",
    "Msix",
    "MsixInfo",
    "PciExpress",
    "PowerManagement",
    "RomInfo",
    "SerialNumber",
    "VendorCap",
    "VendorExtCap",
    "dump",
    "enumerate_function",
    "load",
    "lspci_dump",
    "read_config",
]
