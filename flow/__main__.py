from flow.cli import main

raise SystemExit(main())
