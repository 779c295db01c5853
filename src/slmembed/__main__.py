from slmembed.cli import main

raise SystemExit(main())
