"""DEVX objects created from raw PRM command mailboxes."""

from __future__ import annotations

from typing import Any, Optional

from mlx5tlp import _core, registry
from mlx5tlp._object import BytesLike, DeviceObject
from mlx5tlp.context import Context, _mailbox, _out_len
from mlx5tlp.envelope import Kind

__all__ = ["DevxObj"]


@registry.register_kind
class DevxObj(DeviceObject):
    """A DEVX object (``mlx5dv_devx_obj_create``).

    ``out`` is the create command's outbox (empty for an imported object). A bad firmware
    status raises :class:`~mlx5tlp.DevxCommandError` with ``status`` and ``syndrome``.
    """

    KIND = Kind.DEVX_OBJ
    __slots__ = ("_out",)

    def __init__(self, core: Any, ctx: Context, out: bytes = b"") -> None:
        super().__init__(core, ctx)
        self._out = out

    @classmethod
    def _create(cls, ctx: Context, cmd_in: BytesLike, out_len: int) -> DevxObj:
        core, out = _core.DevxObj.create(ctx._core, _mailbox(cmd_in, "cmd_in"), _out_len(out_len))
        return cls(core, ctx, bytes(out))

    @classmethod
    def _import(cls, ctx: Context, blob: BytesLike, key: Optional[bytes]) -> DevxObj:
        env = cls._open(ctx, blob, key)
        return cls(_core.DevxObj.import_(ctx._core, env.raw), ctx)

    @property
    def out(self) -> bytes:
        """The create command's outbox."""
        return self._out

    def query(self, cmd_in: BytesLike, out_len: int) -> bytes:
        """Run a query command on the object; returns the outbox."""
        return bytes(self._core.query(_mailbox(cmd_in, "cmd_in"), _out_len(out_len)))

    def modify(self, cmd_in: BytesLike, out_len: int) -> bytes:
        """Run a modify command on the object; returns the outbox."""
        return bytes(self._core.modify(_mailbox(cmd_in, "cmd_in"), _out_len(out_len)))

    def __repr__(self) -> str:
        if self.closed:
            return "<mlx5tlp.DevxObj closed>"
        return f"<mlx5tlp.DevxObj {'imported' if self.imported else 'owned'}>"
