from barlow.cli import main

raise SystemExit(main())
