"""``python -m mlx5tlp`` is the ``mlx5tlp`` command."""

from mlx5tlp.cli import main

raise SystemExit(main())
