from mumic_ml.cli import main

raise SystemExit(main())
