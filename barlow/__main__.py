from barlow import quick_exit

quick_exit.install()

from barlow.cli import main  # noqa: E402

raise SystemExit(main())
