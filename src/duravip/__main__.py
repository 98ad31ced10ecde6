from duravip.cli import main

raise SystemExit(main())
