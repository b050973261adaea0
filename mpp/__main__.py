from mpp.cli import main

raise SystemExit(main())
