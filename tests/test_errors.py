"""The error hierarchy and the mapping of core errors onto it."""

from __future__ import annotations

import errno
import pickle

import pytest

import mlx5tlp
from mlx5tlp import _core

# ErrorKind values of cpp/include/mlx5tlp/error.hpp, and the class each maps to.
KINDS = [
    (0, mlx5tlp.Error),
    (1, mlx5tlp.NotSupportedError),
    (2, mlx5tlp.LibraryNotFoundError),
    (3, mlx5tlp.DeviceNotFoundError),
    (4, mlx5tlp.ResourceExhaustedError),
    (5, mlx5tlp.InvalidHandleError),
    (6, mlx5tlp.ExportFormatError),
    (7, mlx5tlp.DevxCommandError),
    (8, mlx5tlp.InvalidArgumentError),
]


@pytest.mark.parametrize(("kind", "cls"), KINDS)
def test_core_errors_map_to_the_hierarchy(kind: int, cls: type[mlx5tlp.Error]) -> None:
    with pytest.raises(cls) as exc:
        _core._raise_for_test(kind, errno.EINVAL, "some_call")
    e = exc.value
    assert type(e) is cls
    assert isinstance(e, mlx5tlp.Error) and isinstance(e, OSError)
    assert e.errno == errno.EINVAL
    assert e.operation == "some_call"
    assert str(e).startswith("some_call failed: Invalid argument (errno 22)")


def test_no_errno_is_none() -> None:
    with pytest.raises(mlx5tlp.LibraryNotFoundError) as exc:
        _core._raise_for_test(2, 0, "load x")
    assert exc.value.errno is None


def test_hierarchy() -> None:
    assert issubclass(mlx5tlp.LibraryNotFoundError, mlx5tlp.NotSupportedError)
    assert issubclass(mlx5tlp.InvalidArgumentError, ValueError)
    for _kind, cls in KINDS:
        assert issubclass(cls, mlx5tlp.Error)


def test_errors_pickle_with_their_attributes() -> None:
    e = mlx5tlp.DevxCommandError(errno.EREMOTEIO, "bad status", "mlx5dv_devx_general_cmd")
    e.status, e.syndrome = 2, 0x1234
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is mlx5tlp.DevxCommandError
    assert (back.errno, back.operation, back.status, back.syndrome) == (121, e.operation, 2, 0x1234)
    assert str(back) == "bad status"
